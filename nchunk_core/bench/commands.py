"""`nchunk bench ...`: the benchmark subcommands, thin shells over the nchunk_core.bench modules
(reader, io, session, accuracy, calibration, published), and the output helpers every core command
shares. Building the parsers imports no heavy module: each command imports what it needs when it
runs (nchunk_core/cli.py, which adds these to the `nchunk` parser).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path


def progress_log(args):
    """Progress messages go to stderr, and nowhere with --json (stdout is then one JSON object)."""
    return (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr))


def items(text: str | None) -> list[str]:
    """The items of a comma-separated option (None: none), stripped, empty ones left out."""
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def report(args, json_name: str, json_text: str, table: str) -> int:
    """Save a benchmark's JSON result under --out and print it (--json) or its table."""
    Path(args.out, json_name).write_text(json_text)
    print(json_text if args.json else table)
    return 0


def add_bench(sub):
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
    log = progress_log(args)
    sparsities = [float(s) for s in args.sparsities.split(",")] if args.sparsities else None
    res = io_bench.run(directory, layers=args.layers, frames=args.frames, methods=tuple(args.methods.split(",")),
                       threads=args.threads, progress=not args.json, log=log, sparsities=sparsities)
    res["plots"] = io_bench.plot(res, args.out)
    return report(args, "bench_io.json", io_bench.to_json(res),
                  io_bench.format_table(res) + "\nplots: " + ", ".join(res["plots"]))


def cmd_bench_session(args) -> int:
    from nchunk_core.bench import session_bench, session_report

    directory = Path(args.dir) if args.dir else Path(tempfile.gettempdir()) / "nchunk-bench-session"
    log = progress_log(args)
    sweep = tuple(float(x) for x in items(args.sweep))
    res = session_bench.run(directory, frames=args.frames, sparsity=args.sparsity, sweep=sweep,
                            methods=tuple(items(args.methods)),
                            layers=args.layers, threads=args.threads, rounds=args.rounds, log=log)
    res["plot"] = session_report.plot(res, args.out)
    return report(args, "bench_session.json", json.dumps(res, indent=1),
                  session_report.format_table(res) + f"\nplot: {res['plot']}")


def cmd_bench_accuracy(args) -> int:
    from nchunk_core.bench import accuracy_bench
    from nchunk_core.demo.train_settings import TEST_SCENES

    res = accuracy_bench.run(args.store, scene_count=args.scenes or TEST_SCENES,
                             methods=tuple(items(args.methods)),
                             threads=args.threads, log=progress_log(args),
                             budgets_ms=[float(b) for b in items(args.budgets_ms)] or None,
                             allocations=tuple(items(args.allocations)))
    res["plot"] = accuracy_bench.plot(res, args.out)
    return report(args, "bench_accuracy.json", accuracy_bench.to_json(res),
                  accuracy_bench.format_table(res) + f"\nplot: {res['plot']}")


def cmd_bench_calibration(args) -> int:
    from nchunk_core.bench import calibration_bench
    from nchunk_core.demo.model import shipped_store

    width, height = (int(v) for v in args.size.lower().split("x"))
    results = [calibration_bench.run(store, args.frames, [int(n) for n in items(args.snapshots)],
                                     args.held_out, args.frame_tokens, width, height, args.threads,
                                     log=progress_log(args))
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
    modes = items(args.modes) or None
    run = {"argv": sys.argv[1:], "start": published_bench.machine()}
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731 (long run: progress even with --json)
    for layout in items(args.layouts):
        arch_modes = published_bench.adapter_modes(layout)
        res = published_bench.run_layout(
            layout, work, dimensions=args.dimensions, text_layers=args.qwen_layers if layout == "qwen2_5_vl" else None,
            calib_frames=args.calib_frames, frames=args.frames, sparsities=sparsities,
            modes=[m for m in modes if m in arch_modes] if modes else None,
            sensitivity_limit_s=args.sensitivity_limit, threads=args.threads, log=log)
        log(f"saved {published_report.save_layout(res, args.out)}")
    run["end"] = published_bench.machine()
    merged = published_report.merged(args.out, run)
    png = published_report.plot(merged, Path(args.out, published_report.PLOT))
    return report(args, published_report.MERGED, json.dumps(merged, indent=1),
                  published_report.format_table(merged) + f"\nplot: {png}")
