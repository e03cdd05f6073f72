"""The core subcommands of `nchunk` (profile, bench, convert, calibrate, train-demo, verify): thin shells over
nchunk_core modules; the bench subcommands are in bench/commands.py.

The `nchunk` program is nchunk_ros/cli.py, which adds the ROS subcommands (ask, demo, soak) to this
parser; `python -m nchunk_core.cli` runs the core subcommands alone. Building the parser imports
no heavy module (no torch, no transformers, no ROS): each command imports what it needs when it runs.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from nchunk_core.bench.commands import add_bench, progress_log

DESCRIPTION = """\
nchunk streams the language backbone of a vision-language model from the NVMe drive, reading for
every frame and layer only the weight rows that matter, chosen so the reads are fast on flash.
"""


def _add_profile(sub):
    p = sub.add_parser(
        "profile",
        help="measure the drive's latency table T[s] (cached per drive)",
        description="Measure the steady-state latency per contiguous chunk of s bytes, for s on a 1 KiB grid up "
        "to the saturation size (throughput >= 99% of peak), through the reader the runtime uses, with "
        "direct I/O on a scratch file on the drive; first compares the reader's backends (thread pool, "
        "io_uring) and records the faster, which the runtime then uses. The table is cached per drive and thread count; "
        "the node reuses it at start-up.",
    )
    p.add_argument("--dir", default=None, help="a directory on the drive to profile (default: the system temp dir); "
                   "use the directory your store lives in")
    p.add_argument("--threads", type=int, default=6, help="reader threads, as the runtime will use (default 6)")
    p.add_argument("--quick", action="store_true", help="sparse grid and fewer repeats (about 10-20 s)")
    p.add_argument("--force", action="store_true", help="measure again even if a cached table exists")
    p.add_argument("--validate", action="store_true",
                   help="also read >= 20 random selection patterns and correlate measured with estimated latency")
    p.add_argument("--patterns", type=int, default=30, help="patterns for --validate (default 30)")
    p.add_argument("--plot", default=None, help="write a PNG of throughput and T[s] against chunk size")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=cmd_profile)


def cmd_profile(args) -> int:
    from nchunk_core.io import profile as prof
    from nchunk_core.io.backends import describe as describe_backends

    directory = Path(args.dir or tempfile.gettempdir())
    log = progress_log(args)
    table = prof.load_or_profile(directory, threads=args.threads, quick=args.quick, force=args.force,
                                 progress=not args.json, log=log)
    out = {
        "cache": str(prof.cache_path(directory, args.threads)),
        "drive": table.meta.get("drive"),
        "threads": table.meta.get("threads"),
        "direct_io": table.meta.get("direct_io"),
        "reader_backend": table.meta.get("reader_backend", "threads"),
        "backend_comparison": table.meta.get("backend_comparison"),
        "saturation_kib": table.saturation_bytes // 1024,
        "peak_mb_per_s": round(table.peak_bytes_per_s / 1e6, 1),
        "t_1kib_us": round(float(table.estimate(1024)) * 1e6, 1),
        "t_4kib_us": round(float(table.estimate(4096)) * 1e6, 1),
        "t_saturation_us": round(float(table.latency_s[-1]) * 1e6, 1),
        "profile_seconds": table.meta.get("seconds"),
    }
    if args.plot:
        prof.plot_profile(table, args.plot)
        out["plot"] = args.plot
    if args.validate:
        val = prof.validate(directory, table, threads=args.threads, patterns=args.patterns, progress=not args.json)
        out["validate_pearson_r"] = round(val["pearson_r"], 4)
        out["validate_median_measured_over_estimated"] = round(val["median_ratio"], 3)
        out["validate_patterns"] = val["patterns"]
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"drive         {out['drive']}  ({out['threads']} threads, direct I/O {'on' if out['direct_io'] else 'OFF'})")
    print(f"backend       {describe_backends(out['backend_comparison'])}")
    print(f"saturation    {out['saturation_kib']} KiB   (throughput >= 99% of peak)")
    print(f"peak          {out['peak_mb_per_s']} MB/s")
    print(f"T[1 KiB]      {out['t_1kib_us']} us    T[4 KiB] {out['t_4kib_us']} us    "
          f"T[saturation] {out['t_saturation_us']} us")
    print(f"cache         {out['cache']}")
    if args.plot:
        print(f"plot          {args.plot}")
    if args.validate:
        print(f"\n{'pattern':>7} {'row B':>7} {'reads':>6} {'MiB':>6} {'mean run':>9} {'measured ms':>12} {'estimated ms':>13}")
        for i, r in enumerate(out["validate_patterns"]):
            print(f"{i:>7} {r['row_bytes']:>7} {r['reads']:>6} {r['bytes'] / 2**20:>6.1f} {r['mean_run_rows']:>9.1f} "
                  f"{r['measured_s'] * 1e3:>12.2f} {r['estimated_s'] * 1e3:>13.2f}")
        print(f"\nPearson r (measured vs estimated): {out['validate_pearson_r']:.4f}   "
              f"median measured/estimated: {out['validate_median_measured_over_estimated']:.3f}")
    return 0


def _add_train_demo(sub):
    from nchunk_core.demo.train_settings import Settings  # no torch: the defaults only

    d = Settings()
    p = sub.add_parser("train-demo", help="train the built-in demo model from scratch and convert it to a store",
                       description="Train the small SmolVLM of the built-in demo on rendered scenes of coloured "
                       "shapes (nchunk_core/demo/scenes.py; train, validation and test scenes never overlap), report "
                       "accuracy per question kind on the held-out test set, save the Hugging Face checkpoint and "
                       "convert it, calibrated on training scenes, into the store that nchunk demo uses.")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seeds the model, the scenes and the splits "
                   f"(default {d.seed})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--out", default="out/shapes-vlm-checkpoint", help="folder for the Hugging Face checkpoint "
                   "and training.json (default: out/shapes-vlm-checkpoint)")
    p.add_argument("--store", default=None, help="where the store goes (default: the built-in model's place in "
                   "the package, nchunk_core/demo/data/shapes-vlm)")
    p.add_argument("--no-convert", action="store_true", help="stop after saving the checkpoint")
    p.add_argument("--calibrate-only", action="store_true", help="train nothing: measure the layer-wise "
                   "sparsity allocation of the store (default: the shipped one) on 16 training scenes and write it")
    p.set_defaults(func=cmd_train_demo)


def cmd_train_demo(args) -> int:
    from nchunk_core.demo.train import calibrate_allocation, train_and_convert
    from nchunk_core.demo.train_settings import Settings

    if args.calibrate_only:
        return calibrate_allocation(Path(args.store) if args.store else None, seed=args.seed,
                                    log=lambda m: print(m, file=sys.stderr))
    return train_and_convert(Settings.scaled(seed=args.seed, steps=args.steps), Path(args.out),
                             Path(args.store) if args.store else None, convert_store=not args.no_convert)


def _add_convert(sub):
    from nchunk_core.store.naming import DTYPES  # names only (NumPy, no torch)

    p = sub.add_parser("convert", help="convert a Hugging Face VLM checkpoint into a store",
                       description="Read a local Hugging Face checkpoint (safetensors, sharded or not) one tensor at a "
                       "time, check every key and shape against its architecture (LLaVA-OneVision, Qwen2.5-VL, "
                       "SmolVLM v1 (idefics3) and SmolVLM2), and write a store: the decoder projections as rows on the drive, everything else "
                       "resident, plus the config, tokenizer and processor files, so the store alone is the model. "
                       "Then calibrate on camera frames (the flash runtime, dense) and rewrite the rows in hot-cold "
                       "order. Needs about twice the backbone's size free next to STORE while it runs.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="local checkpoint directory (config.json, *.safetensors, "
                   "tokenizer and processor files)")
    p.add_argument("store", metavar="STORE", help="store directory to create")
    p.add_argument("--calib", metavar="FRAMES_DIR", default=None, help="folder of PNG/JPEG camera or video frames "
                   "for calibration (default: a few synthetic frames, with a warning)")
    p.add_argument("--calib-frames", type=int, default=16, help="frames used from FRAMES_DIR, spread over the folder "
                   "(default 16: `nchunk bench calibration` measured that a 16-frame hot-cold order keeps "
                   "99.6-100 %% of the importance a 32-frame order keeps at 30-50 %% sparsity, 8 frames "
                   "97.6-99.9 %%; each frame is a dense forward, so the time halves; the first frame's time "
                   "gives the estimate)")
    p.add_argument("--no-bundle", action="store_true", help="one group per projection instead of q|k|v and gate|up "
                   "bundled (a bundled channel is one larger read)")
    p.add_argument("--no-reorder", action="store_true", help="skip calibration and keep the checkpoint's row order")
    p.add_argument("--no-allocation", action="store_true", help="skip the layer-wise sparsity allocation "
                   "(every matrix then drops the same fraction of rows; `nchunk calibrate` adds one later)")
    _add_depth(p, "--sensitivity-depth")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                   help="dtype of the stored weights (default: as in the checkpoint)")
    p.add_argument("--calib-device", default="cpu", help="device for calibration: cpu or cuda (default cpu)")
    p.add_argument("--calib-dtype", default="float32", choices=DTYPES,
                   help="compute dtype for calibration (default float32)")
    p.add_argument("--threads", type=int, default=6, help="reader threads for calibration (default 6)")
    p.add_argument("--frame-tokens", default="auto", help="what a calibration frame costs, as the session's "
                   "frame_tokens: auto (the cheapest mode the model was trained with), video, image, tiles, or "
                   "a number of visual tokens (Qwen2.5-VL); use the mode the robot will run with (default auto)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at STORE")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from nchunk_core.convert.converter import convert
    from nchunk_core.store import StoreError

    try:
        path = convert(args.model_dir, args.store, args.calib, bundle=not args.no_bundle, dtype=args.dtype,
                       reorder=not args.no_reorder, calib_frames=args.calib_frames, calib_device=args.calib_device,
                       calib_dtype=args.calib_dtype, threads=args.threads, overwrite=args.overwrite,
                       log=lambda m: print(m, file=sys.stderr), frame_tokens=args.frame_tokens,
                       allocation=not args.no_allocation, sensitivity_depth=args.sensitivity_depth)
    except StoreError as exc:
        print(f"nchunk convert: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _add_calibrate(sub):
    from nchunk_core.store.naming import DTYPES  # names only (NumPy, no torch)

    p = sub.add_parser("calibrate", help="measure a store's layer-wise sparsity allocation",
                       description="Append camera frames through the store's model with every input sparsified "
                       "alone at 10-95 %, measure how much the model's output moves, and write the allocation that "
                       "spreads an average sparsity where it hurts least (sparsity_allocation.json in the store; "
                       "nchunk convert does this too). Per frame: one dense append, then for every input and level the "
                       "layers from that input's on (about half the layer passes of 1 + inputs x 10 appends), or "
                       "that input's layer alone (--depth).")
    p.add_argument("store", metavar="STORE", help="store directory")
    p.add_argument("--frames", metavar="FRAMES_DIR", required=True, help="folder of PNG/JPEG camera frames")
    p.add_argument("--count", type=int, default=4, help="frames used, spread over the folder (default 4, as nchunk "
                   "convert: 4 move the allocation no more than another 4 do; docs/design.md)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype (default float32)")
    p.add_argument("--threads", type=int, default=6, help="reader threads (default 6)")
    _add_depth(p, "--depth")
    p.set_defaults(func=cmd_calibrate)


def _add_depth(p, flag: str) -> None:
    p.add_argument(flag, default="auto", choices=("auto", "model", "layer"), dest="sensitivity_depth",
                   help="where a sparsified input's error is measured: model (the last decoder layer's output), "
                   "layer (the input's own layer's output: one layer per pass, 10-20x fewer layer passes on a "
                   "24-36 layer model) or auto (model while the estimate from the first frame fits 15 min, else "
                   "layer; default)")


def cmd_calibrate(args) -> int:
    from nchunk_core.convert.converter import load_frame, calibration_frames
    from nchunk_core.convert.sensitivity import calibrate_allocation

    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    source, frames = calibration_frames(args.frames, args.count, log)
    allocation = calibrate_allocation(args.store, [load_frame(f) for f in frames], device=args.device,
                                      dtype=args.dtype, threads=args.threads, source=source, log=log,
                                      depth=args.sensitivity_depth)
    for average in (0.1, 0.3, 0.5):
        per_input = allocation.at(average)
        print(f"average {average:.0%}: " + ", ".join(f"{k} {v:.0%}" for k, v in per_input.items()))
    return 0


def _add_verify(sub):
    p = sub.add_parser("verify", help="check every checksum of a weight store",
                       description="Open a store (validating its manifest, files, sizes and alignment), then read "
                       "every weight block and compare its CRC-32 with the manifest. Exit code 0 when intact, "
                       "1 with the file, matrix and offset of each damaged block otherwise.")
    p.add_argument("store", help="store directory (contains manifest.json)")
    p.set_defaults(func=cmd_verify)


def cmd_verify(args) -> int:
    from nchunk_core.store import Store, StoreError

    try:
        store = Store.open(args.store)
        report = store.verify(progress=True)
    except StoreError as exc:
        print(f"nchunk verify: {exc}", file=sys.stderr)
        return 1
    from nchunk_core.runtime.calibrated_mode import describe_calibration  # no torch

    print(describe_calibration(store.model_info))
    print(report)
    return 0 if getattr(report, "ok", True) else 1


def _add_upgrade(sub):
    p = sub.add_parser("upgrade", help="bring a store of an older format version up to date, in place",
                       description="Upgrade a store written by an older nchunk to the current format, in "
                       "place. From version 1: read every weight block and check its CRC-32 (a damaged "
                       "store is refused), compute the CRC-32C of every row from the same bytes, write them "
                       "to row-crc32c.bin and rewrite manifest.json atomically, keeping every other field. "
                       "A store already current is left alone. Exit code 0 when the store is current "
                       "afterwards, 1 otherwise.")
    p.add_argument("store", help="store directory (contains manifest.json)")
    p.set_defaults(func=cmd_upgrade)


def cmd_upgrade(args) -> int:
    from nchunk_core.store import StoreError
    from nchunk_core.store.upgrade import upgrade

    try:
        result = upgrade(args.store, progress=True)
    except StoreError as exc:
        print(f"nchunk upgrade: {exc}", file=sys.stderr)
        return 1
    print(result)
    return 0


def build_parser(more_commands=()) -> argparse.ArgumentParser:
    """The `nchunk` parser with the core subcommands, then each of `more_commands` (a function that
    adds subcommands to the subparsers action)."""
    parser = argparse.ArgumentParser(prog="nchunk", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_profile, add_bench, _add_convert, _add_calibrate, _add_train_demo, _add_verify, _add_upgrade,
                *more_commands):
        add(sub)
    return parser


def main(argv=None, more_commands=()) -> int:
    """Run one `nchunk` command; its exit code. `more_commands` as in build_parser."""
    args = build_parser(more_commands).parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError) as exc:
        print(f"nchunk {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
