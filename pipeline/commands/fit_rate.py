"""`dymu-video fit-rate TRACE... --out FILE`: fit the small learned pruning-rate predictor on attention traces."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fit-rate",
        help="fit the learned pruning-rate predictor on recorded attention traces",
        description=(
            "Fit the small learned predictor that sets how many visual KV entries to keep while an answer is "
            "written (DyRate-style), on attention traces of unpruned answers. A trace is written by "
            "dymu.llm.rate_model.record_trace(model, sequence, layer).save(path). The target at each step is "
            "the smallest share of visual entries, ranked by that step's attention, that still holds COVERAGE "
            "of the visual attention over the next HORIZON steps. Use the result with the prune option "
            "`predictor: FILE`."
        ),
    )
    p.add_argument("traces", nargs="+", metavar="TRACE", help="trace files (safetensors)")
    p.add_argument("--out", required=True, help="where to write the fitted predictor (safetensors)")
    p.add_argument("--coverage", type=float, default=0.95, help="share of visual attention to keep (default 0.95)")
    p.add_argument("--horizon", type=int, default=32, help="steps a decision must hold for (default 32)")
    p.add_argument("--hidden", type=int, default=16, help="hidden width of the predictor (default 16)")
    p.add_argument("--epochs", type=int, default=400, help="full-batch training steps (default 400)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dymu.llm.rate_model import AttentionTrace, LearnedRate, keep_targets

    samples = []
    for path in args.traces:
        samples += keep_targets(AttentionTrace.load(path), args.coverage, args.horizon)
    predictor = LearnedRate(args.hidden)
    loss = predictor.fit(samples, epochs=args.epochs)
    predictor.save(args.out)
    mean_target = sum(target for _, target in samples) / len(samples)
    print(f"fitted on {len(samples)} steps from {len(args.traces)} trace(s): mean target keep {mean_target:.3f}, "
          f"rmse {loss ** 0.5:.3f}; wrote {args.out}")
    return 0
