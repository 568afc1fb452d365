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


def require_input(path, what: str, expected: str, folder: bool = False) -> None:
    """An input that must exist as a file (or, with ``folder``, a folder): FileNotFoundError when nothing is there,
    IsADirectoryError / NotADirectoryError, naming what was expected, when the path is the other kind."""
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} not found")
    if folder and not p.is_dir():
        raise NotADirectoryError(f"{what} {str(path)!r} is a file; expected {expected}")
    if not folder and not p.is_file():
        raise IsADirectoryError(f"{what} {str(path)!r} is a folder; expected {expected}")


def check_output_file(path, flag: str = "--output") -> None:
    """Refuse, before any work, an output file path that cannot be written: a folder, or a parent that is not a
    folder or not writable (a run that only failed at the end would lose its result)."""
    import os
    from pathlib import Path

    if not str(path).strip():
        raise ValueError(f"{flag} needs a file path, got an empty one")
    p = Path(path)
    if p.suffix.lower() == ".md":
        raise ValueError(f"{flag} {str(path)!r}: the result is JSON and its markdown summary is written beside it "
                         f"with the suffix .md; give a .json path (e.g. {str(p.with_suffix('.json'))!r})")
    if p.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a folder; expected a file path (e.g. {str(p / 'result.json')!r})")
    parent = next((a for a in [p.parent, *p.parent.parents] if a.exists()), Path("."))
    if not parent.is_dir():
        raise ValueError(f"{flag} {str(path)!r}: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {str(path)!r}: the folder {str(parent)!r} is not writable")
