"""OpenAI's chat-completions format as we serve it: requests in, responses and SSE chunks out, errors.

Messages carry content parts ``text``, ``image_url`` and ``video_url``. The question is the text of the last
user message; the media may be in any user message. One request asks about one clip: one video, or one
image, or several images that are answered as the frames of one clip, in the order given (lmms-eval's
OpenAI-compatible model sends a video that way), at ``dymu.fps`` frames per second (default 1) for their
timestamps. A video and images together, or two videos, are refused.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from dymu.files import TooDeeplyNested, parse_json


class ApiError(Exception):
    """An error the client caused (or may retry): HTTP status plus OpenAI's error fields."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 422: "invalid_request_error", 500: "server_error"}

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Part):
    type: Literal["text"]
    text: str


class ImageURL(_Part):
    url: str


class ImagePart(_Part):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoPart(_Part):
    type: Literal["video_url"]
    video_url: ImageURL


ContentPart = TextPart | ImagePart | VideoPart
PART_TYPES = ("text", "image_url", "video_url")


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _known_part_types(cls, value: Any) -> Any:
        # Checked before the union: otherwise pydantic reports the str branch's error first, never the part.
        for i, part in enumerate(value if isinstance(value, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in PART_TYPES:
                given = f"type {kind!r}" if isinstance(part, dict) and "type" in part else "no type"
                raise PydanticCustomError(
                    "unknown_part_type", "content part {index} has {given}; the allowed types are {allowed}",
                    {"index": i, "given": given, "allowed": ", ".join(PART_TYPES)})
        return value


class DymuOptions(BaseModel):
    """Our knobs: the preset (must be one the server runs), frames sampled uniformly, or a sampling rate."""

    model_config = ConfigDict(extra="forbid")
    preset: str | None = None
    frames: int | None = Field(default=None, ge=1)
    fps: float | None = Field(default=None, gt=0)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI fields we do not use (n=1, user, ...) are accepted
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1)
    dymu: DymuOptions = Field(default_factory=DymuOptions)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return value

    def options(self) -> dict[str, Any]:
        """Generation overrides for the LLM worker (only those the client set)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        values = {"max_new_tokens": self.max_completion_tokens or self.max_tokens, "temperature": self.temperature,
                  "top_p": self.top_p, "seed": self.seed, "stop": stops or None}
        return {name: value for name, value in values.items() if value is not None}


def parse_request(raw: bytes) -> ChatRequest:
    """The request body as a ``ChatRequest``: 400 for JSON that does not parse (or nests too deeply to), 422
    for the wrong shape."""
    try:
        data = parse_json(raw, "the request body")  # under a nesting limit: deep nesting is a 400, not a crash
    except TooDeeplyNested as exc:
        raise ApiError(400, str(exc), "invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", "invalid_json") from None
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(422, f"invalid request: {where}: {first['msg']} ({exc.error_count()} error(s))",
                       "invalid_request", where or None) from None


@dataclass(frozen=True)
class Prompt:
    """What a request asks: the question and its media, as (kind, url) with kind "image" or "video"."""

    question: str
    media: list[tuple[str, str]]


def read_prompt(request: ChatRequest) -> Prompt:
    users = [m for m in request.messages if m.role == "user"]
    if not users:
        raise ApiError(400, "the request has no user message", "no_user_message", "messages")
    media: list[tuple[str, str]] = []
    for message in users:
        for part in message.content if isinstance(message.content, list) else []:
            if isinstance(part, ImagePart):
                media.append(("image", part.image_url.url))
            elif isinstance(part, VideoPart):
                media.append(("video", part.video_url.url))
    last = users[-1].content
    texts = [last] if isinstance(last, str) else [p.text for p in last or [] if isinstance(p, TextPart)]
    question = "\n".join(t for t in texts if t.strip()).strip()
    if not question:
        raise ApiError(400, "the last user message has no text (the question)", "no_question", "messages")
    kinds = [kind for kind, _ in media]
    if not media:
        raise ApiError(400, "the request has no image_url or video_url part: dymu answers about images and videos",
                       "no_media", "messages")
    if "video" in kinds and len(media) > 1:
        raise ApiError(400, "one request asks about one video (or one image, or images as the frames of one clip)",
                       "too_many_media", "messages")
    return Prompt(question, media)


class StreamText:
    """The text to send as an answer streams in, so that the sent pieces add up to the final answer.

    The worker's final text is stripped and cut before any stop string; pieces arrive raw. Whitespace and a
    tail that could start a stop string are held back until the next piece shows what they are.
    """

    def __init__(self, stop: list[str]):
        self.stop = stop
        self.text = ""  # everything received
        self.sent = 0  # characters of ``self.text`` sent (after the leading whitespace)
        self.start: int | None = None  # where the answer starts (first non-space character)
        self.stopped = False

    def add(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.text += piece
        if self.start is None:
            stripped = len(self.text) - len(self.text.lstrip())
            if stripped == len(self.text):
                return ""
            self.start = self.sent = stripped
        hits = [i for s in self.stop if (i := self.text.find(s, self.start)) >= 0]
        if hits:
            self.stopped = True
            end = len(self.text[: min(hits)].rstrip())
        else:
            end = len(self.text.rstrip())
            end -= max((_overlap(self.text[:end], s) for s in self.stop), default=0)
            end = len(self.text[:end].rstrip())
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def finish(self, final: str) -> str:
        """What is left to send once the final answer text is known."""
        sent = self.text[self.start: self.sent] if self.start is not None else ""
        return final[len(sent):] if final.startswith(sent) else ""


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``stop``."""
    return next((k for k in range(min(len(stop) - 1, len(text)), 0, -1) if text.endswith(stop[:k])), 0)


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def chunk(cid: str, model: str, created: int, delta: dict[str, Any], finish_reason: str | None = None,
          usage: dict[str, Any] | None = None) -> str:
    """One SSE event in OpenAI's ``chat.completion.chunk`` format."""
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


def completion(cid: str, model: str, text: str, finish_reason: str, usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage}


def finish_reason(stop_reason: str) -> str:
    """Our stop reasons in OpenAI's words: the answer ran out of room ("length") or ended ("stop")."""
    return "length" if stop_reason in ("max_new_tokens", "context_full") else "stop"


def usage(report: dict[str, Any], cache: dict[str, Any], seconds: dict[str, float]) -> dict[str, Any]:
    """OpenAI's token counts, plus ``dymu``: visual tokens after each reduction, cache hits, time per stage."""
    tokens, llm = report["tokens"], report["llm"]
    prompt = llm["virtual_length"]
    frames = report["frames"]
    return {
        "prompt_tokens": prompt,
        "completion_tokens": llm["answer_tokens"],
        "total_tokens": prompt + llm["answer_tokens"],
        "dymu": {
            "preset": report["preset"],
            "kind": report["kind"],
            "frames": frames,
            "visual_tokens": {
                "encoder": tokens["encoder_per_frame"] * report.get("slots", frames),
                "after_dtome": sum(tokens["dtome_per_frame"]),
                "llm_positions": tokens["llm_visual_positions"],
                "after_temporal": tokens["llm_visual_rows"],
                "kv_kept_at_end": llm["visual_kv_kept_at_end"],
            },
            "llm_rows_fed": llm["rows_fed"],
            "token_cache": cache.get("status", "off"),
            # Whether the engine took the visual prefix's KV from its cache ("hit"/"miss"; "off" when disabled).
            "prefix_cache": llm.get("prefix_cache", "off"),
            "seconds": {name: round(value, 4) for name, value in seconds.items()},
        },
    }
