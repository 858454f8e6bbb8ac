"""Answers of ``privseg privacy`` kept on disk, keyed by everything that determines them.

The first answer to a question costs a σ calibration (0.2-1 s of PRV/RDP queries) plus the
import of SciPy (~0.6 s); asked again, the calculator reads the answer from
``~/.cache/privseg/privacy-calculator.json`` and imports neither. The key holds the question
(n, B, epochs, ε or σ, δ, accountant), the installed Opacus version and a hash of privseg's
accounting sources, so an answer is never served after the code that computed it changed.
The trade-off: a file in the user's cache that a repeated question trusts (it is rewritten
whole on each new answer; a damaged file is ignored and replaced), for answers that are then
instant; the first answer to a new question is computed as before.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path

#: privseg's sources whose change invalidates every stored answer
_SOURCES = ("accounting.py", "opacus_accountants.py")
_MAX_ENTRIES = 512


def cache_file() -> Path:
    """The calculator's answers file, beside privseg's data caches."""
    return Path.home() / ".cache" / "privseg" / "privacy-calculator.json"


def question_key(**question) -> str:
    """The key of one question: its arguments, Opacus' version, privseg's accounting code."""
    here = Path(__file__).parent
    code = hashlib.sha256(b"".join((here / name).read_bytes() for name in _SOURCES))
    blob = json.dumps({"question": question, "opacus": metadata.version("opacus"),
                       "code": code.hexdigest()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cached_answer(key: str) -> dict | None:
    """The stored answer for ``key``, or None."""
    answer = _read(cache_file()).get(key)
    return answer if isinstance(answer, dict) else None


def store_answer(key: str, answer: dict) -> None:
    """Keep ``answer`` (JSON: floats round-trip exactly) under ``key``; never fails the
    command (an unwritable cache only costs the next call its calibration)."""
    path = cache_file()
    data = _read(path)
    data[key] = answer
    while len(data) > _MAX_ENTRIES:  # oldest first (dicts keep insertion order)
        data.pop(next(iter(data)))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
    except OSError:
        pass
