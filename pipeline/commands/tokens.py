"""`dymu-video tokens`: what each image or video frame costs in visual tokens, before and after DToMe."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokens",
        help="count the visual tokens of images/video frames before and after DToMe",
        description=(
            "Run the model's vision encoder with DToMe thresholds on each image (or each sampled frame of a "
            "video) and print how many visual tokens it costs without and with merging."
        ),
    )
    p.add_argument("--model", required=True, help="LLaVA-OneVision, LLaVA-1.5, Qwen2.5-VL or Qwen3-VL checkpoint: hub id or local folder")
    p.add_argument("--thresholds", required=True, help="thresholds file written by `dymu-video calibrate`")
    p.add_argument("paths", nargs="+", metavar="PATH", help="images, videos or folders of them")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--merge-order", choices=["positional", "authors"],
                   help="DToMe's token order after each merge (default: the one the thresholds were calibrated with)")
    p.add_argument("--frames-per-video", type=int, default=8, help="frames sampled from each video (default 8)")
    p.add_argument("--batch-size", type=int, default=8, help="images encoded together (default 8)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (default: bf16 on cuda, fp32 on cpu)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from dymu.config import check_option
    from dymu.errors import DymuError
    from pipeline.validate import check_args, check_media_paths, check_model

    check_args(args)
    check_media_paths(args.paths)
    for name in ("device", "dtype"):
        check_option(name, getattr(args, name), flag=f"--{name}")
    # A broken checkpoint or thresholds file, or one made for another encoder, fails before the model loads.
    check_model(args.model, device=args.device, thresholds=args.thresholds)

    from dymu.thresholds import EncoderFingerprint, Thresholds
    from dymu.thresholds_store import merge_order_of
    from dymu.vision.load import batched, iter_samples, load_vision_model, media_files

    files = media_files(args.paths)
    if not files:
        raise DymuError("no image or video in " + " ".join(args.paths))
    vision = load_vision_model(args.model, args.device, args.dtype)
    encoder = vision.encoder()
    thresholds = Thresholds.load(args.thresholds, EncoderFingerprint.of(encoder), args.model)
    encoder = vision.encoder(thresholds.taus, merge_order=args.merge_order or merge_order_of(thresholds))

    rows = []
    for batch in batched(iter_samples(files, args.frames_per_video), args.batch_size):
        for sample, image in zip(batch, encoder(vision.pixels([s.frame for s in batch]))):
            rows.append({
                "path": str(sample.path),
                "frame": sample.index,
                "timestamp": sample.timestamp,
                "before": image.num_positions,  # Qwen-VL: each image's own dynamic resolution
                "after": image.num_tokens,
            })

    before, after = sum(r["before"] for r in rows), sum(r["after"] for r in rows)
    if args.json:
        print(json.dumps({"model": args.model, "thresholds": args.thresholds, "items": rows,
                          "total": {"before": before, "after": after}}, indent=2))
        return 0
    width = max(len("path"), *(len(r["path"]) for r in rows))
    print(f"{'path':<{width}}  {'frame':>5}  {'time':>7}  {'before':>6}  {'after':>6}")
    for r in rows:
        frame = "-" if r["frame"] is None else str(r["frame"])
        time = "-" if r["timestamp"] is None else f"{r['timestamp']:.2f}s"
        print(f"{r['path']:<{width}}  {frame:>5}  {time:>7}  {r['before']:>6}  {r['after']:>6}")
    print(f"total: {before} -> {after} visual tokens ({after / before:.1%}) over {len(rows)} images/frames")
    return 0
