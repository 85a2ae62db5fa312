"""The FastAPI ingress as a Ray Serve deployment: OpenAI's chat completions with video and image input.

    POST /v1/chat/completions   plain, or ``stream: true`` as server-sent events in OpenAI's chunk format
    GET  /v1/models             the one model this server runs
    GET  /health                ok, and an LLM replica's running / waiting requests
    GET  /metrics               Prometheus text: requests, time to first token, latency, visual tokens, cache

One Serve application of three deployments: this ingress (it fetches and reads the media, CPU work in
threads), the vision encoder and the LLM engine (``deployments``), which it calls through deployment handles
(``Backend``; the token-cache actor it starts itself). ``build_app`` sizes and binds them. ``/v1/*`` needs
``Authorization: Bearer KEY`` when the server has a key. A client that goes away mid-answer has its request
cancelled in the LLM engine.
"""
# No "from __future__ import annotations": FastAPI reads the endpoints' annotations (Request) as objects.

import asyncio
import hmac
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.exceptions import HTTPException as StarletteHTTPException

from dymu.config import VideoQAConfig, make_config
from dymu.errors import DymuError
from dymu.videoqa import Answer
from pipeline.jobs import plan_resources
from pipeline.serve.backend import Backend, cause
from pipeline.serve.deployments import EncoderDeployment, LLMDeployment
from pipeline.serve.media import Fetched, MediaFetcher, MediaLimits, Sampling, read_fetched, source_id
from pipeline.serve.protocol import (ApiError, ChatRequest, StreamText, chunk, completion, completion_id,
                                     finish_reason, parse_request, read_prompt, usage)

log = logging.getLogger(__name__)


@dataclass
class ServeSettings:
    """Everything the deployment needs; plain data, so Ray can ship it to the replica.

    config: the model and reductions (one preset per server). served_name: the ``model`` clients send.
    api_key: None = no key (then the CLI binds to loopback only). redis_url None: no token cache.
    encoders / llms: replicas of the encoder / LLM deployments; model_worker_cpus / _gpus: what each of those
    replicas takes (None: a share of the cluster, see ``replica_resources``); max_concurrency: the requests
    one LLM replica accepts at once (its engine batches up to the config's max_batch of them).
    max_request_bytes: the largest request body (inline media included); media_dir: the folder the
    ingress replicas keep their media folders in (None: the system's temp; the command removes it at exit).
    """

    config: VideoQAConfig
    served_name: str
    api_key: str | None = None
    limits: MediaLimits = field(default_factory=MediaLimits)
    redis_url: str | None = None
    cache_node: str | None = None
    encoders: int = 1
    llms: int = 1
    model_worker_cpus: float | None = None
    model_worker_gpus: float | None = None
    max_concurrency: int = 64
    supports_video: bool = True
    max_request_bytes: int = 32 << 20
    media_dir: str | None = None


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dymu_serve_requests", "chat requests by outcome", ["status"], registry=r)
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
        self.first_token = Histogram("dymu_serve_time_to_first_token_seconds", "request to first text", buckets=buckets,
                                     registry=r)
        self.latency = Histogram("dymu_serve_request_seconds", "request to finished answer", buckets=buckets,
                                 registry=r)
        self.visual = Counter("dymu_serve_visual_tokens", "visual tokens before / after the reductions", ["stage"],
                              registry=r)
        self.cache = Counter("dymu_serve_token_cache", "token-cache lookups by result", ["result"], registry=r)
        self.completion_tokens = Counter("dymu_serve_completion_tokens", "tokens written", registry=r)


api = FastAPI(title="dymu-video", description="OpenAI-compatible chat completions about videos and images")


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    error = ApiError(exc.status_code, str(exc.detail), "not_found" if exc.status_code == 404 else None)
    return JSONResponse(error.body(), status_code=exc.status_code)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """Not the client's fault: logged with its traceback, answered in OpenAI's shape."""
    log.error("request failed", exc_info=exc)
    error = ApiError(500, f"internal error: {type(exc).__name__}", "internal_error")
    return JSONResponse(error.body(), status_code=500)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than the server's limit of {limit} bytes (--max-request-mb)",
                    "request_too_large")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it is known to be over ``limit`` bytes: from its Content-Length
    before a byte is read, or while a chunked body is read (never more than a chunk past the limit)."""
    try:
        declared = int(request.headers.get("content-length") or 0)
    except ValueError:
        raise ApiError(400, "the Content-Length header is not a number", "invalid_request") from None
    if declared > limit:
        raise _too_large(limit)
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise _too_large(limit)
        parts.append(part)
    return b"".join(parts)


class ChatService:
    """The ingress's endpoints (``ChatServer`` is this class as a Serve deployment)."""

    def __init__(self, settings: ServeSettings, encoder: DeploymentHandle, llm: DeploymentHandle):
        self.settings = settings
        self.backend = Backend(settings.config, encoder, llm, settings.redis_url, settings.cache_node)
        self.fetcher = MediaFetcher(settings.limits, parent_dir=settings.media_dir)
        self.metrics = Metrics()
        self.created = int(time.time())

    def __del__(self) -> None:
        # Serve calls this when it stops the replica (serve.shutdown, a redeploy): the media folder goes with it.
        fetcher = getattr(self, "fetcher", None)
        if fetcher is not None:
            fetcher.close()

    # --- endpoints -----------------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.settings.served_name, "llm": await self.backend.stats()}

    @api.get("/metrics")
    async def metrics_text(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type="text/plain; version=0.0.4")

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {"object": "list", "data": [{"id": self.settings.served_name, "object": "model",
                                            "created": self.created, "owned_by": "dymu-video"}]}

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Any:
        try:
            return await self._chat(request)
        except ApiError as exc:
            self.metrics.requests.labels(status=str(exc.status)).inc()
            raise

    # --- one request ---------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not given.startswith("Bearer "):
            raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY'", "missing_api_key")
        if not hmac.compare_digest(given[len("Bearer "):].strip().encode(), key.encode()):
            raise ApiError(401, "incorrect API key", "invalid_api_key")

    async def _chat(self, request: Request) -> Any:
        started = time.perf_counter()
        self._authorize(request)  # before anything else, streaming or not
        chat = parse_request(await read_body(request, self.settings.max_request_bytes))
        if chat.model != self.settings.served_name:
            raise ApiError(404, f"the model {chat.model!r} does not exist here; this server runs "
                                f"{self.settings.served_name!r}", "model_not_found", "model")
        sampling = self._sampling(chat)
        prompt = read_prompt(chat)
        fetch_started = time.perf_counter()
        files: list[Fetched] = []
        try:
            for _, url in prompt.media:
                files.append(await self.fetcher.fetch(url))
            seconds = {"fetch": time.perf_counter() - fetch_started}
            tokens, cache, token_seconds = await self._tokens(files, sampling)
        finally:  # the tokens are made (or the media refused): the files may go once the cache needs room
            self.fetcher.release(files)
        seconds |= token_seconds
        self.metrics.cache.labels(result=cache["status"]).inc()
        pieces = self.backend.stream(tokens, prompt.question, source_id(files), chat.options())
        try:
            first = await self._next(pieces)  # a prompt over the context fails here, before any 200 is sent
        except BaseException:
            pieces.cancel()
            raise
        self.metrics.first_token.observe(time.perf_counter() - started)
        cid = completion_id()
        if chat.stream:
            return StreamingResponse(self._events(chat, cid, pieces, first, cache, seconds, started),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            item = first
            while not isinstance(item, Answer):
                item = await self._next(pieces)
        finally:
            pieces.cancel()  # a no-op once it finished; otherwise (the client went away) the engine drops it
        return completion(cid, self.settings.served_name, item.text, finish_reason(item.report["llm"]["stop_reason"]),
                          self._usage(item, cache, seconds, started))

    async def _tokens(self, files: list[Fetched], sampling: Sampling) -> tuple[Any, dict[str, Any], dict[str, float]]:
        async def read() -> Any:
            return await asyncio.to_thread(read_fetched, files, sampling, self.settings.limits,
                                           self.settings.supports_video)

        try:
            return await self.backend.tokens(source_id(files), sampling, read)
        except ApiError:  # media the server refuses (not a video, too long, the encoder's refusal) are not kept
            self.fetcher.release(files, refused=True)
            files.clear()
            raise

    def _sampling(self, chat: ChatRequest) -> Sampling:
        config, limits, knobs = self.settings.config, self.settings.limits, chat.dymu
        if knobs.preset is not None and knobs.preset != config.preset:
            raise ApiError(400, f"this server runs preset {config.preset!r}, not {knobs.preset!r} (start a server "
                                f"with --preset {knobs.preset} for it)", "preset_not_served", "dymu.preset")
        max_frames = min(config.max_frames, limits.max_frames)
        if knobs.frames is not None and knobs.frames > max_frames:
            raise ApiError(400, f"dymu.frames={knobs.frames} is more than the server's limit of {max_frames}",
                           "too_many_frames", "dymu.frames")
        fps = knobs.fps if knobs.fps is not None else (config.fps if knobs.frames is None else None)
        return Sampling(knobs.frames or config.num_frames, fps, max_frames)

    async def _next(self, pieces: DeploymentResponseGenerator) -> Any:
        try:
            return await pieces.__anext__()
        except StopAsyncIteration:
            raise RuntimeError("the LLM deployment's stream ended without an answer") from None
        except ray.exceptions.RayTaskError as exc:
            if isinstance(cause(exc), DymuError):
                message = str(cause(exc))
                code = "context_length_exceeded" if "context" in message else "invalid_request"
                raise ApiError(400, message, code, "messages") from None
            raise

    async def _events(self, chat: ChatRequest, cid: str, pieces: DeploymentResponseGenerator, first: Any,
                      cache: dict[str, Any], seconds: dict[str, float], started: float) -> AsyncIterator[str]:
        model, created = self.settings.served_name, int(time.time())
        text = StreamText(chat.options().get("stop", []))
        try:
            yield chunk(cid, model, created, {"role": "assistant", "content": ""})
            item = first
            while not isinstance(item, Answer):
                if delta := text.add(item):
                    yield chunk(cid, model, created, {"content": delta})
                item = await self._next(pieces)
            if rest := text.finish(item.text):
                yield chunk(cid, model, created, {"content": rest})
            yield chunk(cid, model, created, {}, finish_reason(item.report["llm"]["stop_reason"]),
                        self._usage(item, cache, seconds, started))
            yield "data: [DONE]\n\n"
        except ApiError as exc:  # the status line is gone: the error goes as an event
            yield f"data: {JSONResponse(exc.body()).body.decode()}\n\n"
        finally:  # also when the client went away mid-answer (the task is cancelled here)
            pieces.cancel()

    def _usage(self, answer: Answer, cache: dict[str, Any], seconds: dict[str, float], started: float) -> dict:
        # The worker's stages that ran for this request (a token-cache hit zeroes read and encode).
        seconds = seconds | {k: v for k, v in answer.report["seconds"].items() if v > 0}
        seconds["total"] = time.perf_counter() - started
        body = usage(answer.report, cache, seconds)
        visual = body["dymu"]["visual_tokens"]
        self.metrics.requests.labels(status="200").inc()
        self.metrics.latency.observe(seconds["total"])
        self.metrics.visual.labels(stage="before").inc(visual["llm_positions"])
        self.metrics.visual.labels(stage="after").inc(visual["after_temporal"])
        self.metrics.completion_tokens.inc(body["completion_tokens"])
        return body


ChatServer = serve.deployment(name="DymuChat", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)(
    serve.ingress(api)(ChatService))


def replica_resources(settings: ServeSettings) -> dict[str, float]:
    """``ray_actor_options`` of one encoder or LLM replica: ``--model-worker-cpus`` / ``--model-worker-gpus``
    when given, else an equal share of the cluster Ray is connected to (a GPU each when it has GPUs, see
    ``pipeline.jobs.plan_resources``), or one CPU when building the application without Ray."""
    if ray.is_initialized():
        _, planned = plan_resources(ray.cluster_resources(), ray.available_resources(), 0,
                                    settings.encoders + settings.llms, settings.model_worker_cpus)
    else:
        planned = {"num_cpus": settings.model_worker_cpus or 1.0}
    if settings.model_worker_gpus is not None:
        planned["num_gpus"] = settings.model_worker_gpus
    return planned


def build_app(settings: ServeSettings, replicas: int = 1) -> serve.Application:
    """The ingress (``replicas`` of it) bound to the encoder and LLM deployments, sized by ``settings``."""
    resources = replica_resources(settings)
    threads = max(1, int(resources["num_cpus"]))  # torch's CPU threads in each model replica
    encoder = EncoderDeployment.options(num_replicas=settings.encoders, ray_actor_options=resources)
    llm = LLMDeployment.options(num_replicas=settings.llms, ray_actor_options=resources,
                                max_ongoing_requests=settings.max_concurrency)
    return ChatServer.options(num_replicas=replicas).bind(
        settings, encoder.bind(settings.config, threads), llm.bind(settings.config, threads))


def app_builder(args: dict[str, Any]) -> serve.Application:
    """The application for ``serve deploy`` / ``serve run`` (configs/serve.yaml): ``args`` are the CLI's options
    by name (model, preset, api_key_env, allowed_media_dir, allow_private_urls, max_media_mb, ...)."""
    return build_app(settings_from_options(**args))


def settings_from_options(model: str, preset: str = "mid", served_name: str | None = None,
                          api_key: str | None = None, api_key_env: str = "DYMU_API_KEY",
                          allowed_media_dir: str | None = None, allow_private_urls: bool = False,
                          max_media_mb: float = 64, max_video_seconds: float = 3600, max_frames: int = 64,
                          fetch_timeout: float = 30, redis_url: str | None = None, encoders: int = 1, llms: int = 1,
                          model_worker_cpus: float | None = None, model_worker_gpus: float | None = None,
                          max_concurrency: int = 64, max_request_mb: float = 32, media_cache_mb: float = 1024,
                          media_dir: str | None = None,
                          config_file: str | None = None, **overrides: Any) -> ServeSettings:
    """Validated settings from plain options (raises ``DymuError`` with the reason; nothing starts)."""
    from workers.frame_decoder import family_supports_video

    config = make_config(preset, config_file, model=model, **overrides)
    limits = MediaLimits(int(max_media_mb * (1 << 20)), max_video_seconds, max_frames, fetch_timeout,
                         allowed_media_dir and os.path.realpath(allowed_media_dir), allow_private_urls,
                         int(media_cache_mb * (1 << 20)))
    limits.check()
    if max_request_mb <= 0:
        raise DymuError("--max-request-mb must be positive")
    if min(encoders, llms, max_concurrency) < 1:
        raise DymuError("--encoders, --llms and --max-concurrency must be >= 1")
    if (model_worker_cpus is not None and model_worker_cpus <= 0) or (model_worker_gpus or 0) < 0:
        raise DymuError("--model-worker-cpus must be positive and --model-worker-gpus not negative")
    return ServeSettings(config=config, served_name=served_name or model, api_key=api_key or os.environ.get(api_key_env)
                         or None, limits=limits, redis_url=redis_url or os.environ.get("REDIS_URL") or None,
                         encoders=encoders, llms=llms, model_worker_cpus=model_worker_cpus,
                         model_worker_gpus=model_worker_gpus,
                         max_concurrency=max_concurrency, max_request_bytes=int(max_request_mb * (1 << 20)),
                         media_dir=media_dir, supports_video=family_supports_video(config.model, config.revision))


__all__ = ["ServeSettings", "ChatService", "ChatServer", "read_body", "build_app", "replica_resources", "app_builder",
           "settings_from_options"]
