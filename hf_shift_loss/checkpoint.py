"""What a checkpoint must hold for the run to continue exactly, and the check made before resuming.

The trainer keeps its own resumable state (token counts, the loss window since the last log line) in
the stock ``trainer_state.json``, under :data:`STATE_KEY` of ``stateful_callbacks``. That file is the
last one the stock save writes, after the weights, ``optimizer.pt``, ``scheduler.pt`` and
``rng_state*.pth`` and before older checkpoints are rotated away: so there is no moment at which a
checkpoint looks complete without the project's state, and nothing of ours is written after it.

A kill during a save leaves a checkpoint without (or with a truncated) ``trainer_state.json`` or one of
the other pieces. The stock Trainer resumes from such a folder silently (a fresh optimizer, fresh RNG)
or with a bare ``JSONDecodeError``; :func:`check_checkpoint` refuses it instead, naming the file and
the checkpoint, before anything is loaded.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any

__all__ = ["STATE_KEY", "check_checkpoint"]

# The key of the project's state in trainer_state.json's "stateful_callbacks".
STATE_KEY = "hf_shift_loss"
TRAINER_STATE_FILE = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")  # transformers' OPTIMIZER_NAME and OPTIMIZER_NAME_BIN
SCHEDULER_FILE = "scheduler.pt"


def rng_state_file(process_index: int, world_size: int) -> str:
    """The RNG file the stock Trainer writes (and reads) for this process."""
    return "rng_state.pth" if world_size <= 1 else f"rng_state_{process_index}.pth"


def check_checkpoint(
    folder: str,
    *,
    process_index: int = 0,
    world_size: int = 1,
    optimizer_state: bool = True,
    deepspeed: bool = False,
) -> dict[str, Any]:
    """Refuse a checkpoint that a resumed run cannot continue from exactly; return the project's state.

    Args:
        folder: the checkpoint folder (``output_dir/checkpoint-N``).
        process_index, world_size: this process, for its ``rng_state*.pth``.
        optimizer_state: whether the run saves optimizer, scheduler and RNG states (``save_only_model``
            is False); without them only ``trainer_state.json`` is required.
        deepspeed: DeepSpeed keeps the optimizer and scheduler in its own folders; only the RNG state
            and ``trainer_state.json`` are checked here.

    Returns:
        The project's state saved under :data:`STATE_KEY` (see ``ShiftLossTrainer._save_checkpoint``).

    Raises:
        ValueError: naming the missing or unreadable file and the checkpoint, with what to do.

    Examples:
        >>> import tempfile
        >>> check_checkpoint(tempfile.mkdtemp(), optimizer_state=False)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: cannot resume from checkpoint ...: trainer_state.json is missing...
    """
    required = []
    if optimizer_state:
        if not deepspeed:
            required.append(_first_present(folder, OPTIMIZER_FILES))
            required.append(SCHEDULER_FILE)
        required.append(rng_state_file(process_index, world_size))
    for name in required:
        path = os.path.join(folder, name)
        if os.path.isdir(path):  # FSDP's sharded optimizer folder
            continue
        if not os.path.isfile(path):
            raise _refused(folder, f"{name} is missing")
        try:
            with zipfile.ZipFile(path):  # torch.save writes a zip archive; a cut file has no directory
                pass
        except (zipfile.BadZipFile, OSError) as error:
            raise _refused(folder, f"{name} is unreadable ({error})") from error
    path = os.path.join(folder, TRAINER_STATE_FILE)
    if not os.path.isfile(path):
        raise _refused(folder, f"{TRAINER_STATE_FILE} is missing")
    try:
        with open(path, encoding="utf-8") as file:
            trainer_state = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
        raise _refused(folder, f"{TRAINER_STATE_FILE} is unreadable ({error})") from error
    state = (trainer_state.get("stateful_callbacks") or {}).get(STATE_KEY)
    if not isinstance(state, dict):
        raise _refused(
            folder,
            f"{TRAINER_STATE_FILE} has no '{STATE_KEY}' state (the checkpoint was written by another trainer or "
            "an older hf_shift_loss version), so the token counts and the loss window would restart",
        )
    return state


def _first_present(folder: str, names: tuple[str, ...]) -> str:
    """The first of ``names`` in ``folder`` (a file, or FSDP's folder of that stem), else the first name."""
    entries = os.listdir(folder) if os.path.isdir(folder) else []
    for name in names:
        if name in entries:
            return name
    stem = names[0].split(".")[0]
    return next((entry for entry in entries if entry.startswith(stem)), names[0])


def _refused(folder: str, problem: str) -> ValueError:
    parent = os.path.dirname(os.path.abspath(folder))
    others = sorted(
        (
            entry
            for entry in os.listdir(parent)
            if entry.startswith("checkpoint-") and entry != os.path.basename(folder)
        ),
        key=lambda entry: int(entry.rpartition("-")[2]) if entry.rpartition("-")[2].isdigit() else -1,
    )
    return ValueError(
        f"cannot resume from checkpoint {folder}: {problem}. The save was interrupted or the folder was changed, "
        "so the run would not continue exactly; resume from an earlier complete checkpoint (in "
        f"{parent}: {', '.join(others) or 'none'}), or delete this one so that resume_from_checkpoint=True "
        "takes the newest remaining"
    )
