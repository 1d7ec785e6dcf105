import os
import sys

# Tests import their in-process helpers (tokenizers, tiny models) as a plain module.
sys.path.insert(0, os.path.dirname(__file__))
# ... and the recipe's model helpers (SmolLM2 from its GGUF, the tiny random Llama) from recipes/.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
