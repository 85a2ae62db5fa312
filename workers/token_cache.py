"""The Redis token cache: a video's merged tokens, keyed by what made them, shared by every worker.

Keys say exactly what the tokens depend on: the video's bytes (or a live stream and time bucket), the
model id and revision, and a canonical hash of every setting that changes the tokens. Values are
``MergedTokens.to_bytes()`` (safetensors, never pickle: the cache is shared, and unpickling is code
execution), validated on every read; a corrupt, foreign or partly evicted value is a miss, never a crash.

Large values are split into fixed-size byte parts, each under its own key, plus a small manifest under the
entry's key (part count, length, sha256). Splitting bytes rather than frames keeps every part exact: after
temporal merging one row can stand for positions in several frames, so a per-frame split would have to
duplicate or cross-reference rows. All keys of an entry are written in one MULTI/EXEC transaction with the
same TTL, so a reader never sees half a write; part keys carry the value's checksum, so a reader never mixes
the parts of two writes either. A read is two round trips (the manifest, then one MGET of all parts); a
missing part (expired, evicted by LRU, replaced meanwhile) is a miss.

``TokenCache`` is a plain class so it can be used directly or wrapped as a Ray actor with
``ray.remote(TokenCache)``: its constructor takes only a URL and numbers.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple

import redis

from dymu.errors import DymuError
from dymu.tokens import SCHEMA_VERSION, InvalidTokens, MergedTokens
from workers.redis_server import CacheUnavailable, connect_redis, redact_url

logger = logging.getLogger(__name__)

KEY_PREFIX = "dymu:tok:v1:"
DEFAULT_TTL_S = 7 * 24 * 3600
DEFAULT_PART_BYTES = 4 << 20
_READ_CHUNK_BYTES = 1 << 20
_MAX_PARTS = 1 << 16


def content_hash(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes, read in chunks: the same video under any name has the same hash."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_READ_CHUNK_BYTES):
                digest.update(chunk)
    except OSError as exc:
        raise DymuError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return digest.hexdigest()


def live_source_id(stream_id: str, time_s: float, bucket_s: float) -> str:
    """Source id of a live feed's window: the stream and which ``bucket_s``-long time bucket ``time_s`` is in."""
    if bucket_s <= 0:
        raise ValueError(f"bucket_s must be positive, got {bucket_s}")
    stream_digest = hashlib.sha256(stream_id.encode()).hexdigest()[:16]
    return f"live-{stream_digest}-{bucket_s:g}s-{math.floor(time_s / bucket_s)}"


def settings_hash(settings: Mapping[str, Any]) -> str:
    """sha256 (hex) of a JSON-able mapping as sorted, compact JSON: equal dicts hash equal in any key order."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def token_cache_key(source_id: str, model_id: str, revision: str, settings: Mapping[str, Any]) -> str:
    """The cache key for tokens of ``source_id`` (a ``content_hash`` or ``live_source_id``).

    ``settings`` must hold everything else that changes the tokens (frames sampled, preset, thresholds,
    resolution, dtype...); it is hashed together with the model id, its revision and the schema version.
    """
    made_with = {"model_id": model_id, "revision": revision, "schema": SCHEMA_VERSION, "settings": dict(settings)}
    return f"{KEY_PREFIX}{source_id}:{settings_hash(made_with)[:32]}"


class _Manifest(NamedTuple):
    """What the entry's own key holds: how to find and check its parts."""

    parts: int
    total_bytes: int
    sha256: str

    def part_keys(self, key: str) -> list[str]:
        # Named after the value's checksum: a reader that read this manifest only ever reads this value's
        # parts, even if another writer replaces the entry meanwhile.
        return [f"{key}:part:{self.sha256[:16]}:{index}" for index in range(self.parts)]

    def to_json(self) -> str:
        return json.dumps({"parts": self.parts, "bytes": self.total_bytes, "sha256": self.sha256})

    @classmethod
    def from_json(cls, raw: bytes) -> "_Manifest":
        try:
            fields = json.loads(raw)
            manifest = cls(int(fields["parts"]), int(fields["bytes"]), str(fields["sha256"]))
        except (ValueError, KeyError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
            raise InvalidTokens(f"not a token-cache manifest: {exc}") from exc
        # Bounded so that a foreign manifest cannot make us queue millions of reads.
        if not 1 <= manifest.parts <= _MAX_PARTS:
            raise InvalidTokens(f"not a token-cache manifest: part count {manifest.parts}")
        return manifest


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    corrupt: int = 0  # misses caused by a value that failed validation (and was deleted)
    bytes_written: int = 0
    bytes_read: int = 0


class TokenCache:
    """Merged tokens in Redis under ``token_cache_key`` keys, with a TTL on every write.

    Every Redis failure (server gone, timeout, out of memory) raises ``CacheUnavailable``, so the caller
    can decide to go on without a cache; a bad value is never an error, only a miss.
    """

    def __init__(
        self,
        redis_url: str,
        ttl_s: int = DEFAULT_TTL_S,
        part_bytes: int = DEFAULT_PART_BYTES,
        timeout_s: float = 2.0,
    ):
        if ttl_s <= 0 or part_bytes <= 0:
            raise ValueError("ttl_s and part_bytes must be positive")
        self.url = redis_url
        self.ttl_s = ttl_s
        self.part_bytes = part_bytes
        self._client = connect_redis(redis_url, timeout_s=timeout_s)
        self._stats = CacheStats()

    def stats(self) -> CacheStats:
        return replace(self._stats)

    def put(self, key: str, tokens: MergedTokens, ttl_s: int | None = None) -> int:
        """Store ``tokens`` under ``key`` (replacing any value); returns the bytes written."""
        data = tokens.to_bytes()
        view = memoryview(data)
        parts = [view[i : i + self.part_bytes] for i in range(0, len(data), self.part_bytes)]
        if len(parts) > _MAX_PARTS:
            raise ValueError(f"{len(data)} bytes need more than {_MAX_PARTS} parts of {self.part_bytes} bytes")
        manifest = _Manifest(len(parts), len(data), hashlib.sha256(data).hexdigest())
        ttl = ttl_s or self.ttl_s
        with self._redis_errors("write", key):
            replaced = self._manifest_or_none(key)
            # One transaction: no reader sees the manifest before all its parts, and the parts of the value
            # this one replaces go with it (a reader still holding the old manifest then sees a miss).
            pipe = self._client.pipeline(transaction=True)
            for part_key, part in zip(manifest.part_keys(key), parts):
                pipe.set(part_key, part, ex=ttl)
            pipe.set(key, manifest.to_json(), ex=ttl)
            if replaced is not None and replaced.sha256 != manifest.sha256:
                pipe.delete(*replaced.part_keys(key))
            pipe.execute()
        self._stats.bytes_written += len(data)
        return len(data)

    def get(self, key: str) -> MergedTokens | None:
        """The tokens under ``key``, or ``None`` on a miss (absent, expired, partly evicted, or invalid)."""
        try:
            with self._redis_errors("read", key):
                data = self._read_value(key)
            tokens = MergedTokens.from_bytes(data) if data is not None else None
        except InvalidTokens as exc:
            logger.warning("token cache: dropping invalid value under %s: %s", key, exc)
            self._stats.corrupt += 1
            tokens = None
            with self._redis_errors("delete", key):
                self._delete(key)
        if tokens is None:
            self._stats.misses += 1
            return None
        self._stats.hits += 1
        self._stats.bytes_read += len(data)
        return tokens

    def exists(self, key: str) -> bool:
        """Whether an entry's manifest is present (cheap; its parts are only checked by ``get``)."""
        with self._redis_errors("check", key):
            return bool(self._client.exists(key))

    def delete(self, key: str) -> bool:
        """Remove an entry and all its parts; returns whether anything was there."""
        with self._redis_errors("delete", key):
            return self._delete(key)

    def close(self) -> None:
        self._client.close()

    def _read_value(self, key: str) -> bytes | None:
        """The entry's bytes checked against its manifest, None if absent or a part is gone; raises
        ``InvalidTokens`` if the entry is not one of ours or is damaged."""
        manifest = self._read_manifest(key)
        if manifest is None:
            return None
        parts = self._client.mget(manifest.part_keys(key))
        if any(part is None for part in parts):
            # Expired, evicted, or replaced since we read the manifest: the next put repairs the entry.
            logger.info("token cache: %s is missing a part, treating it as a miss", key)
            return None
        data = b"".join(parts)
        if len(data) != manifest.total_bytes or hashlib.sha256(data).hexdigest() != manifest.sha256:
            raise InvalidTokens("the parts do not match the manifest's length and checksum")
        return data

    def _read_manifest(self, key: str) -> _Manifest | None:
        try:
            raw = self._client.get(key)
        except redis.ResponseError as exc:  # a foreign value of another Redis type (hash, list...)
            raise InvalidTokens(f"not a string value: {exc}") from exc
        return None if raw is None else _Manifest.from_json(raw)

    def _manifest_or_none(self, key: str) -> _Manifest | None:
        """The entry's manifest, or None if it has none or an unreadable one."""
        try:
            return self._read_manifest(key)
        except InvalidTokens:
            return None

    def _delete(self, key: str) -> bool:
        manifest = self._manifest_or_none(key)
        part_keys = manifest.part_keys(key) if manifest else []
        return self._client.delete(key, *part_keys) > 0

    @contextmanager
    def _redis_errors(self, action: str, key: str) -> Iterator[None]:
        try:
            yield
        except redis.RedisError as exc:
            raise CacheUnavailable(f"token cache at {redact_url(self.url)} failed to {action} {key}: {exc}") from exc
