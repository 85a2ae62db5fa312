"""Fetching the media of a request (``image_url`` / ``video_url``) under limits, and reading it into a ``Media``.

URLs: ``http(s)://`` (streamed with a size cap and a deadline; every address the host resolves to, and every
redirect hop, must be public unless ``allow_private_urls``), ``data:`` with base64, and ``file://`` only
under ``allowed_media_dir``. Downloads are spooled to a folder under their sha256, so a clip sent twice is
stored once; concurrent requests for the same URL share one download. The folder is an LRU cache bounded by
``cache_bytes``: a file a request still holds is never removed, a file that was refused (it does not
decode, or breaks a limit) goes at once, and ``close`` removes the folder. What a file is (image or video)
is read from its content, never its name.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import ipaddress
import os
import shutil
import socket
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Iterable
from urllib.parse import unquote, urljoin, urlparse

import httpx
import numpy as np
from PIL import Image

from dymu.errors import DymuError
from dymu.frames import load_image, media_kind, read_video_frames
from dymu.videoqa import Media
from pipeline.serve.protocol import ApiError
from workers.token_cache import content_hash

_MAX_REDIRECTS = 5
_CHUNK = 1 << 16


@dataclass(frozen=True)
class MediaLimits:
    """max_bytes: one media file; max_video_seconds: a video's duration; max_frames: frames (or images) per
    request; timeout_s: a whole download; allowed_media_dir: the one folder file:// may read (None: no file://);
    cache_bytes: downloaded and inline media kept for reuse once no request holds them."""

    max_bytes: int = 64 << 20
    max_video_seconds: float = 3600.0
    max_frames: int = 64
    timeout_s: float = 30.0
    allowed_media_dir: str | None = None
    allow_private_urls: bool = False
    cache_bytes: int = 1 << 30

    def check(self) -> None:
        """Raise ``DymuError`` for limits that make no sense (before any server starts)."""
        if self.max_bytes < 1 or self.max_video_seconds <= 0 or self.max_frames < 1 or self.timeout_s <= 0:
            raise DymuError("media limits must be positive (--max-media-mb, --max-video-seconds, --max-frames, "
                            "--fetch-timeout)")
        if self.cache_bytes < 0:
            raise DymuError("--media-cache-mb must not be negative")
        if self.allowed_media_dir is not None and not Path(self.allowed_media_dir).is_dir():
            raise DymuError(f"--allowed-media-dir {self.allowed_media_dir}: no such folder")


@dataclass(frozen=True)
class Fetched:
    path: Path
    digest: str  # sha256 of the bytes
    spooled: bool = False  # in the fetcher's folder (a file:// file is the user's: never removed)


def is_public_address(address: str) -> bool:
    """False for loopback, private, link-local, multicast, reserved and unspecified addresses (v4 and v6)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    return ip.is_global and not ip.is_multicast


def _too_large(limits: MediaLimits) -> ApiError:
    return ApiError(413, f"the media is larger than the server's limit of {limits.max_bytes} bytes", "media_too_large")


Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve_host(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (what the fetcher checks before it connects)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


class MediaFetcher:
    """Fetches media into ``spool_dir`` (default: a new folder under ``parent_dir`` or the system's temp).

    Every ``fetch`` holds its file until ``release``; ``resolve`` names the hosts' addresses (tests give
    their own).
    """

    def __init__(self, limits: MediaLimits, spool_dir: str | Path | None = None, resolve: Resolver = resolve_host,
                 parent_dir: str | Path | None = None):
        self.limits = limits
        if spool_dir is None and parent_dir is not None:
            Path(parent_dir).mkdir(parents=True, exist_ok=True)
        self.spool = Path(spool_dir or tempfile.mkdtemp(prefix="dymu-serve-media-", dir=parent_dir))
        self.spool.mkdir(parents=True, exist_ok=True)
        self.resolve = resolve
        self._downloads: dict[str, asyncio.Future] = {}
        # The cache's book, least recently used first: digest -> size; and the requests holding each file.
        # Files are written in threads and released on the event loop: one lock keeps the book and the folder
        # in step, so a file is never removed between its writing and its first hold.
        self._lock = threading.Lock()
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self._holds: dict[str, int] = {}
        self._refused: set[str] = set()

    async def fetch(self, url: str) -> Fetched:
        """The media at ``url``, held for the caller until ``release``."""
        scheme = urlparse(url).scheme.lower()
        if scheme == "data":
            return await self._store_held(self._decode_data_url(url))
        if scheme == "file":
            return await asyncio.to_thread(self._local_file, url)
        if scheme in ("http", "https"):
            if url not in self._downloads:  # requests for the same URL at the same time share one download
                task = asyncio.ensure_future(self._download(url))
                self._downloads[url] = task
                task.add_done_callback(lambda _: self._downloads.pop(url, None))
            data, digest = await asyncio.shield(self._downloads[url])
            return await self._store_held(data, digest)  # each caller holds the file itself
        raise ApiError(400, f"unsupported media URL scheme {scheme or '(none)'!r}: use http(s)://, data: or file://",
                       "invalid_media_url")

    async def _store_held(self, data: bytes, digest: str | None = None) -> Fetched:
        """``_store`` in a thread. A caller cancelled meanwhile (its client went away) never gets the file, so
        its hold is released when the thread is done, or the file could never leave the cache."""
        stored = asyncio.ensure_future(asyncio.to_thread(self._store, data, digest))
        try:
            return await asyncio.shield(stored)
        except asyncio.CancelledError:
            stored.add_done_callback(lambda done: done.cancelled() or done.exception() or self.release([done.result()]))
            raise

    def release(self, files: Iterable[Fetched], refused: bool = False) -> None:
        """A request is done with ``files``. ``refused``: the server refused them (they do not decode, or break
        a limit), so they are removed as soon as no other request holds them."""
        with self._lock:
            for f in files:
                if not f.spooled or f.digest not in self._holds:
                    continue
                self._holds[f.digest] -= 1
                if refused:
                    self._refused.add(f.digest)
                if self._holds[f.digest] == 0:
                    del self._holds[f.digest]
                    if f.digest in self._refused:
                        self._remove(f.digest)
            self._evict()

    def cached_bytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def close(self) -> None:
        """Remove the folder and everything in it (the server is stopping)."""
        with self._lock:
            self._sizes.clear()
            self._holds.clear()
            shutil.rmtree(self.spool, ignore_errors=True)

    def _remove(self, digest: str) -> None:  # under the lock
        self._sizes.pop(digest, None)
        self._refused.discard(digest)
        (self.spool / digest).unlink(missing_ok=True)

    def _evict(self) -> None:  # under the lock: least recently used first, never a held file
        total = sum(self._sizes.values())
        for digest in [d for d in self._sizes if d not in self._holds]:
            if total <= self.limits.cache_bytes:
                break
            total -= self._sizes[digest]
            self._remove(digest)

    # --- data: and file:// -------------------------------------------------------------------------
    def _decode_data_url(self, url: str) -> bytes:
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ApiError(400, "a data: URL must be base64 (data:<type>;base64,<data>)", "invalid_media_url")
        if len(payload) * 3 // 4 > self.limits.max_bytes + 3:
            raise _too_large(self.limits)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "the data: URL is not valid base64", "invalid_media_url") from None

    def _local_file(self, url: str) -> Fetched:
        root = self.limits.allowed_media_dir
        if root is None:
            raise ApiError(400, "file:// URLs are off on this server (it runs without --allowed-media-dir)",
                           "file_url_not_allowed")
        path = Path(os.path.realpath(unquote(urlparse(url).path)))
        if not path.is_relative_to(os.path.realpath(root)):
            raise ApiError(400, f"file:// URLs must point inside {root}", "file_url_not_allowed")
        if not path.is_file():
            raise ApiError(400, f"{url}: no such file", "media_not_found")
        if path.stat().st_size > self.limits.max_bytes:
            raise _too_large(self.limits)
        return Fetched(path, content_hash(path))

    def _store(self, data: bytes, digest: str | None = None) -> Fetched:
        """Write ``data`` under its hash (once) and hold it for the caller."""
        if len(data) > self.limits.max_bytes:
            raise _too_large(self.limits)
        digest = digest or hashlib.sha256(data).hexdigest()
        path = self.spool / digest
        partial = None
        if not path.exists():  # written outside the lock; only the rename into place is under it
            partial = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.{id(data)}.part")
            partial.write_bytes(data)
        with self._lock:
            if partial is not None:
                partial.replace(path)
            elif not path.exists():  # removed since we looked: write it again, here
                path.write_bytes(data)
            self._sizes[digest] = len(data)
            self._sizes.move_to_end(digest)
            self._holds[digest] = self._holds.get(digest, 0) + 1
        return Fetched(path, digest, spooled=True)

    # --- http(s) -----------------------------------------------------------------------------------
    async def _download(self, url: str) -> tuple[bytes, str]:
        """(the bytes, their sha256)."""
        try:
            data = await asyncio.wait_for(self._get(url), self.limits.timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(400, f"fetching {url} took longer than {self.limits.timeout_s:g}s", "media_timeout") from None
        except httpx.HTTPError as exc:
            raise ApiError(400, f"cannot fetch {url}: {type(exc).__name__}: {exc}", "media_unreachable") from None
        return data, await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())

    async def _get(self, url: str) -> bytes:
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
            for _ in range(_MAX_REDIRECTS + 1):
                await self._check_host(url)
                async with client.stream("GET", url) as response:
                    if response.is_redirect and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code >= 400:
                        raise ApiError(400, f"fetching {url} failed: HTTP {response.status_code}", "media_unreachable")
                    declared = int(response.headers.get("content-length") or 0)
                    if declared > self.limits.max_bytes:
                        raise _too_large(self.limits)
                    chunks, size = [], 0
                    async for part in response.aiter_bytes(_CHUNK):
                        size += len(part)
                        if size > self.limits.max_bytes:
                            raise _too_large(self.limits)
                        chunks.append(part)
                    return b"".join(chunks)
        raise ApiError(400, f"fetching {url}: more than {_MAX_REDIRECTS} redirects", "media_unreachable")

    async def _check_host(self, url: str) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ApiError(400, f"cannot fetch {url}: only http(s) URLs with a host", "invalid_media_url")
        if self.limits.allow_private_urls:
            return
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            addresses = await self.resolve(parsed.hostname, port)
        except socket.gaierror as exc:
            raise ApiError(400, f"cannot fetch {url}: {parsed.hostname} does not resolve ({exc})",
                           "media_unreachable") from None
        if not addresses or not all(is_public_address(address) for address in addresses):
            raise ApiError(400, f"{parsed.hostname} is a loopback, private or link-local address; this server "
                                f"fetches only public URLs (start it with --allow-private-urls to change that)",
                           "private_url")


# --- reading fetched files into frames ----------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    """Frames sampled from a video: ``frames`` uniformly, or at ``fps`` capped by ``max_frames``."""

    frames: int
    fps: float | None
    max_frames: int


def video_duration(path: Path) -> float:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.duration is not None:
            return float(stream.duration * stream.time_base)
        return container.duration / av.time_base if container.duration else 0.0


def read_fetched(files: list[Fetched], sampling: Sampling, limits: MediaLimits, supports_video: bool) -> Media:
    """One video, one image, or several images as the frames of one clip (at ``sampling.fps`` or 1 per second)."""
    try:
        kinds = [media_kind(f.path) for f in files]
    except DymuError as exc:
        raise ApiError(400, f"cannot read the media: {_short(exc)}",
                       "invalid_media") from None
    if len(files) > limits.max_frames:
        raise ApiError(400, f"{len(files)} images are more than the server's limit of {limits.max_frames} frames",
                       "too_many_frames")
    if "video" in kinds and len(files) > 1:
        raise ApiError(400, "one request asks about one video (or images as the frames of one clip)", "too_many_media")
    if "video" in kinds or len(files) > 1:
        if not supports_video:
            raise ApiError(400, "this model answers about single images only", "video_not_supported")
    try:
        if kinds == ["image"]:
            return Media(files[0].digest, "image", image=load_image(files[0].path))
        if kinds == ["video"]:
            duration = video_duration(files[0].path)
            if duration > limits.max_video_seconds:
                raise ApiError(413, f"the video lasts {duration:.0f}s, more than the server's limit of "
                                    f"{limits.max_video_seconds:g}s", "video_too_long")
            video = read_video_frames(files[0].path, num_frames=sampling.frames if sampling.fps is None else None,
                                      fps=sampling.fps, max_frames=sampling.max_frames)
            return Media(files[0].digest, "video", frames=video.frames, timestamps=list(video.timestamps))
        return images_as_clip(files, sampling.fps or 1.0)
    except DymuError as exc:
        raise ApiError(400, f"cannot read the media: {_short(exc)}", "invalid_media") from None


def images_as_clip(files: list[Fetched], fps: float) -> Media:
    """Images as the frames of one video, in order, resized to the first one's size, ``1 / fps`` seconds apart."""
    images = [load_image(f.path).convert("RGB") for f in files]
    size = images[0].size
    frames = np.stack([np.asarray(im if im.size == size else im.resize(size, Image.BICUBIC)) for im in images])
    source = hashlib.sha256(":".join(f.digest for f in files).encode()).hexdigest()
    return Media(source, "video", frames=frames, timestamps=[i / fps for i in range(len(images))])


def source_id(files: list[Fetched]) -> str:
    """The token cache's name for these media: the file's hash, or a hash of the images' hashes in order."""
    if len(files) == 1:
        return files[0].digest
    return "clip-" + hashlib.sha256(":".join(f.digest for f in files).encode()).hexdigest()


def _short(exc: Exception) -> str:
    """A media error without the spool file's path (the client never saw it)."""
    return str(exc).split(": ", 1)[-1] if str(exc).startswith("/") else str(exc)
