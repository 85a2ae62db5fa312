"""The pipelined runner: video questions through decoder, encoder and LLM actors, with the token cache.

    with open_runtime() as runtime, Pipeline(config, runtime.redis_url) as pipeline:
        for result in pipeline.run([Job("a.mp4", "What happens?"), Job("b.mp4", "What happens?")]):
            print(result.job.path, result.answer.text if result.ok else result.error)

Each job is one short, sequential function (hash -> cache lookup -> decode -> encode -> answer) run by one
of a bounded set of driver threads. A job borrows a free actor of a stage for one call and gives it back,
so the stages overlap across jobs: while the LLM answers job i, the encoder works on job i+1 and the
decoders on the jobs after. The encoder and LLM workers batch: each is lent to several jobs at once and
runs their calls together (frames of several videos in one encoder batch, answers in one engine batch). The thread count bounds what is in flight: at most that many jobs hold frames
or tokens in Ray's object store, however long the archive. Frames and tokens travel between actors by
reference; the driver only fetches small summaries and the answer.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from dymu.errors import DymuError
from dymu.config import VideoQAConfig
from dymu.videoqa import Answer
from workers.cache_worker import CacheWorker
from workers.frame_decoder import FrameDecoder
from workers.llm_worker import LLMWorker
from workers.token_cache import DEFAULT_TTL_S, token_cache_key
from workers.vision_encoder import VisionEncoder

log = logging.getLogger(__name__)

# A crashed actor (a decoder killed by a bad file, a worker node lost) is restarted for the next jobs.
_MAX_RESTARTS = 2


@dataclass(frozen=True)
class Job:
    path: str
    question: str


@dataclass
class JobResult:
    """One job's answer, or the error that stopped it; ``cache`` says whether its tokens came from the cache.

    cache: ``{"status": "hit" | "miss" | "off" | "unavailable", ...}``; a hit also has ``lookup_seconds``
        (hashing the file and reading the tokens) and ``saved_seconds`` (what decoding and encoding first
        cost, less that lookup).
    seconds: the job's wall time, from its start to the finished answer.
    """

    job: Job
    answer: Answer | None = None
    error: str | None = None
    exception: BaseException | None = None
    cache: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def plan_resources(
    cluster: Mapping[str, float], available: Mapping[str, float], decoders: int, model_workers: int,
    model_worker_cpus: float | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """Ray resource requests for one frame decoder and one model worker (a vision encoder or an LLM).

    Every actor asks for an equal share of the free CPUs, at most one (a decoder keeps one core busy), so
    that the whole pipeline fits even a small cluster; ``model_worker_cpus`` asks for more for the model
    workers (their torch threads) on CPU-only clusters. Model workers take a GPU each when the cluster has
    GPUs, or an equal share of them when it has fewer GPUs than model workers.
    """
    # Rounded down to Ray's granularity, so that the shares never add up to more than there is.
    share = max(0.01, math.floor(100 * min(1.0, available.get("CPU", 0.0) / (decoders + model_workers))) / 100)
    decoder = {"num_cpus": share}
    model = {"num_cpus": model_worker_cpus or share}
    gpus = cluster.get("GPU", 0.0)
    if gpus > 0:
        model["num_gpus"] = round(min(1.0, gpus / model_workers), 2)
    return decoder, model


def encoder_capacity(config: VideoQAConfig) -> int:
    """Jobs one vision encoder is lent at once: two batches' worth of videos (``encode_batch_frames`` over
    the frames a video has at most), so that the next batch has queued by the time one ends."""
    frames = config.num_frames if config.fps is None else config.max_frames
    return 2 * max(1, config.encode_batch_frames // max(frames, 1))


class _Stage:
    """The actors of one stage. A job borrows a free one for a call, so no job queues behind a slow one.
    An actor that serves ``capacity`` calls at once (the LLM worker's batch) is lent that many times."""

    def __init__(self, actors: list[Any], capacity: int = 1):
        self.actors = actors
        self._free: queue.Queue = queue.Queue()
        for _ in range(capacity):
            for actor in actors:
                self._free.put(actor)

    @contextmanager
    def borrow(self) -> Iterator[Any]:
        actor = self._free.get()
        try:
            yield actor
        finally:
            self._free.put(actor)


def fetch(ref: Any) -> Any:
    """``ray.get``, raising a ``DymuError`` a worker raised (bad input) as itself rather than wrapped in
    Ray's task error with the worker's traceback, so that it reads as one clear line."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, DymuError):
            raise exc.cause from None
        raise


def fetch_summary(summary: Any, value: Any) -> Any:
    """The summary of a call that returned (summary, value) refs. When the call failed, the value's ref is
    read too (the same error) so that Ray does not print it later as an error nobody looked at."""
    try:
        return fetch(summary)
    except Exception:
        with suppress(Exception):
            ray.get(value)
        raise


def error_message(exc: BaseException) -> str:
    """One line for a job's error: a bad input's own message, or the type and message of anything else."""
    if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
        exc = exc.cause
    text = str(exc) if isinstance(exc, DymuError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:1000]


class Pipeline:
    """Decoder, encoder, LLM and token-cache actors for one config, and the runner that feeds them.

    redis_url: the token cache (None: no cache). decoders / encoders / llms: actors per stage.
    max_in_flight: jobs in the pipeline at once (default: one per decoder, ``encoder_capacity`` per encoder
        and ``max_batch`` per LLM worker so that their batches stay full, plus two waiting their turn).
    model_worker_cpus: CPUs (and torch threads) per model worker; default a share of the free CPUs.
    Both model workers load the checkpoint, each in its own process. Call ``close()`` (or use ``with``).
    """

    def __init__(
        self,
        config: VideoQAConfig,
        redis_url: str | None = None,
        decoders: int = 2,
        encoders: int = 1,
        llms: int = 1,
        max_in_flight: int | None = None,
        model_worker_cpus: float | None = None,
        cache_ttl_s: int = DEFAULT_TTL_S,
    ):
        if min(decoders, encoders, llms) < 1:
            raise DymuError("the pipeline needs at least one decoder, one encoder and one LLM worker")
        self.config = config
        encoder_jobs = encoder_capacity(config)
        self.max_in_flight = max_in_flight or decoders + encoders * encoder_jobs + llms * config.max_batch + 2
        decoder_res, model_res = plan_resources(
            ray.cluster_resources(), ray.available_resources(), decoders, encoders + llms, model_worker_cpus)
        threads = max(1, int(model_res["num_cpus"]))
        log.info("pipeline: %d decoder(s) %s, %d encoder(s) and %d LLM worker(s) %s",
                 decoders, decoder_res, encoders, llms, model_res)
        self.decoders = _Stage([self._actor(FrameDecoder, decoder_res, config) for _ in range(decoders)])
        self.encoders = _Stage([self._actor(VisionEncoder, model_res, config, threads) for _ in range(encoders)],
                               capacity=encoder_jobs)
        self.llms = _Stage([self._actor(LLMWorker, model_res, config, threads) for _ in range(llms)],
                           capacity=config.max_batch)
        self.cache = None
        self.cache_state = "off"
        self.cache_problem = ""
        if redis_url is not None:
            # On the driver's node: whatever Redis the driver reached (even a 127.0.0.1 one), it reaches.
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            self.cache = ray.remote(CacheWorker).options(num_cpus=0, scheduling_strategy=here).remote(
                redis_url, config.model, cache_ttl_s)
            self.cache_state = "on"
        self._settings: dict[str, Any] | None = None
        self._lock = threading.Lock()

    @staticmethod
    def _actor(cls: type, resources: dict[str, float], *args: Any) -> Any:
        return ray.remote(cls).options(**resources, max_restarts=_MAX_RESTARTS).remote(*args)

    def _all_actors(self) -> list[Any]:
        extra = [self.cache] if self.cache is not None else []
        return self.decoders.actors + self.encoders.actors + self.llms.actors + extra

    def wait_ready(self) -> None:
        """Block until every actor has started (models loaded)."""
        ray.get([actor.__ray_ready__.remote() for actor in self._all_actors()])

    def close(self) -> None:
        for actor in self._all_actors():
            ray.kill(actor, no_restart=True)

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- the cache key's settings ----------------------------------------------------------------------
    def _resolve_settings(self, jobs: Sequence[Job]) -> None:
        """Settle the DToMe thresholds of every encoder before the jobs start, and with them the settings
        that name tokens in the cache.

        A model with no thresholds yet has them calibrated on the first video that decodes, the same
        frames for every encoder (the first one saves them to the thresholds cache, the others find them
        there or calibrate on the same frames), so every encoder merges alike.
        """
        if self._settings is not None:
            return
        self.wait_ready()  # so that no job's timings include an actor starting
        encoders = self.encoders.actors
        settings = fetch([encoder.cache_settings.remote() for encoder in encoders])
        if any(s is None for s in settings):
            media = self._first_readable(jobs)
            if media is None:
                return  # nothing decodes: every job will report its own error
            settings = [fetch(encoder.cache_settings.remote(media)) for encoder in encoders]
        if any(s != settings[0] for s in settings):
            log.warning("the encoders disagree on their DToMe thresholds; cached tokens are keyed by the first's")
        self._settings = settings[0]

    def _first_readable(self, jobs: Sequence[Job], attempts: int = 8) -> Any:
        for job in jobs[:attempts]:
            with self.decoders.borrow() as decoder:
                summary, media = decoder.read.remote(job.path)
                try:
                    fetch_summary(summary, media)
                except (DymuError, ray.exceptions.RayError):  # a bad file: the next one may do
                    continue
            return media
        return None

    # --- one job -------------------------------------------------------------------------------------
    def _cache_lost(self, reason: str) -> None:
        with self._lock:
            if self.cache_state == "on":
                self.cache_state, self.cache_problem = "unavailable", reason
                log.warning("the token cache became unavailable, going on without it: %s", reason)

    def _cache_key(self, path: str) -> str | None:
        if self.cache_state != "on" or self._settings is None:
            return None
        with self.decoders.borrow() as decoder:
            source = fetch(decoder.content_hash.remote(path))
        return token_cache_key(source, self.config.model, self.config.revision or "", self._settings)

    def _cache_status(self, ref: Any, twin: Any = None) -> dict[str, Any]:
        """A cache call's status; a cache that fails in any way is marked unavailable, never a job's error."""
        try:
            status = fetch_summary(ref, twin) if twin is not None else fetch(ref)
        except Exception as exc:  # the cache actor itself died, or worse: still only the cache
            status = {"status": "unavailable", "reason": error_message(exc)}
        if status["status"] == "unavailable":
            self._cache_lost(status["reason"])
        return status

    def _tokens(self, job: Job) -> tuple[Any, dict[str, Any], Any]:
        """(tokens ref, cache status, pending cache write or None) for the job's video."""
        started = time.perf_counter()
        key = self._cache_key(job.path)
        if key is not None:
            found, tokens = self.cache.get.remote(key)
            found = self._cache_status(found, tokens)
            lookup = time.perf_counter() - started
            if found["status"] == "hit":
                saved = found["made_in_seconds"] - lookup
                return tokens, {"status": "hit", "lookup_seconds": lookup, "saved_seconds": saved}, None
            if found["status"] == "unavailable":
                key = None
        with self.decoders.borrow() as decoder:
            decoded, media = decoder.read.remote(job.path)
            fetch_summary(decoded, media)  # a bad file fails here, with its own error
        with self.encoders.borrow() as encoder:
            encoded, tokens = encoder.encode.remote(media)
            fetch_summary(encoded, tokens)
        status = "miss" if key is not None else ("off" if self.cache is None else "unavailable")
        store = self.cache.put.remote(key, tokens) if key is not None else None
        return tokens, {"status": status}, store

    def _answer(self, tokens: Any, job: Job, on_text: Callable[[str], None] | None) -> Answer:
        with self.llms.borrow() as llm:
            if on_text is None or ray.util.client.ray.is_connected():
                # Ray Client (a ray:// address) has no streaming generators: the answer comes in one piece.
                answer = fetch(llm.answer.remote(tokens, job.question, job.path))
                if on_text is not None:
                    on_text(answer.text)
                return answer
            for ref in llm.stream.remote(tokens, job.question, job.path):
                item = fetch(ref)
                if isinstance(item, Answer):
                    return item
                on_text(item)
        raise RuntimeError("the LLM worker's stream ended without an answer")

    def _run_job(self, job: Job, on_text: Callable[[str], None] | None = None) -> JobResult:
        started = time.perf_counter()
        try:
            tokens, cache, store = self._tokens(job)
            answer = self._answer(tokens, job, on_text)
            if store is not None:  # written while the LLM answered
                stored = self._cache_status(store)
                if stored["status"] == "unavailable":  # Redis went away while this job was in flight
                    cache = {"status": "unavailable", "lookup": cache["status"], "reason": stored["reason"]}
        except Exception as exc:  # one job's failure is its own result, never the batch's
            if isinstance(exc, DymuError):
                log.info("%s: %s", job.path, exc)
            else:  # not the input's fault: keep the traceback for whoever debugs it
                log.warning("job %s failed", job.path, exc_info=exc)
            return JobResult(job, error=error_message(exc), exception=exc, seconds=time.perf_counter() - started)
        answer.report["cache"] = cache
        return JobResult(job, answer=answer, cache=cache, seconds=time.perf_counter() - started)

    # --- what callers run ----------------------------------------------------------------------------
    def run(self, jobs: Sequence[Job]) -> Iterator[JobResult]:
        """Run ``jobs`` through the pipeline; results come as jobs finish (roughly in order)."""
        self._resolve_settings(jobs)
        pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="dymu-job")
        pending: set[Future] = set()
        try:
            for job in jobs:
                if len(pending) >= self.max_in_flight:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    yield from (future.result() for future in done)
                pending.add(pool.submit(self._run_job, job))
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (future.result() for future in done)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def ask(self, path: str, question: str, on_text: Callable[[str], None] | None = None) -> JobResult:
        """One question, its answer streamed to ``on_text`` as it is written; a failure raises its error."""
        job = Job(str(path), question)
        self._resolve_settings([job])
        result = self._run_job(job, on_text)
        if result.exception is not None:
            raise result.exception
        return result
