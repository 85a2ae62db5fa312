"""Video (and image) question answering in one process: the Python API behind `dymu-video ask`.

    qa = VideoQA.from_pretrained("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", preset="mid")
    answer = qa.ask("clip.mp4", "What is the person doing?")
    print(answer.text, answer.report)

The three stages (read frames, encode them into merged tokens, write the answer) are separate methods, so
the distributed pipeline can run each one in its own worker and cache what ``encode`` returns.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from dymu.answer import answer_request, check_question_fits, write_answer
from dymu.errors import DymuError
from dymu.families import QwenVLFamily, VLMFamily, load_family
from dymu.frames import load_image, media_kind, read_video_frames
from dymu.tokens import MergedTokens
from dymu.batch_encode import attempt, encode_pending
from dymu.visual import PendingTokens, VisualTokenizer
from dymu.visual_qwen import QwenVisualTokenizer
from dymu.config import VideoQAConfig, make_config
from dymu.llm.config import GenerateConfig
from dymu.llm.generate import GenerationResult
from dymu.llm.sequence import VirtualSequence
from dymu.thresholds_store import calibrate_and_cache, find_thresholds

log = logging.getLogger(__name__)


@dataclass
class Media:
    """What was read from one file: video frames (T, H, W, 3) with timestamps, or one image."""

    source: str
    kind: str  # "video" | "image"
    frames: np.ndarray | None = None
    timestamps: list[float] = field(default_factory=list)
    image: Image.Image | None = None
    read_seconds: float = 0.0
    video_metadata: dict[str, Any] | None = None  # {total_num_frames, fps, frames_indices} of the source video


@dataclass
class Answer:
    """An answer and its report: frames, tokens after every stage, LLM lengths, KV kept, time per stage."""

    question: str
    text: str
    source: str
    report: dict[str, Any]
    tokens: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "question": self.question, "answer": self.text, **self.report}


def read_media(path: str | Path, config: VideoQAConfig, supports_video: bool = True) -> Media:
    """Frames sampled as ``config`` says, or the image (needs no model, so a decoder worker can run it)."""
    started = time.perf_counter()
    source = str(path)
    if media_kind(path) == "image":
        return Media(source, "image", image=load_image(path), read_seconds=time.perf_counter() - started)
    if not supports_video:
        raise DymuError(f"{config.model} answers about images only, and {source} is a video")
    video = read_video_frames(path, num_frames=config.num_frames if config.fps is None else None,
                              fps=config.fps, max_frames=config.max_frames)
    metadata = {"total_num_frames": int(video.total_frames), "fps": float(video.source_fps),
                "frames_indices": [int(i) for i in video.indices]} if video.indices else None
    return Media(source, "video", frames=video.frames, timestamps=list(video.timestamps),
                 read_seconds=time.perf_counter() - started, video_metadata=metadata)


class VideoQA:
    """A loaded model plus the reductions of one config. Load once, ask many questions."""

    def __init__(self, family: VLMFamily, config: VideoQAConfig):
        self.family = family
        self.config = config
        self._visual: VisualTokenizer | QwenVisualTokenizer | None = None

    @classmethod
    def from_pretrained(
        cls, model: str | None = None, preset: str | None = None, config_file: str | Path | None = None, **overrides: Any
    ) -> "VideoQA":
        """Load ``model`` (hub id or folder) with ``preset`` (off|low|mid|high), a YAML file and overrides."""
        config = make_config(preset, config_file, model=model, **overrides)
        return cls(load_family(config.model, config.device, config.dtype, config.revision), config)

    # --- stage 1: frames -------------------------------------------------------------------------------
    def read(self, path: str | Path) -> Media:
        return read_media(path, self.config, self.family.supports_video)

    # --- stage 2: merged tokens ------------------------------------------------------------------------
    def encode(self, media: Media) -> MergedTokens:
        pending = self.prepare(media)
        return self.visual_tokenizer(media).encode_alone(pending)

    def encode_many(self, media: Sequence[Media]) -> list[MergedTokens | Exception]:
        """Tokens of several media, their frames through the vision encoder as one batch (LLaVA families in
        chunks of ``encode_batch_frames``, Qwen-VL in one call: the caller bounds the batch, as the encoder
        worker does); each equals ``encode`` of that medium alone, up to float rounding. A medium that fails
        has its exception in its place; the others are unaffected."""
        pending = [attempt(lambda m=m: self.prepare(m)) for m in media]
        return encode_pending(self._visual, pending)

    def prepare(self, media: Media) -> PendingTokens:
        """``media``'s encoder inputs and how to finish its tokens (``dymu.visual.PendingTokens``)."""
        visual = self.visual_tokenizer(media)
        if media.kind == "image":
            pending = visual.prepare_image(media.image)
        elif isinstance(visual, QwenVisualTokenizer):
            pending = visual.prepare_frames(media.frames, media.timestamps, media.video_metadata)
        else:
            pending = visual.prepare_frames(media.frames, media.timestamps)
        finish = pending.finish

        def stamped(encoded: list[Any], encode_seconds: float) -> MergedTokens:
            tokens = finish(encoded, encode_seconds)
            tokens.config_hash = self.config.encoder_fingerprint()
            tokens.meta["seconds"]["read"] = media.read_seconds
            tokens.meta["kind"] = media.kind
            return tokens

        pending.finish = stamped
        return pending

    def visual_tokenizer(self, media: Media | None = None) -> VisualTokenizer | QwenVisualTokenizer:
        """The encoder stage, built on first use (its thresholds may be calibrated on ``media``)."""
        if self._visual is not None:
            return self._visual
        config = self.config
        if isinstance(self.family, QwenVLFamily):
            self._visual = qwen_visual_tokenizer(self.family, config, media)
            return self._visual
        if not config.dtome:
            self._visual = VisualTokenizer(self.family, None, config.temporal_threshold,
                                           batch_size=config.encode_batch_frames)
            return self._visual
        probe = VisualTokenizer(self.family, None, config.temporal_threshold, merge_order=config.merge_order)
        keep = config.tokens_to_keep(probe.encoder.num_positions)
        thresholds = find_thresholds(config.model, probe.encoder, keep, config.thresholds)
        if thresholds is None:
            if media is None:
                raise DymuError(f"no DToMe thresholds for {config.model}; pass --thresholds or calibrate first")
            pixels = self.family.frame_pixels(media.frames) if media.kind == "video" else self.family.image_pixels(media.image)[0]
            thresholds = calibrate_and_cache(config.model, probe.encoder, keep, pixels, media.source)
        self._visual = VisualTokenizer(self.family, thresholds.taus, config.temporal_threshold, config.reuse_threshold,
                                       batch_size=config.encode_batch_frames, merge_order=config.merge_order)
        return self._visual

    # --- stage 3: the answer ---------------------------------------------------------------------------
    def answer(
        self, tokens: MergedTokens, question: str, on_text: Callable[[str], None] | None = None, source: str = "",
        stop: tuple[str, ...] = (),
    ) -> Answer:
        """The answer to ``question``; ``stop``: strings that end it (cut before the first one found)."""
        check_question(question)
        self.check_fits(tokens, question)
        kind = tokens.meta.get("kind", "video")
        generate_config = self.config.generate_config(self.family.config.text_config.num_hidden_layers)
        if stop:
            generate_config = dataclasses.replace(generate_config, stop_strings=tuple(stop))
        generation = write_answer(self.family, tokens, question, kind, generate_config, on_text)
        return Answer(question=question, text=generation.text or "", source=source,
                      report=build_report(self.config, tokens, generation), tokens=list(generation.tokens))

    # --- the engine: many answers at once ----------------------------------------------------------------
    def make_engine(self):
        """A batched engine (``dymu.engine.Engine``) on this model, sized by the config's max_batch,
        kv_cache_gb and prefix_cache_gb."""
        from dymu.engine import Engine, EngineConfig
        from dymu.llm.decoder import load_decoder

        decoder = load_decoder(self.family.model)
        kv_gb = self.config.kv_cache_gb or default_kv_cache_gb(decoder.device)
        sizes = EngineConfig(kv_cache_gb=kv_gb, prefix_cache_gb=min(self.config.prefix_cache_gb, kv_gb),
                             max_batch=self.config.max_batch, attention=self.config.attention_backend)
        return Engine(decoder, self.family.tokenizer, sizes)

    def generate_config(self, options: dict[str, Any] | None = None) -> GenerateConfig:
        """The LLM options of this config, with per-request ``options`` (max_new_tokens, temperature, top_p,
        seed, stop) over them."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(REQUEST_OPTIONS))
        if unknown:
            raise DymuError(f"unknown generation option(s): {', '.join(unknown)} (known: {', '.join(REQUEST_OPTIONS)})")
        stop = options.pop("stop", None)
        config = dataclasses.replace(self.config, **{k: v for k, v in options.items() if v is not None})
        generate = config.generate_config(self.family.config.text_config.num_hidden_layers)
        if stop:
            generate = dataclasses.replace(generate, stop_strings=(stop,) if isinstance(stop, str) else tuple(stop))
        return generate

    def answer_request(self, tokens: MergedTokens, question: str,
                       options: dict[str, Any] | None = None) -> tuple[VirtualSequence, GenerateConfig, str, int]:
        """(sequence, generation options, visual prefix key, visual prefix length) for the engine."""
        check_question(question)
        self.check_fits(tokens, question)
        sequence, key, prefix = answer_request(self.family, tokens, question, tokens.meta.get("kind", "video"))
        return sequence, self.generate_config(options), key, prefix

    def check_fits(self, tokens: MergedTokens, question: str) -> None:
        """Refuse a question that cannot fit in the context beside ``tokens``, before tokenizing all of it."""
        context = self.family.config.text_config.max_position_embeddings
        check_question_fits(self.family.tokenizer, question, context, tokens.num_positions)

    def finish_answer(self, tokens: MergedTokens, question: str, result: GenerationResult, source: str = "",
                      prefix_cache: str = "off") -> Answer:
        """The ``Answer`` (text and report) of an engine's result."""
        text = (result.text or "").strip()
        report = build_report(self.config, tokens, result, prefix_cache)
        return Answer(question=question, text=text, source=source, report=report, tokens=list(result.tokens))

    def ask(self, path: str | Path, question: str, on_text: Callable[[str], None] | None = None) -> Answer:
        """Read, encode and answer in one call."""
        media = self.read(path)
        return self.answer(self.encode(media), question, on_text, source=media.source)


REQUEST_OPTIONS = ("max_new_tokens", "temperature", "top_p", "seed", "stop")


def check_question(question: str) -> None:
    if not question.strip():
        raise DymuError("the question is empty")


def default_kv_cache_gb(device: Any) -> float:
    """40% of the GPU memory still free once the model is loaded, or 2 GiB on CPU (touched lazily)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.4 * free / 2**30
    return 2.0


def qwen_visual_tokenizer(family: QwenVLFamily, config: VideoQAConfig,
                          media: Media | None = None) -> QwenVisualTokenizer:
    """The Qwen-VL encoder stage: the stock features at ``dtome: false``, else DToMe with thresholds found as
    for the other families (a file, the bundled or cached ones), or calibrated on ``media``'s frames (each at
    the calibration size, as `dymu-video calibrate` does for Qwen-VL)."""
    from dymu.vision.qwen_inputs import image_inputs
    from dymu.vision.qwen_model import CALIBRATION_SIDE, QwenFrameEncoder

    if config.dtome and config.merge_order != QwenFrameEncoder.merge_order:
        raise DymuError(f"merge order {config.merge_order!r} is not available on Qwen-VL encoders (their merges stay "
                        f"inside windows and 2x2 merger groups, in positional order)")
    if not config.dtome:
        return QwenVisualTokenizer(family, None, config.temporal_threshold)
    probe = QwenFrameEncoder(family.vision_tower)
    keep = config.tokens_to_keep(probe.num_positions)
    thresholds = find_thresholds(config.model, probe, keep, config.thresholds)
    if thresholds is None:
        if media is None:
            raise DymuError(f"no DToMe thresholds for {config.model}; pass --thresholds or calibrate first")
        images = [media.image] if media.kind == "image" else [Image.fromarray(frame) for frame in media.frames]
        side = (CALIBRATION_SIDE, CALIBRATION_SIDE)
        pixels = image_inputs(family.processor, [image.convert("RGB").resize(side, Image.BICUBIC) for image in images])
        thresholds = calibrate_and_cache(config.model, probe, keep, pixels, media.source)
    return QwenVisualTokenizer(family, thresholds.taus, config.temporal_threshold, config.reuse_threshold)


def build_report(config: VideoQAConfig, tokens: MergedTokens, generation, prefix_cache: str = "off") -> dict[str, Any]:
    stages = tokens.meta["stages"]
    dtome = stages["dtome_tokens_per_frame"]
    temporal = stages["temporal_rows_per_frame"]
    seconds = dict(tokens.meta["seconds"])
    seconds["prefill"] = generation.prefill_seconds
    seconds["decode"] = sum(generation.decode_seconds)
    visual_kept = generation.kept_trace[-1][1] if generation.kept_trace else generation.visual_positions
    return {
        "model": config.model,
        "preset": config.preset,
        "kind": tokens.meta.get("kind", "video"),
        "frames": tokens.meta["frames"],
        # The encoder's units, which the per-frame token counts below are of: the frames, or Qwen-VL's
        # temporal slots (two frames each).
        "slots": tokens.meta.get("slots", tokens.meta["frames"]),
        "timestamps": tokens.timestamps,
        "tokens": {
            "encoder_per_frame": stages["encoder_tokens_per_frame"],
            "encoded_frames": stages.get("encoded_frames", tokens.meta.get("slots", tokens.meta["frames"])),
            "dtome_per_frame": dtome,
            "llm_rows_per_frame": stages["layout_rows_per_frame"],
            "temporal_new_per_frame": temporal,
            "llm_visual_positions": stages["llm_positions"],
            "llm_visual_rows": stages["llm_rows"],
        },
        "llm": {
            "virtual_length": generation.virtual_length,
            "rows_fed": generation.unique_rows,
            "visual_kv_kept_at_end": visual_kept,
            "visual_kv_trace": generation.kept_trace[:8],
            "answer_tokens": len(generation.tokens),
            "stop_reason": generation.stop_reason,
            "decode_ms_per_token": generation.decode_ms_per_token,
            "prefix_cache": prefix_cache,
        },
        "seconds": seconds,
    }


def format_report(report: dict[str, Any]) -> str:
    """The short human-readable report printed after a streamed answer."""
    t, llm, s = report["tokens"], report["llm"], report["seconds"]
    frames, slots = report["frames"], report.get("slots", report["frames"])
    unit = "frame" if slots == frames else "slot"
    dtome = t["dtome_per_frame"]
    temporal = t["temporal_new_per_frame"]
    encoder_total = t["encoder_per_frame"] * slots
    sampled = f"{frames} frame(s) sampled" + ("" if slots == frames else f" in {slots} temporal slots")
    lines = [
        f"{report['kind']}: {sampled} ({t['encoded_frames']} {unit}(s) run through the encoder),"
        f" preset {report['preset']}",
        f"visual tokens: {encoder_total} from the encoder ({t['encoder_per_frame']}/{unit})"
        f" -> {sum(dtome)} after DToMe ({sum(dtome) / slots:.0f}/{unit})"
        f" -> {sum(t['llm_rows_per_frame'])} LLM rows after projector and pooling"
        f" -> {sum(temporal)} after temporal merging",
        f"LLM: {llm['virtual_length']} virtual positions, {llm['rows_fed']} rows fed"
        f" ({t['llm_visual_rows']} visual rows for {t['llm_visual_positions']} visual positions);"
        f" visual KV entries kept at the end: {llm['visual_kv_kept_at_end']}",
        "time: " + ", ".join(f"{name} {value:.2f}s" for name, value in s.items())
        + f"; {llm['answer_tokens']} tokens at {llm['decode_ms_per_token']:.1f} ms/token",
    ]
    return "\n".join(lines)
