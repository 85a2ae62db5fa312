"""`dymu-video caption INPUT... --out captions.jsonl`: caption a video archive through the pipeline."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.commands.ask import add_answer_options, add_model_options, config_overrides
from pipeline.runtime import add_runtime_options

VIDEO_PROMPT = "Describe this video in detail."
IMAGE_PROMPT = "Describe this image in detail."


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "caption",
        help="caption every video of an archive into a JSON-lines file",
        description=(
            "Caption videos (and images) through the pipeline: frame decoders, the vision encoder and the LLM\n"
            "work on different videos at once. Each video gets one JSON line in --out: its path, the caption,\n"
            "token counts and timings, or the error that stopped it; one bad file never stops the batch.\n"
            "Lines are written whole and synced to disk as each video finishes, so an interrupted run loses\n"
            "nothing it wrote: rerun it with --resume to caption only what is missing. An --out file that\n"
            "already holds results is never appended to by accident: pass --resume or --overwrite."
        ),
        epilog=(
            "inputs: files, folders (their videos and images, recursively), globs ('clips/**/*.mp4', quoted) "
            "or @list.txt (one input per line)\n\n"
            "examples:\n"
            "  dymu-video caption archive/ --out captions.jsonl --model ./tiny-ov\n"
            "  dymu-video caption 'cams/**/*.mp4' @more.txt --out captions.jsonl --resume\n"
            "  ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\\n"
            "      dymu-video caption /data/videos --out /data/captions.jsonl --redis-url redis://:pw@redis:6379/0\n\n"
            "exit status: 0 every video captioned, 1 some failed (in this run or, with --resume, already in --out;\n"
            "listed at the end), 2 bad arguments"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="video/image files, folders, globs or @list files")
    p.add_argument("--out", required=True, metavar="FILE", help="the JSON-lines file to write")
    p.add_argument("--prompt", help=f"the question asked of each video (default {VIDEO_PROMPT!r}; for images "
                                    f"{IMAGE_PROMPT!r})")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="keep --out's results and skip the videos it has")
    again.add_argument("--overwrite", action="store_true", help="empty --out first")
    p.add_argument("--retry-failed", action="store_true",
                   help="with --resume: caption again the videos recorded as failed (their error lines go)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_options(p)
    add_answer_options(p)
    add_runtime_options(p)
    p.set_defaults(func=run)


def question_for(path: str, prompt: str | None) -> str:
    """``prompt``, or the default question for a video or (by its name) an image."""
    from pipeline.inputs import IMAGE_SUFFIXES

    if prompt:
        return prompt
    return IMAGE_PROMPT if Path(path).suffix.lower() in IMAGE_SUFFIXES else VIDEO_PROMPT


def caption_record(result: Any) -> dict[str, Any]:
    """The JSON line of one finished job."""
    if not result.ok:
        return {"path": result.job.path, "error": result.error, "seconds": {"wall": result.seconds}}
    report = result.answer.report
    return {
        "path": result.job.path,
        "caption": result.answer.text,
        "kind": report["kind"],
        "frames": report["frames"],
        "model": report["model"],
        "preset": report["preset"],
        "tokens": report["tokens"],
        "answer_tokens": report["llm"]["answer_tokens"],
        "seconds": {**report["seconds"], "wall": result.seconds},
        "cache": result.cache["status"],
    }


def run(args: argparse.Namespace) -> int:
    from dymu.config import make_config
    from dymu.errors import DymuError
    from pipeline.inputs import expand_inputs
    from pipeline.jsonl import JsonlFile
    from pipeline.validate import check_args, check_config, check_text, is_local_run

    if args.retry_failed and not args.resume:
        raise DymuError("--retry-failed goes with --resume")
    check_text(args.prompt, "--prompt")
    check_args(args)
    paths = expand_inputs(args.inputs, command="caption")
    config = make_config(args.preset, args.config_file, **config_overrides(args))
    check_config(config, local=is_local_run(args.ray_address))  # a checkpoint that is not there fails before the batch
    from pipeline.jobs import Job  # imports torch: after the checks that need none

    mode = "resume" if args.resume else "overwrite" if args.overwrite else "new"
    with JsonlFile.open(args.out, mode) as out:
        if args.retry_failed:
            out.rewrite([record for record in out.records if "error" not in record])
        done = {record.get("path"): record for record in out.records}
        todo = [path for path in map(str, paths) if path not in done]
        failed_before = [(path, done[path]["error"]) for path in map(str, paths)
                         if path in done and "error" in done[path]]

        started = time.perf_counter()
        jobs = [Job(path, question_for(path, args.prompt)) for path in todo]
        failed, cache_note = _caption(args, config, jobs, out) if jobs else ([], "")
        elapsed = time.perf_counter() - started
    print(summary(len(todo), failed, len(paths) - len(todo), elapsed, args.out, failed_before))
    if cache_note:
        print(cache_note)
    return 1 if failed or failed_before else 0


def _caption(args: argparse.Namespace, config: Any, jobs: list, out: Any) -> tuple[list[tuple[str, str]], str]:
    """Run ``jobs``, appending each result to ``out`` as it comes; (failures, a note if the cache went away)."""
    from tqdm import tqdm

    from pipeline.jobs import Pipeline
    from pipeline.runtime import runtime_from_args

    failed = []
    with runtime_from_args(args) as runtime, Pipeline(
        config, runtime.redis_url, decoders=args.decoders or 2, model_worker_cpus=args.model_worker_cpus
    ) as pipeline:
        with tqdm(total=len(jobs), unit="video", file=sys.stderr, disable=args.no_progress, smoothing=0.1) as bar:
            for result in pipeline.run(jobs):
                out.append(caption_record(result))
                if not result.ok:
                    failed.append((result.job.path, result.error))
                bar.update(1)
                bar.set_postfix(failed=len(failed), refresh=False)
        note = ""
        if pipeline.cache_state == "unavailable":
            note = f"token cache: went away during the batch, the rest ran without it ({pipeline.cache_problem})"
    return failed, note


def summary(ran: int, failed: list[tuple[str, str]], skipped: int, seconds: float, out: str,
            failed_before: list[tuple[str, str]] = ()) -> str:
    """The closing lines: what ran, what was skipped, and every failure, this run's and (with --resume) those
    already in ``out`` for these inputs, which still count against the exit status."""
    done = ran - len(failed)
    rate = ran / seconds if seconds > 0 else 0.0
    lines = [f"captioned {done} of {ran} video(s) into {out} in {seconds:.1f}s ({rate:.2f}/s)"
             + (f"; {skipped} already there, skipped" if skipped else "")
             + (f"; {len(failed)} failed:" if failed else "")]
    lines += _failure_lines(failed, out)
    if failed_before:
        lines.append(f"{len(failed_before)} video(s) had already failed in {out} (--retry-failed tries them again):")
        lines += _failure_lines(list(failed_before), out)
    return "\n".join(lines)


def _failure_lines(failed: list[tuple[str, str]], out: str) -> list[str]:
    lines = [f"  {error}" if error.startswith(path) else f"  {path}: {error}" for path, error in failed[:20]]
    if len(failed) > 20:
        lines.append(f"  ... and {len(failed) - 20} more (their lines in {out} have an \"error\")")
    return lines
