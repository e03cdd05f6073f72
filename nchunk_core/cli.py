"""`nchunk`: command-line entry point. Each subcommand is a thin shell over a nchunk_core module."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

DESCRIPTION = """\
nchunk streams the language backbone of a vision-language model from the NVMe drive, reading for
every frame and layer only the weight rows that matter, chosen so the reads are fast on flash.
"""


def _add_profile(sub):
    p = sub.add_parser(
        "profile",
        help="measure the drive's latency table T[s] (cached per drive)",
        description="Measure the steady-state latency per contiguous chunk of s bytes, for s on a 1 KiB grid up "
        "to the saturation size (throughput >= 99%% of peak), through the reader the runtime uses, with "
        "direct I/O on a scratch file on the drive. The table is cached per drive and thread count; "
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
    from . import profile as prof

    directory = Path(args.dir or tempfile.gettempdir())
    log = (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr))
    table = prof.load_or_profile(directory, threads=args.threads, quick=args.quick, force=args.force,
                                 progress=not args.json, log=log)
    out = {
        "cache": str(prof.cache_path(directory, args.threads)),
        "drive": table.meta.get("drive"),
        "threads": table.meta.get("threads"),
        "direct_io": table.meta.get("direct_io"),
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
    print(f"saturation    {out['saturation_kib']} KiB   (throughput >= 99% of peak)")
    print(f"peak          {out['peak_mb_per_s']} MB/s")
    print(f"T[1 KiB]      {out['t_1kib_us']} us    T[4 KiB] {out['t_4kib_us']} us    "
          f"T[saturation] {out['t_saturation_us']} us")
    print(f"cache         {out['cache']}")
    if args.plot:
        print(f"plot          {args.plot}")
    if args.validate:
        print(f"\n{'pattern':>7} {'row B':>7} {'runs':>6} {'MiB':>6} {'mean run':>9} {'measured ms':>12} {'estimated ms':>13}")
        for i, r in enumerate(out["validate_patterns"]):
            print(f"{i:>7} {r['row_bytes']:>7} {r['runs']:>6} {r['bytes'] / 2**20:>6.1f} {r['mean_run_rows']:>9.1f} "
                  f"{r['measured_s'] * 1e3:>12.2f} {r['estimated_s'] * 1e3:>13.2f}")
        print(f"\nPearson r (measured vs estimated): {out['validate_pearson_r']:.4f}   "
              f"median measured/estimated: {out['validate_median_measured_over_estimated']:.3f}")
    return 0


def _add_bench(sub):
    p = sub.add_parser("bench", help="benchmarks (tables, plots, --json)",
                       description="Benchmarks print a table; with --json they print one JSON object.")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    r = bsub.add_parser("reader", help="our direct-I/O reader beside fio (sequential 1 MiB, random 4 KiB)",
                        description="Sequential 1 MiB and random 4 KiB direct reads through the nchunk reader and "
                        "through fio with the same file, threads and direct I/O, interleaved in one run; prints "
                        "throughputs and the ratios ours/fio (keys seq_ratio_vs_fio, rand4k_ratio_vs_fio).")
    r.add_argument("--dir", default=None, help="directory on the drive to test (default: system temp dir)")
    r.add_argument("--threads", type=int, default=6, help="reader threads and fio jobs (default 6)")
    r.add_argument("--file-mib", type=int, default=512, help="test file size in MiB (default 512)")
    r.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; medians reported (default 3)")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.set_defaults(func=cmd_bench_reader)
    io = bsub.add_parser("io", help="I/O efficiency of selection methods on 7B-VLM decoder shapes",
                         description="Writes (once, then reuses) stores with the decoder projections of "
                         "LLaVA-OneVision-Qwen2-7B (fp16, bundled and unbundled) on the drive under test, then sweeps "
                         "sparsity 0-70%% for magnitude and chunking, with and without hot-cold reordering, reading "
                         "every selection cold through the reader. Prints a table with measured and estimated I/O "
                         "time, retained importance, requests, mean run length and the physical limit; writes PNG "
                         "plots; reports the speedup over magnitude at matched retained importance.")
    io.add_argument("--dir", default=None, help="directory on the drive under test for the stores "
                    "(default: <system temp dir>/nchunk-bench); about 1 GB per layer")
    io.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    io.add_argument("--frames", type=int, default=12, help="test frames = repetitions per point (default 12)")
    io.add_argument("--methods", default="magnitude,chunking", help="comma-separated selection methods")
    io.add_argument("--threads", type=int, default=6, help="reader threads (default 6)")
    io.add_argument("--out", default="out", help="folder for plots and the JSON result (default: out)")
    io.add_argument("--json", action="store_true", help="print one JSON object")
    io.set_defaults(func=cmd_bench_io)


def cmd_bench_reader(args) -> int:
    from .bench import reader_bench

    res = reader_bench.run(args.dir, file_mib=args.file_mib, threads=args.threads, repeats=args.repeats,
                           progress=not args.json)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(reader_bench.format_table(res))
    return 0


def cmd_bench_io(args) -> int:
    from .bench import io_bench

    directory = Path(args.dir) if args.dir else Path(tempfile.gettempdir()) / "nchunk-bench"
    log = (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr))
    res = io_bench.run(directory, layers=args.layers, frames=args.frames, methods=tuple(args.methods.split(",")),
                       threads=args.threads, progress=not args.json, log=log)
    res["plots"] = io_bench.plot(res, args.out)
    Path(args.out, "bench_io.json").write_text(io_bench.to_json(res))
    if args.json:
        print(io_bench.to_json(res))
    else:
        print(io_bench.format_table(res))
        print("plots: " + ", ".join(res["plots"]))
    return 0


def _add_verify(sub):
    p = sub.add_parser("verify", help="check every checksum of a weight store",
                       description="Open a store (validating its manifest, files, sizes and alignment), then read "
                       "every weight block and compare its CRC-32 with the manifest. Exit code 0 when intact, "
                       "1 with the file, matrix and offset of each damaged block otherwise.")
    p.add_argument("store", help="store directory (contains manifest.json)")
    p.set_defaults(func=cmd_verify)


def cmd_verify(args) -> int:
    from .store import Store, StoreError

    try:
        store = Store.open(args.store)
        report = store.verify(progress=True)
    except StoreError as exc:
        print(f"nchunk verify: {exc}", file=sys.stderr)
        return 1
    print(report)
    return 0 if getattr(report, "ok", True) else 1


def _add_demo(sub):
    p = sub.add_parser("demo", help="show the flash I/O path on this machine (profile, validation, reader vs fio)",
                       description="Profile the drive holding --dir (quick, cached), write the profile plot, "
                       "validate the cost model on random selection patterns, and compare the reader with fio.")
    p.add_argument("--dir", default=None, help="directory on the drive to use (default: system temp dir)")
    p.add_argument("--out", default="out", help="folder for plots (default: out)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("== 1/2  drive profile and cost-model validation\n", flush=True)
    cmd_profile(argparse.Namespace(dir=args.dir, threads=6, quick=True, force=False, validate=True, patterns=20,
                                   plot=str(out / "profile.png"), json=False))
    print("\n== 2/2  reader vs fio\n", flush=True)
    cmd_bench_reader(argparse.Namespace(dir=args.dir, threads=6, file_mib=256, repeats=3, json=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nchunk", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_profile(sub)
    _add_bench(sub)
    _add_verify(sub)
    _add_demo(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
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
