"""What every benchmark here shares: the process's memory from /proc, the load average, and writing its
section of docs/performance.md. Standard library only, so that workers import it at no cost."""

from __future__ import annotations

import re
from pathlib import Path


def resident_bytes(field_name: str) -> int:
    """A memory field of /proc/self/status in bytes: ``"VmRSS"`` (now) or ``"VmHWM"`` (the peak)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, or "n/a"."""
    try:
        with open("/proc/loadavg") as file:
            return " ".join(file.read().split()[:3])
    except OSError:
        return "n/a"


def write_section(performance_md: Path, heading: str, section: str, before: str | None = None) -> None:
    """Replace the section headed ``heading`` (up to the next ``## ``) with ``section``, or add it before
    the section headed ``before`` (at the end without one), leaving the other sections untouched."""
    text = performance_md.read_text() if performance_md.exists() else "# Performance\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    before_match = re.search(rf"^{re.escape(before)}\n", text, re.M) if before is not None else None
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text, count=1)
    elif before_match is not None:
        text = text[: before_match.start()] + section.rstrip("\n") + "\n\n" + text[before_match.start() :]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    performance_md.write_text(text.rstrip("\n") + "\n")
