"""What a batch command's INPUT arguments name: files, folders, globs and list files, as one list of files."""
from __future__ import annotations

import glob
import logging
from pathlib import Path
from typing import Iterable, Sequence

from dymu.errors import DymuError
from dymu.frames import MediaNotFound, existing_file, regular_file
from pipeline.validate import reject_url

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".ts", ".mpg", ".mpeg",
                            ".3gp", ".wmv", ".gif"})
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
MEDIA_SUFFIXES = VIDEO_SUFFIXES | IMAGE_SUFFIXES


def is_media_name(path: Path) -> bool:
    return path.suffix.lower() in MEDIA_SUFFIXES and not path.name.startswith(".")


def _folder_files(folder: Path) -> list[Path]:
    """Media files under ``folder``, recursively, by name (a damaged video is still listed, and reported).
    ``is_file`` is a stat: a FIFO or a device in the folder is skipped, never opened."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_media_name(p))


def _expand_one(item: str, base: Path) -> list[Path]:
    path = Path(item).expanduser()
    if not path.is_absolute():
        path = base / path
    if path.is_dir():
        return _folder_files(path)
    if any(c in item for c in "*?[") and not path.exists():
        matches = [Path(m) for m in sorted(glob.glob(str(path), recursive=True))]
        files = [m for m in matches if m.is_file()]
        for folder in (m for m in matches if m.is_dir()):
            files.extend(_folder_files(folder))
        if not files:
            log.warning("%s matches no files", item)
        return files
    if path.exists():
        # Named, so it must be a regular file, as for `ask`: a FIFO or a device is refused now, unopened
        # (opening a FIFO blocks until something writes to it).
        regular_file(path)
    # A file, or a name that is not there: the job reports "no such file" and the batch goes on.
    return [path]


def _list_file_entries(list_file: Path) -> Iterable[str]:
    try:
        lines = existing_file(list_file).read_text().splitlines()
    except MediaNotFound as exc:  # not there, not a regular file (a FIFO would block the read), unreadable
        raise DymuError(f"cannot read the list file: {exc}") from None
    except OSError as exc:
        raise DymuError(f"cannot read the list file {list_file}: {exc.strerror or exc}") from exc
    return (line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))


def expand_inputs(inputs: Sequence[str], command: str = "caption") -> list[Path]:
    """Absolute paths of the media files ``inputs`` name, in order, each once.

    An input is a file; a folder (its media files, recursively, by extension); a glob (``clips/**/*.mp4``);
    or ``@list.txt``, a file naming one input per line (``#`` starts a comment; relative names are relative
    to the list file's folder).
    """
    files: list[Path] = []
    for item in inputs:
        if item.startswith("@"):
            list_file = Path(item[1:]).expanduser().resolve()
            for entry in _list_file_entries(list_file):
                reject_url(entry, command)
                files.extend(_expand_one(entry, list_file.parent))
        else:
            reject_url(item, command)
            files.extend(_expand_one(item, Path.cwd()))
    unique = dict.fromkeys(p.resolve() for p in files)
    if not unique:
        raise DymuError(f"no video or image files found in {' '.join(inputs)}")
    return list(unique)
