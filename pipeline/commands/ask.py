"""`dymu-video ask PATH QUESTION`: answer a question about a video or an image."""
from __future__ import annotations

import argparse
import json
import sys

from dymu.config import DEFAULT_MODEL, MERGE_ORDERS, PRESETS
from pipeline.runtime import add_runtime_options


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that runs the model (ask, caption, stream)."""
    g = p.add_argument_group("model and reductions")
    g.add_argument("--model", help=f"Hugging Face id or local checkpoint folder (default {DEFAULT_MODEL})")
    g.add_argument("--revision", help="checkpoint revision (branch, tag or commit) for a hub id")
    g.add_argument("--preset", choices=PRESETS,
                   help="how hard to reduce: off (the stock model), low (fewest tokens), mid (default), high")
    g.add_argument("--config", dest="config_file", metavar="FILE", help="a YAML file of options (see configs/)")
    g.add_argument("--thresholds", metavar="FILE", help="DToMe thresholds from `dymu-video calibrate`")
    g.add_argument("--keep", type=int, help="average visual tokens per frame DToMe keeps (overrides the preset)")
    g.add_argument("--merge-order", choices=MERGE_ORDERS,
                   help="DToMe's token order after each merge: positional (default, patch order) or authors "
                        "(DyMU's own code; use it with thresholds calibrated by their code)")
    g.add_argument("--temporal-threshold", type=float,
                   help="cosine above which a token merges with the previous frame's (1.0 = off)")
    g.add_argument("--no-vtu", dest="vtu", action="store_false", default=None,
                   help="feed merged tokens at consecutive positions instead of virtually unmerging them")
    g.add_argument("--no-prune", dest="prune_enabled", action="store_false", default=None,
                   help="keep every visual KV entry while decoding")
    g.add_argument("--frames", dest="num_frames", type=int, help="frames sampled uniformly from a video (default 8)")
    g.add_argument("--fps", type=float, help="sample frames at this rate instead (capped by --max-frames)")
    g.add_argument("--max-frames", type=int, help="never sample more than this many frames (default 64)")
    g.add_argument("--encode-batch-frames", type=int, metavar="N",
                   help="frames the vision encoder runs in one batch, from one video or several queued ones "
                        "(default 16)")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")


def add_answer_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("answer")
    g.add_argument("--max-new-tokens", type=int, help="longest answer in tokens (default 128)")
    g.add_argument("--temperature", type=float, help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass (default 1.0)")
    g.add_argument("--seed", type=int, help="seed for sampling")
    g.add_argument("--max-batch", type=int,
                   help="answers the LLM worker writes at once, continuously batched (default 1: one at a time)")
    g.add_argument("--kv-cache-gb", type=float,
                   help="the LLM's KV pool in GiB (default 40%% of free GPU memory on CUDA, 2 on CPU)")
    g.add_argument("--prefix-cache-gb", type=float,
                   help="part of the KV pool kept for videos' visual prefixes, so a second question about a "
                        "video prefills only its own words (default 0.5; 0 = off)")
    g.add_argument("--attention-backend", choices=("auto", "sdpa", "flex"),
                   help="the LLM engine's decode attention: sdpa (gathered KV + SDPA), flex (FlexAttention on the "
                        "paged KV pool) or auto (default: flex on CUDA when available, else sdpa)")


def config_overrides(args: argparse.Namespace) -> dict:
    """The CLI flags as config overrides (None = not given, so the preset or file decides)."""
    names = ("model", "revision", "thresholds", "keep", "merge_order", "temporal_threshold", "vtu", "num_frames", "fps",
             "max_frames", "device", "dtype", "max_new_tokens", "temperature", "top_p", "seed", "max_batch",
             "kv_cache_gb", "prefix_cache_gb", "encode_batch_frames", "attention_backend")
    overrides = {name: getattr(args, name, None) for name in names}
    if getattr(args, "prune_enabled", None) is False:
        overrides["prune"] = {"enabled": False}
    return overrides


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ask",
        help="answer a question about a video or an image",
        description=(
            "Answer a question about a video (or an image). The answer streams as it is written, then a short "
            "report says what it cost: frames sampled, visual tokens per frame before and after DToMe and "
            "temporal merging, the LLM's virtual and real lengths, the visual KV entries kept at the end, and "
            "the time of every stage."
        ),
        epilog=(
            "examples:\n"
            "  dymu-video ask clip.mp4 \"What is the person doing?\" --preset mid\n"
            "  dymu-video ask photo.jpg \"What is on the table?\" --model llava-hf/llava-1.5-7b-hf --json\n"
            "  dymu-video make-tiny-model ./tiny && dymu-video ask clip.mp4 \"Describe it\" --model ./tiny\n"
            "  dymu-video ask clip.mp4 \"Who is there?\" \"What do they carry?\"   # the second reuses cached tokens\n"
            "  dymu-video ask clip.mp4 \"Describe it\" --ray-address head:6379 --redis-url redis://:pw@head:6379/0\n"
            "\n"
            "The question runs through the pipeline (frame decoder, vision encoder and LLM actors on Ray, merged\n"
            "tokens cached in Redis); with no --ray-address / --redis-url, a local Ray and a private redis-server\n"
            "are started for the run."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="a video file (mp4, mkv, webm, avi, ...) or an image")
    p.add_argument("question", nargs="+",
                   help="the question, in quotes; more questions are answered in turn, from the cached tokens")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (answer and report) per question instead")
    add_model_options(p)
    add_answer_options(p)
    add_runtime_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dymu.config import make_config
    from dymu.errors import DymuError
    from dymu.frames import media_kind
    from pipeline.validate import check_args, check_config, check_text, is_local_run, reject_url

    # Bad input fails before anything starts: a URL, an empty question, a missing or unreadable file, a bad
    # option, a checkpoint or thresholds file that is not there or does not fit, a video for an image-only model.
    reject_url(args.path, "ask")
    for question in args.question:
        check_text(question, "question")
    check_args(args)
    kind = media_kind(args.path)
    config = make_config(args.preset, args.config_file, **config_overrides(args))
    checkpoint = check_config(config, local=is_local_run(args.ray_address))
    from dymu.families import FAMILIES  # imports torch: after the checks that need none

    if kind == "video" and not FAMILIES[checkpoint.model_type].supports_video:
        raise DymuError(f"{config.model} answers about images only, and {args.path} is a video")

    from dymu.videoqa import format_report
    from pipeline.jobs import Pipeline
    from pipeline.runtime import runtime_from_args

    stream = None if args.json else (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    with runtime_from_args(args) as runtime, Pipeline(
        config, runtime.redis_url, decoders=args.decoders or 1, model_worker_cpus=args.model_worker_cpus
    ) as pipeline:
        for question in args.question:
            answer = pipeline.ask(args.path, question, on_text=stream).answer
            if args.json:
                print(json.dumps(answer.to_json()))
            else:
                print()
                print(format_report(answer.report))
                print(format_cache(answer.report["cache"]))
    return 0


def format_cache(cache: dict) -> str:
    """The report's line about the token cache."""
    status = cache["status"]
    if status == "hit":
        return (f"token cache: hit, decoding and encoding skipped (saved {cache['saved_seconds']:.2f}s; "
                f"lookup {cache['lookup_seconds']:.2f}s)")
    if status == "miss":
        return "token cache: miss (the tokens are now cached for the next question)"
    if status == "unavailable":
        return "token cache: unavailable, ran without it"
    return "token cache: off"
