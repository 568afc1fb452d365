"""Small readers shared by the CLI, evaluation and training data."""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator


def check_count(name: str, value, optional: bool = False) -> None:
    """``value`` must be a positive int (``optional``: or None); the ValueError names ``name`` and the value."""
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if optional else ''}, got {value!r}")


def iter_jsonl(lines: Iterable[str], path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line; invalid JSON or a value that is not an object is a
    ``ValueError`` naming ``path:line``."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        yield n, row
