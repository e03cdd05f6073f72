"""`nchunk`: the command-line entry point. The core subcommands (profile, bench, convert, train-demo,
verify) come from nchunk_core/cli.py; this module adds the ROS 2 ones (ask, demo, soak).

Parsing, `--help` included, imports neither ROS nor torch: each command imports what it needs when
it runs, and a ROS command first checks that the ROS 2 layer imports, with a clear message if not.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nchunk_core import cli as core


def _ros_available(command: str) -> bool:
    """Whether the ROS 2 layer imports (checked when a ROS command runs, never while parsing)."""
    try:
        import nchunk_ros.ask_client  # noqa: F401  (rclpy, the messages and nchunk_interfaces)
    except ImportError as exc:
        print(f"nchunk {command}: the ROS 2 layer is not available ({exc}). Run scripts/setup.sh (ROS 2 from "
              "PyPI wheels and the nchunk_interfaces package) or source a ROS 2 workspace that has them.",
              file=sys.stderr)
        return False
    return True


def _add_ask(sub):
    p = sub.add_parser("ask", help="ask the running VQA node a question over /ask",
                       description="Send one question to the VQA node's /ask service (nchunk_interfaces/srv/Ask) "
                       "and print the answer, what it was based on (frames in context, the newest frame's age, "
                       "tokens) and where the time and drive reads went. Exit code 0 when the node answered, 1 "
                       "when it refused or failed (the reason on stderr) or no service was found. Uses the "
                       "environment's ROS_DOMAIN_ID.")
    p.add_argument("question", help="the question, in quotes")
    p.add_argument("--max-new-tokens", type=int, default=0, help="answer length limit (default 0: the node's "
                   "max_new_tokens)")
    p.add_argument("--reset", action="store_true", help="answer from the newest frame only, and start a new "
                   "episode from it (reset_context)")
    p.add_argument("--timeout", type=float, default=0.0, help="deadline in seconds, waiting included (default 0: "
                   "the node's ask_timeout_s)")
    p.add_argument("--wait", type=float, default=10.0, help="seconds to wait for the service to appear (default 10)")
    p.add_argument("--service", default="/ask", help="service name (default /ask)")
    p.add_argument("--json", action="store_true", help="print every response field as one JSON object")
    p.add_argument("--stream", action="store_true", help="ask through the action of that name (nchunk_interfaces/"
                   "action/Ask) and print the answer token by token as it is generated; Ctrl-C cancels the question")
    p.set_defaults(func=cmd_ask)


def cmd_ask(args) -> int:
    if not _ros_available("ask"):
        return 1
    from nchunk_ros.ask_client import run

    return run(args.question, max_new_tokens=args.max_new_tokens, reset_context=args.reset,
               timeout_s=args.timeout, wait_s=args.wait, service=args.service, as_json=args.json,
               stream=args.stream)


def _add_demo(sub):
    p = sub.add_parser("demo", help="the VQA node, a synthetic camera and questions over ROS 2, on this machine",
                       description="Start the VQA node on a store (--store, or the built-in model trained on scenes of "
                       "coloured shapes), a synthetic camera publishing held-out scenes of that kind with their "
                       "ground truth, and ask each scene's questions over the real /ask service, answers beside the "
                       "truth; change the sparsity live through the parameter "
                       "service and show the drive reads per frame under each setting. Needs no ROS install (the "
                       "PyPI wheels of scripts/setup.sh), no download and no network. With --io: the flash I/O "
                       "path alone instead (drive profile, cost-model validation, reader vs fio).")
    p.add_argument("--store", default=None, help="store to answer from (default: the built-in model)")
    p.add_argument("--io", action="store_true", help="show the flash I/O path only: profile the drive holding --dir, "
                   "validate the cost model, compare the reader with fio (no ROS)")
    p.add_argument("--dir", default=None, help="--io: directory on the drive to use (default: system temp dir)")
    p.add_argument("--out", default="out", help="--io: folder for plots (default: out)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    if args.io:
        return _demo_io(args)
    if not _ros_available("demo"):
        return 1
    from nchunk_ros.tools.demo import run

    return run(args.store)


def _demo_io(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("== 1/2  drive profile and cost-model validation\n", flush=True)
    core.cmd_profile(argparse.Namespace(dir=args.dir, threads=6, quick=True, force=False, validate=True, patterns=20,
                                        plot=str(out / "profile.png"), json=False))
    print("\n== 2/2  reader vs fio\n", flush=True)
    core.cmd_bench_reader(argparse.Namespace(dir=args.dir, threads=6, file_mib=256, repeats=3, json=False))
    return 0


def _add_soak(sub):
    p = sub.add_parser("soak", help="long run: the node, a fast camera and a question every few seconds",
                       description="Start the VQA node (config/vqa.yaml, the built-in model unless --store) and the "
                       "synthetic camera as separate processes, ask a question every --ask-every seconds for "
                       "--minutes, sample the node's resident memory and its intake counters, then stop both with "
                       "SIGTERM (their logs go to a temporary folder that the summary names). Exit code 0 when "
                       "every question was answered and both processes exited 0.")
    p.add_argument("--minutes", type=float, default=10.0, help="length of the run (default 10)")
    p.add_argument("--rate", type=float, default=30.0, help="camera frames per second (default 30)")
    p.add_argument("--width", type=int, default=640, help="frame width (default 640)")
    p.add_argument("--height", type=int, default=480, help="frame height (default 480)")
    p.add_argument("--ask-every", type=float, default=5.0, help="seconds between questions (default 5)")
    p.add_argument("--store", default=None, help="store to answer from (default: the built-in model)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(func=cmd_soak)


def cmd_soak(args) -> int:
    if not _ros_available("soak"):
        return 1
    from nchunk_ros.tools.soak import run

    return run(args.minutes, args.rate, args.width, args.height, args.ask_every, args.store, args.json)


ROS_COMMANDS = (_add_ask, _add_demo, _add_soak)


def build_parser() -> argparse.ArgumentParser:
    return core.build_parser(ROS_COMMANDS)


def main(argv=None) -> int:
    return core.main(argv, ROS_COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
