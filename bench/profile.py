"""Summarise py-spy's collapsed stacks (``--format raw``): where the gateway's time goes.

``python -m bench.profile FILE [--top N] [--under FUNCTION]`` prints the functions with the
most samples on top of the stack (self) and anywhere on it (inclusive), as % of all samples.
``--under`` keeps only the stacks passing through a function (e.g. ``receive_frame``).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

# py-spy frames look like "function (path/to/module.py:123)"; the line is dropped so one
# function is one row.
_FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def _label(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "/work/main/", "python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match['name']} ({path})"


def load(path: Path, under: str | None = None) -> tuple[Counter[str], Counter[str], int]:
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = [_label(f) for f in stack.split(";")]
        if under is not None and not any(under in f for f in frames):
            continue
        count = int(count_text)
        samples += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            total_counts[frame] += count
    return self_counts, total_counts, samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--under", default=None, help="only stacks through this function")
    args = parser.parse_args(argv)
    self_counts, total_counts, samples = load(args.file, args.under)
    if not samples:
        print("no samples", file=sys.stderr)
        return 1
    print(f"{samples} samples" + (f" under {args.under}" if args.under else ""))
    for title, counts in (("self", self_counts), ("inclusive", total_counts)):
        print(f"\n{title:>9}  function")
        for name, count in counts.most_common(args.top):
            print(f"{100 * count / samples:8.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
