"""`dymu-video calibrate`: per-layer DToMe thresholds for a model, from a set of images and videos."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="calibrate DToMe thresholds for a model on your images/videos",
        description=(
            "Calibrate DToMe's per-layer merge thresholds so that the encoder keeps a chosen number of visual "
            "tokens per image on average. Images count once, videos contribute sampled frames. Simple images "
            "end up with fewer tokens than busy ones; the achieved mean and spread on the data are printed "
            "and stored in the thresholds file."
        ),
    )
    p.add_argument("--model", required=True, help="LLaVA-OneVision, LLaVA-1.5, Qwen2.5-VL or Qwen3-VL checkpoint: hub id or local folder")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH", help="images, videos or folders of them")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--keep", type=float, help="average visual tokens to keep per image")
    target.add_argument(
        "--preset",
        choices=["low", "mid", "high"],
        help="DyMU's presets: keep ~89/195/394 of 576 tokens (the same shares of other grids, e.g. 113/247/499 of 729)",
    )
    p.add_argument("--out", required=True, help="thresholds file to write (JSON); an existing file is replaced "
                                                "only if it is a thresholds file and --overwrite is given")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier thresholds file at --out")
    p.add_argument("--merge-order", choices=["positional", "authors"], default="positional",
                   help="DToMe's token order after each merge: positional (default) or authors (DyMU's own "
                        "code); thresholds are calibrated for one order and recorded with it")
    p.add_argument("--batch-size", type=int, default=8, help="images per calibration batch (default 8)")
    p.add_argument("--frames-per-video", type=int, default=8, help="frames sampled from each video (default 8)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (default: bf16 on cuda, fp32 on cpu)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dymu.config import check_option
    from dymu.errors import DymuError
    from pipeline.validate import check_args, check_media_paths, check_model, check_thresholds_out

    # Everything that can be wrong is found before the model loads and the calibration runs; what the options
    # alone tell, before torch is imported.
    check_args(args)
    for name in ("device", "dtype"):
        check_option(name, getattr(args, name), flag=f"--{name}")
    if args.keep is not None and not args.keep > 0:
        raise DymuError(f"--keep must be > 0, got {args.keep:g}")
    check_thresholds_out(args.out, args.overwrite)
    check_media_paths(args.data)
    check_model(args.model, device=args.device, keep=args.keep)

    import logging

    import numpy as np
    from tqdm import tqdm

    from dymu.calibrate import calibrate, preset_keep, token_counts
    from dymu.thresholds import EncoderFingerprint, Thresholds
    from dymu.vision.load import batched, iter_samples, load_vision_model, media_files

    files = media_files(args.data)
    if not files:
        raise DymuError("the calibration set is empty: no image or video in " + " ".join(args.data))
    num_videos = sum(kind == "video" for _, kind in files)
    expected = len(files) - num_videos + num_videos * args.frames_per_video

    vision = load_vision_model(args.model, args.device, args.dtype)
    encoder = vision.encoder(merge_order=args.merge_order)
    keep = args.keep if args.keep is not None else preset_keep(args.preset, encoder.num_positions)

    def batches():
        for batch in batched(iter_samples(files, args.frames_per_video), args.batch_size):
            yield vision.calibration_pixels([sample.frame for sample in batch])

    with tqdm(total=expected, unit="img", desc="calibrating") as bar:
        taus = calibrate(encoder, batches(), keep, on_batch=bar.update)
    encoder = vision.encoder(taus, merge_order=args.merge_order)
    with tqdm(total=expected, unit="img", desc="measuring") as bar:
        counts = token_counts(encoder, batches(), on_batch=bar.update)

    thresholds = Thresholds(
        taus=taus,
        model_id=args.model,
        encoder=EncoderFingerprint.of(encoder),
        target_keep=float(keep),
        preset=args.preset,
        calibration={
            "data": [str(path) for path in args.data],
            "images": len(files) - num_videos,
            "videos": num_videos,
            "frames_per_video": args.frames_per_video,
            "samples": len(counts),
            "batch_size": args.batch_size,
            "merge_order": args.merge_order,
        },
        achieved_mean=float(np.mean(counts)),
        achieved_std=float(np.std(counts)),
    )
    path = thresholds.save(args.out)
    print(
        f"target {keep:g} tokens of {encoder.num_positions} per image; achieved "
        f"{thresholds.achieved_mean:.1f} +- {thresholds.achieved_std:.1f} "
        f"(min {min(counts)}, max {max(counts)}) on {len(counts)} images/frames"
    )
    if abs(thresholds.achieved_mean / keep - 1) > 0.1:
        # Each layer can at most halve an image, and the batch's easy images run out of edges first.
        logging.getLogger(__name__).warning(
            "the achieved mean is more than 10%% off the target: with %d layers to merge in, this target may be "
            "out of reach, or the data too uniform; calibrating on more varied data helps",
            encoder.num_layers,
        )
    print(f"wrote {path}")
    return 0
