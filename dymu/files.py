"""Small helpers for the files dymu reads and writes on a user's behalf: JSON and YAML read under a nesting
limit, a text file written whole or not at all, and the cache folder.

No torch, no transformers: the CLI's checks of bad input use these before anything heavy is imported, and the
HTTP server can use the same guard on a request body (``check_nesting`` on what it parsed).
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from dymu.errors import DymuError

# Deeper than any real config or thresholds file (a checkpoint's config.json nests 3-4 levels), and far below
# Python's recursion limit, so that what reads the value afterwards (json.dumps, dataclasses, a merge of dicts)
# cannot hit a RecursionError either.
MAX_NESTING = 64


class TooDeeplyNested(DymuError):
    """A JSON or YAML document whose lists and mappings nest deeper than ``MAX_NESTING``."""


def _too_deep(what: str, limit: int) -> TooDeeplyNested:
    return TooDeeplyNested(f"{what} nests lists or mappings more than {limit} levels deep")


def check_nesting(value: Any, what: str, limit: int = MAX_NESTING) -> Any:
    """``value`` unchanged, unless its lists and mappings nest deeper than ``limit`` (``TooDeeplyNested``).

    Walked with a stack, not recursion. A node shared by several parents (YAML's aliases) is walked again only
    when reached at a greater depth, so an alias bomb costs one visit per node and a self-referencing alias
    counts as too deep."""
    deepest_at: dict[int, int] = {}
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, (list, tuple)):
            children = node
        else:
            continue
        if depth > limit:
            raise _too_deep(what, limit)
        if deepest_at.get(id(node), 0) >= depth:
            continue
        deepest_at[id(node)] = depth
        stack.extend((child, depth + 1) for child in children)
    return value


def parse_json(text: str | bytes, what: str) -> Any:
    """``json.loads(text)`` under the nesting limit. ``what`` names the document in the error; a document that
    is not JSON raises ``json.JSONDecodeError`` as json.loads does, for the caller to word."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise _too_deep(what, MAX_NESTING) from None
    return check_nesting(value, what)


def parse_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load(text)`` under the nesting limit (``yaml.YAMLError`` for a document that is not YAML)."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except RecursionError:
        raise _too_deep(what, MAX_NESTING) from None
    return check_nesting(value, what)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` whole: a temp file in the same folder, synced, then renamed over ``path``, so
    that a crash or a full disk leaves the old file (or none), never half of the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    # os.open, not mkstemp: the new file gets the mode a plain new file gets (0666 less the umask), not 0600
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def cache_dir() -> Path:
    """``$DYMU_CACHE`` or ``~/.cache/dymu-video`` (``$XDG_CACHE_HOME/dymu-video`` where that is set)."""
    root = os.environ.get("DYMU_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dymu-video"
    return Path(root)


def check_cache_dir() -> Path:
    """The cache folder, unless it cannot be one: it, or the nearest part of its path that exists, is not a
    folder (``DYMU_CACHE`` naming a file). Nothing is created here; the folder is made when first written."""
    folder = cache_dir()
    source = "DYMU_CACHE" if os.environ.get("DYMU_CACHE") else "the cache folder"
    target = folder.expanduser().absolute()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == target and not target.is_dir():
        raise DymuError(f"{source} {folder} is a file, not a folder")
    if not existing.is_dir():
        raise DymuError(f"{source} {folder} cannot be made: {existing} is a file, not a folder")
    return folder
