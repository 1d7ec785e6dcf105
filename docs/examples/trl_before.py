"""Before: supervised fine-tuning with TRL's SFTTrainer (a tiny model, 8 steps, CPU, offline)."""

from datasets import Dataset
from tiny_model import model_dir  # a saved tiny Llama + SmolLM2 tokenizer (or the folder given)
from trl import SFTConfig, SFTTrainer

rows = [
    {"prompt": f"Q: What is {a} + {b}?\nA:", "completion": f" {a + b}"} for a in range(8) for b in range(4)
]

args = SFTConfig(
    output_dir="trl_out",
    max_length=1024,
    per_device_train_batch_size=4,
    max_steps=8,
    learning_rate=1e-3,
    logging_steps=1,
    # Precision and checkpointing, set equal on both sides (SFTConfig turns bf16 and checkpointing on).
    model_init_kwargs={"dtype": "float32"},
    bf16=False,
    activation_checkpointing=False,  # transformers 5.24's name of gradient_checkpointing
    save_strategy="no",
    report_to="none",
    seed=0,
)
trainer = SFTTrainer(model=model_dir(), args=args, train_dataset=Dataset.from_list(rows))
result = trainer.train()
print(f"first loss {trainer.state.log_history[0]['loss']:.4f}, train loss {result.training_loss:.4f}")
