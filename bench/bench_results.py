"""Write one `## name` section of bench/RESULTS.md, keeping every other section as it is."""

from __future__ import annotations

import re
from pathlib import Path

HEADER = "# Benchmark results\n\nEach section says the command that produced it. Figures are from the machine named in it.\n"


def write_section(path: Path | str, name: str, text: str) -> None:
    path = Path(path)
    current = path.read_text() if path.exists() else HEADER
    section = text.rstrip() + "\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(current):
        current = pattern.sub(lambda _: section + "\n", current, count=1)
    else:
        current = current.rstrip() + "\n\n" + section
    path.write_text(current)
