"""An append-only JSON-lines results file that a crash never leaves with a half line.

Every record is written whole with one ``write`` on an ``O_APPEND`` descriptor, then fsynced, so what a
reader sees is a sequence of complete lines, perhaps followed by one line a crash cut short; opening the
file again cuts such a tail away. An exclusive ``flock`` keeps two processes from writing one file.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Any

from dymu.errors import DymuError
from dymu.files import TooDeeplyNested, parse_json

log = logging.getLogger(__name__)


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_records(data: bytes, path: Path) -> list[dict[str, Any]]:
    """The records of the file's complete lines; a DymuError if they are not our JSON lines (every line a JSON
    object with a "path"), so that a file we did not write is never touched. A partial last line is allowed
    only when it starts as one of our records does (what a crash in the middle of a write leaves)."""
    end = data.rfind(b"\n") + 1
    records = []
    for number, line in enumerate(data[:end].splitlines(), 1):
        try:
            record = parse_json(line, f"line {number}")
        except (ValueError, TooDeeplyNested):
            record = None
        if not isinstance(record, dict) or "path" not in record:
            raise DymuError(f"{path} is not a dymu-video results file (line {number} is not one of its JSON "
                            f"records); it was left as it is: choose another --out or remove it")
        records.append(record)
    if end < len(data) and not data[end:].startswith(RECORD_START):
        raise DymuError(f"{path} is not a dymu-video results file (it ends with a line that is not one of its "
                        f"records); it was left as it is: choose another --out or remove it")
    return records


class JsonlFile:
    """``JsonlFile.open(path, mode)`` with mode ``"new"`` (refuse a file that already has records),
    ``"resume"`` (keep them; ``records`` lists those found at opening) or ``"overwrite"`` (start empty)."""

    def __init__(self, path: Path, fd: int, records: list[dict[str, Any]]):
        self.path = path
        self.records = records
        self._fd = fd

    @classmethod
    def open(cls, path: str | Path, mode: str = "new") -> "JsonlFile":
        if mode not in ("new", "resume", "overwrite"):
            raise ValueError(f"mode must be new, resume or overwrite, got {mode!r}")
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise DymuError(f"cannot open {path} for writing: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DymuError(f"{path} is being written by another process") from None
        try:
            data = _read_all(fd)
            records = _parse_records(data, path)  # refuses a foreign file before anything is written
            if data and mode == "new":
                raise DymuError(f"{path} already holds {len(records)} result(s); pass --resume to skip the videos "
                                f"it has, or --overwrite to start it over")
        except BaseException:
            os.close(fd)
            raise
        if mode == "overwrite":
            os.ftruncate(fd, 0)
            return cls(path, fd, [])
        end = data.rfind(b"\n") + 1
        if end < len(data):
            log.warning("%s: dropping a partial last line (%d bytes) left by an interrupted run", path, len(data) - end)
            os.ftruncate(fd, end)
            os.fsync(fd)
        return cls(path, fd, records)

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        """Replace the file's records at once (a new file renamed over the old one, so a crash keeps one)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(b"".join(_line(record) for record in records))
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(tmp, os.O_RDWR | os.O_APPEND)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh file: nobody else can hold it
        os.replace(tmp, self.path)
        os.close(self._fd)
        self._fd, self.records = fd, list(records)

    def append(self, record: dict[str, Any]) -> None:
        data = _line(record)
        written = os.write(self._fd, data)
        if written != len(data):  # a full disk: cut the fragment, so the file still ends with a whole line
            os.ftruncate(self._fd, os.fstat(self._fd).st_size - written)
            raise DymuError(f"could not write to {self.path} (disk full?)")
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # also releases the lock
            self._fd = -1

    def __enter__(self) -> "JsonlFile":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


RECORD_START = b'{"path": '  # how every record's line begins: ``_line`` of a dict whose first key is "path"


def _line(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, ensure_ascii=False) + "\n").encode()
