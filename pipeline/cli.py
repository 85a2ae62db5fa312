"""`dymu-video`: one entry point, one subcommand per job.

Each subcommand lives in its own module under ``pipeline/commands/`` with two functions:
``add_parser(subparsers)`` declares its arguments and ``run(args) -> int`` does the work. Heavy imports
(torch, transformers, ray) happen inside ``run`` so that ``--help`` stays instant.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from dymu.errors import DymuError

# Order is the order `--help` lists them in.
COMMAND_MODULES = [
    "pipeline.commands.ask",
    "pipeline.commands.caption",
    "pipeline.commands.stream",
    "pipeline.commands.serve",
    "pipeline.commands.demo",
    "pipeline.commands.make_tiny_model",
    "pipeline.commands.calibrate",
    "pipeline.commands.tokens",
    "pipeline.commands.fit_rate",
]




def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dymu-video",
        description=(
            "Answer questions about videos, caption archives and follow camera feeds with open "
            "vision-language models, spending compute only where the video has content."
        ),
        epilog="Run `dymu-video COMMAND --help` for a command's options.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def _quiet_libraries(verbose: int) -> None:
    """transformers' own progress bars and notices, FFmpeg's and Ray's would drown our output; -v brings them
    back (Ray's: pipeline.runtime, FFmpeg's: dymu.frames).

    transformers and huggingface_hub read these variables when they are imported, which is later (in ``run``,
    after the checks of bad input, or in a worker process that inherits them), so that a bad option fails
    without their ~0.6 s import. One that is already imported (main() called from Python) is told directly."""
    if verbose:
        os.environ["DYMU_VERBOSE"] = str(verbose)  # for the libraries' native logging, here and in workers
        return
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except DymuError as exc:  # bad input: one line, no traceback
        print(f"dymu-video {args.command}: error: {exc}", file=sys.stderr)
        if getattr(sys.modules.get("pipeline.runtime"), "native_thread_left", False):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)  # Ray's abandoned connecting thread would abort the interpreter's shutdown
        return 2
    except KeyboardInterrupt:
        print(f"dymu-video {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
