"""The core subcommands of `nchunk` (profile, bench, convert, calibrate, train-demo, verify): thin shells over
nchunk_core modules.

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

DESCRIPTION = """\
nchunk streams the language backbone of a vision-language model from the NVMe drive, reading for
every frame and layer only the weight rows that matter, chosen so the reads are fast on flash.
"""


def _progress_log(args):
    """Progress messages go to stderr, and nowhere with --json (stdout is then one JSON object)."""
    return (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr))


def _report(args, json_name: str, json_text: str, table: str) -> int:
    """Save a benchmark's JSON result under --out and print it (--json) or its table."""
    Path(args.out, json_name).write_text(json_text)
    print(json_text if args.json else table)
    return 0


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
    log = _progress_log(args)
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


def _add_bench(sub):
    p = sub.add_parser("bench", help="benchmarks (tables, plots, --json)",
                       description="Benchmarks print a table; with --json they print one JSON object.")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    r = bsub.add_parser("reader", help="our direct-I/O reader (both backends) beside fio (sequential 1 MiB, "
                        "random 4 KiB)",
                        description="Sequential 1 MiB and random 4 KiB direct reads through the nchunk reader and "
                        "through fio with the same file, threads and direct I/O, interleaved in one run; the reader "
                        "runs both backends (thread pool, io_uring). Prints throughputs and the ratios ours/fio "
                        "(keys seq_ratio_vs_fio, rand4k_ratio_vs_fio) and io_uring/threads "
                        "(seq_io_uring_vs_threads, rand4k_io_uring_vs_threads).")
    r.add_argument("--dir", default=None, help="directory on the drive to test (default: system temp dir)")
    r.add_argument("--threads", type=int, default=6, help="reader threads and fio jobs (default 6)")
    r.add_argument("--file-mib", type=int, default=512, help="test file size in MiB (default 512)")
    r.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; medians reported (default 3)")
    r.add_argument("--plot", default=None, help="write a PNG of the throughputs")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.set_defaults(func=cmd_bench_reader)
    io = bsub.add_parser("io", help="I/O efficiency of selection methods on 7B-VLM decoder shapes",
                         description="Writes (once, then reuses) stores with the decoder projections of "
                         "LLaVA-OneVision-Qwen2-7B (fp16, bundled and unbundled) on the drive under test, then sweeps "
                         "sparsity 0-70% for magnitude and chunking, with and without hot-cold reordering, reading "
                         "every selection cold through the reader. Prints a table with measured and estimated I/O "
                         "time, retained importance, reads, mean run length and the physical limit; writes PNG "
                         "plots; reports the speedup over magnitude at matched retained importance. Reads check "
                         "every row's CRC-32C, as the runtime does; the cost of those checks is measured apart, "
                         "reading the same selections with and without them, interleaved (verify_overhead); so are the reader's "
                         "backends, thread pool and io_uring (io_uring_vs_threads, bench_io_backends.png).")
    io.add_argument("--dir", default=None, help="directory on the drive under test for the stores "
                    "(default: <system temp dir>/nchunk-bench); about 1 GB per layer")
    io.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    io.add_argument("--frames", type=int, default=10, help="test frames = repetitions per point (default 10)")
    io.add_argument("--methods", default="magnitude,chunking,dp",
                    help="comma-separated selection methods (default magnitude,chunking,dp; magnitude is the baseline)")
    io.add_argument("--sparsities", default=None, help="comma-separated sparsities of the sweep (default "
                    "0,0.1,...,0.7; magnitude also runs 0.8 and 0.9)")
    io.add_argument("--threads", type=int, default=6, help="reader threads (default 6)")
    io.add_argument("--out", default="out", help="folder for plots and the JSON result (default: out)")
    io.add_argument("--json", action="store_true", help="print one JSON object")
    io.set_defaults(func=cmd_bench_io)
    se = bsub.add_parser("session", help="frame-append latency and peak RAM: flash methods vs disk offload vs in RAM",
                         description="Builds (once, then reuses) a VLM of realistic shape with random weights (a "
                         "Qwen2-0.5B-shaped language backbone inside Qwen2.5-VL), converts it to a store, "
                         "and appends the same frames with every method, each in its own process: the flash runtime "
                         "dense (every row read), magnitude and chunking at --sparsity, Hugging Face accelerate's "
                         "disk offload, and the model fully in RAM. Prints frame-append latency split into vision, "
                         "selection, I/O and compute, and the peak resident memory of each process; writes a PNG "
                         "and bench_session.json to --out.")
    se.add_argument("--dir", default=None, help="directory on the drive under test for the model, store and offload "
                    "folder (default: <system temp dir>/nchunk-bench-session); about 3 GB")
    se.add_argument("--frames", type=int, default=4, help="frames appended per method; the first is a warm-up "
                    "(default 4)")
    se.add_argument("--sparsity", type=float, default=0.5, help="sparsity of magnitude and chunking (default 0.5)")
    se.add_argument("--sweep", default="", help="extra chunking sparsities, comma-separated (e.g. 0.3,0.7)")
    se.add_argument("--methods", default="in_ram,dense,magnitude,chunking,accelerate",
                    help="comma-separated, from in_ram, dense, magnitude, chunking, dp, accelerate (default: all "
                    "but dp); a process with nothing loaded (floor) always runs first")
    se.add_argument("--layers", type=int, default=None, help="decoder layers (default: 24, as Qwen2-0.5B)")
    se.add_argument("--rounds", type=int, default=2, help="times every method runs, interleaved; medians over all "
                    "(default 2)")
    se.add_argument("--threads", type=int, default=6, help="reader threads (default 6)")
    se.add_argument("--out", default="out", help="folder for the plot and the JSON result (default: out)")
    se.add_argument("--json", action="store_true", help="print one JSON object")
    se.set_defaults(func=cmd_bench_session)
    ac = bsub.add_parser("accuracy", help="accuracy vs I/O per frame on the trained built-in model",
                         description="Answers the held-out test questions of the shape scenes with the built-in "
                         "model through the real store and reader (one frame in context), at sparsity 0 and "
                         "10-70% for magnitude and chunking on the hot-cold order (sparsity spread uniformly and, "
                         "with the store's allocation, layer-wise), and chunking in the latency-budget mode at three "
                         "frame budgets, interleaved per frame. Prints "
                         "accuracy per question kind and the frame's I/O time, bytes and reads per setting, and the "
                         "I/O speedup of chunking over magnitude at matched accuracy (linear interpolation, the "
                         "paper's protocol); writes bench_accuracy.png and bench_accuracy.json to --out.")
    ac.add_argument("--store", default=None, help="store of a model trained on the shape scenes "
                    "(default: the built-in model)")
    ac.add_argument("--scenes", type=int, default=None, help="test scenes (default: the whole test set, 500, "
                    "about 3.8 questions each; every scene runs 32 settings, about 14 s per scene on 2 CPU "
                    "cores, so --scenes 120 takes about 28 min)")
    ac.add_argument("--methods", default="magnitude,chunking", help="comma-separated (default magnitude,chunking)")
    ac.add_argument("--allocations", default="uniform,layerwise", help="comma-separated: uniform, layerwise "
                    "(default both; layerwise needs a store with an allocation)")
    ac.add_argument("--budgets-ms", default="", help="comma-separated frame budgets in ms (default: 0.9, 1.2 and "
                    "1.6 times the median dense frame time of a warm-up)")
    ac.add_argument("--threads", type=int, default=6, help="reader threads (default 6)")
    ac.add_argument("--out", default="out", help="folder for the plot and the JSON result (default: out)")
    ac.add_argument("--json", action="store_true", help="print one JSON object")
    ac.set_defaults(func=cmd_bench_accuracy)
    ca = bsub.add_parser("calibration", help="how much the hot-cold order changes with 8, 16, 32 calibration frames",
                         description="One dense calibration pass, as nchunk convert makes it, over the largest "
                         "--snapshots count of frames and --held-out more; per streamed input, the hot-cold order of "
                         "the first n frames for each n against the order of the most frames: overlap of the top-30 "
                         "%% and top-50 %% rows, Spearman rank correlation, and the importance a chunking selection "
                         "at 30 %% and 50 %% sparsity keeps on the held-out frames (relative to the reference order; "
                         "the checkpoint's own order for scale). Prints a table per store; writes "
                         "bench_calibration.png and bench_calibration.json to --out.")
    ca.add_argument("stores", metavar="STORE", nargs="*", help="stores to measure (default: the built-in model's)")
    ca.add_argument("--frames", metavar="FRAMES_DIR", default=None, help="folder of camera frames (default: "
                    "rendered shape scenes: training scenes calibrate, validation scenes are held out)")
    ca.add_argument("--snapshots", default="8,16,32", help="calibration frame counts compared (default 8,16,32)")
    ca.add_argument("--held-out", type=int, default=8, help="frames the selections are scored on (default 8)")
    ca.add_argument("--frame-tokens", default="auto", help="frame mode of the pass, as nchunk convert's (default auto)")
    ca.add_argument("--size", default="320x240", help="WxH of the rendered scenes (default 320x240)")
    ca.add_argument("--threads", type=int, default=6, help="reader threads (default 6)")
    ca.add_argument("--out", default="out", help="folder for the plot and the JSON result (default: out)")
    ca.add_argument("--json", action="store_true", help="print one JSON object")
    ca.set_defaults(func=cmd_bench_calibration)
    pb = bsub.add_parser("published", help="tokens per frame, append time and conversion time of the published "
                         "checkpoints (replicas at their real dimensions)",
                         description="For each layout (idefics3 = SmolVLM-256M-Instruct, smolvlm = "
                         "SmolVLM2-256M-Video-Instruct, llava_onevision = llava-onevision-qwen2-0.5b-ov-hf, "
                         "qwen2_5_vl = Qwen2.5-VL-3B-Instruct): builds a replica at the published dimensions "
                         "(random weights, bf16 shards; reused from --work), converts it with nchunk convert's "
                         "defaults on rendered 640x480 scenes (write, calibration, hot-cold rewrite, sensitivity; "
                         "a sensitivity step estimated above --sensitivity-limit is stopped after its first input "
                         "and its estimate reported), then appends 640x480 frames in every frame mode at each "
                         "sparsity (one warm-up, medians): visual tokens per frame and append time split into "
                         "vision, selection, I/O and compute. On 2 CPU cores expect about 15 min per SmolVLM "
                         "layout, 30-60 min for LLaVA-OneVision (its tiles mode is 1-3 min a frame) and longer "
                         "for Qwen2.5-VL-3B (use --qwen-layers: figures are then also scaled to 36 layers, marked "
                         "extrapolated). Writes published_<layout>.json as each layout finishes, and published.json "
                         "and published.png (every layout result in --out) at the end; progress goes to stderr.")
    pb.add_argument("--layouts", default="idefics3,smolvlm,llava_onevision,qwen2_5_vl",
                    help="comma-separated layouts (default: all four; empty: only report the results in --out)")
    pb.add_argument("--work", default=None, help="folder for replicas, stores and calibration frames, reused while "
                    "their settings match (default: <system temp dir>/nchunk-bench-published); about 25 GB for all")
    pb.add_argument("--dimensions", default="published", choices=("published", "tiny"),
                    help="published (real sizes) or tiny (the test backbone; seconds)")
    pb.add_argument("--qwen-layers", type=int, default=None, help="decoder layers of the Qwen2.5-VL replica "
                    "(default: all 36)")
    pb.add_argument("--frames", type=int, default=2, help="measured frames per mode and sparsity, after one "
                    "warm-up frame per mode (default 2; 0: the warm-up frame alone, at the first sparsity)")
    pb.add_argument("--sparsities", default=None, help="comma-separated (default: 0 and the shipped store's "
                    "recommended sparsity)")
    pb.add_argument("--modes", default=None, help="comma-separated frame modes, where a layout has them "
                    "(default: every mode of each layout)")
    pb.add_argument("--calib-frames", type=int, default=None, help="calibration frames (default: nchunk convert's)")
    pb.add_argument("--sensitivity-limit", type=float, default=300.0, help="seconds: a sensitivity step "
                    "estimated longer is stopped after its first input, and its estimate reported (default 300)")
    pb.add_argument("--threads", type=int, default=6, help="reader threads (default 6)")
    pb.add_argument("--out", default="out", help="folder for the plot and the JSON results (default: out)")
    pb.add_argument("--json", action="store_true", help="print one JSON object")
    pb.set_defaults(func=cmd_bench_published)


def cmd_bench_reader(args) -> int:
    from nchunk_core.bench import reader_bench

    res = reader_bench.run(args.dir, file_mib=args.file_mib, threads=args.threads, repeats=args.repeats,
                           progress=not args.json)
    if args.plot:
        reader_bench.plot(res, args.plot)
        res["plot"] = args.plot
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(reader_bench.format_table(res))
    return 0


def cmd_bench_io(args) -> int:
    from nchunk_core.bench import io_bench

    directory = Path(args.dir) if args.dir else Path(tempfile.gettempdir()) / "nchunk-bench"
    log = _progress_log(args)
    sparsities = [float(s) for s in args.sparsities.split(",")] if args.sparsities else None
    res = io_bench.run(directory, layers=args.layers, frames=args.frames, methods=tuple(args.methods.split(",")),
                       threads=args.threads, progress=not args.json, log=log, sparsities=sparsities)
    res["plots"] = io_bench.plot(res, args.out)
    return _report(args, "bench_io.json", io_bench.to_json(res),
                   io_bench.format_table(res) + "\nplots: " + ", ".join(res["plots"]))


def cmd_bench_session(args) -> int:
    from nchunk_core.bench import session_bench, session_report

    directory = Path(args.dir) if args.dir else Path(tempfile.gettempdir()) / "nchunk-bench-session"
    log = _progress_log(args)
    sweep = tuple(float(x) for x in args.sweep.split(",") if x.strip())
    res = session_bench.run(directory, frames=args.frames, sparsity=args.sparsity, sweep=sweep,
                            methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                            layers=args.layers, threads=args.threads, rounds=args.rounds, log=log)
    res["plot"] = session_report.plot(res, args.out)
    return _report(args, "bench_session.json", json.dumps(res, indent=1),
                   session_report.format_table(res) + f"\nplot: {res['plot']}")


def cmd_bench_accuracy(args) -> int:
    from nchunk_core.bench import accuracy_bench
    from nchunk_core.demo.train_settings import TEST_SCENES

    res = accuracy_bench.run(args.store, scene_count=args.scenes or TEST_SCENES,
                             methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                             threads=args.threads, log=_progress_log(args),
                             budgets_ms=[float(b) for b in args.budgets_ms.split(",") if b.strip()] or None,
                             allocations=tuple(a.strip() for a in args.allocations.split(",") if a.strip()))
    res["plot"] = accuracy_bench.plot(res, args.out)
    return _report(args, "bench_accuracy.json", accuracy_bench.to_json(res),
                   accuracy_bench.format_table(res) + f"\nplot: {res['plot']}")


def cmd_bench_calibration(args) -> int:
    from nchunk_core.bench import calibration_bench
    from nchunk_core.demo.model import shipped_store

    width, height = (int(v) for v in args.size.lower().split("x"))
    results = [calibration_bench.run(store, args.frames, [int(n) for n in args.snapshots.split(",") if n.strip()],
                                     args.held_out, args.frame_tokens, width, height, args.threads,
                                     log=_progress_log(args))
               for store in (args.stores or [shipped_store()])]
    json_path, png = calibration_bench.save(results, args.out)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print("\n\n".join(calibration_bench.format_table(r) for r in results) + f"\nplot: {png}\njson: {json_path}")
    return 0


def cmd_bench_published(args) -> int:
    from nchunk_core.bench import published_bench, published_report

    work = Path(args.work) if args.work else Path(tempfile.gettempdir()) / "nchunk-bench-published"
    sparsities = [float(v) for v in args.sparsities.split(",")] if args.sparsities else None
    modes = args.modes.split(",") if args.modes else None
    run = {"argv": sys.argv[1:], "start": published_bench.machine()}
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731 (long run: progress even with --json)
    for layout in [name for name in args.layouts.split(",") if name]:
        arch_modes = published_bench.adapter_modes(layout)
        res = published_bench.run_layout(
            layout, work, dimensions=args.dimensions, text_layers=args.qwen_layers if layout == "qwen2_5_vl" else None,
            calib_frames=args.calib_frames, frames=args.frames, sparsities=sparsities,
            modes=[m for m in modes if m in arch_modes] if modes else None,
            sensitivity_limit_s=args.sensitivity_limit, threads=args.threads, log=log)
        log(f"saved {published_report.save_layout(res, args.out)}")
    run["end"] = published_bench.machine()
    report = published_report.merged(args.out, run)
    png = published_report.plot(report, Path(args.out, published_report.PLOT))
    return _report(args, published_report.MERGED, json.dumps(report, indent=1),
                   published_report.format_table(report) + f"\nplot: {png}")


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
    for add in (_add_profile, _add_bench, _add_convert, _add_calibrate, _add_train_demo, _add_verify, _add_upgrade,
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
