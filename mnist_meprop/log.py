"""Where progress lines go by default: standard error, flushed, so stdout keeps only the tables."""

import sys


def to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
