"""`nchunk soak`: a long run of the VQA node with a fast camera and regular questions.

The node and the synthetic camera run as separate processes (as on a robot), started with the
package's parameters file; this process asks a question every few seconds over /ask, listens to the
node's statistics, and samples the node's resident memory. At the end both processes get SIGTERM and
must exit 0. Prints a summary (and JSON with --json): resident memory at start and end, frames
received, appended and skipped, questions asked and answered, answer latency, and the folder with
the two processes' logs (their stderr).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions

from nchunk_core.demo.model import shipped_store

from nchunk_ros import diagnostics
from nchunk_ros.ask_client import AskClient
from nchunk_ros.worker import Counters

CONFIG = Path(__file__).resolve().parents[2] / "config" / "vqa.yaml"
QUESTIONS = ["What color is the circle?", "How many squares are there?", "Is there a red triangle?",
             "What is left of the blue square?"]


WARM_UP_FRACTION = 0.2  # the first fifth of the run is warm-up (allocator pools, caches, first profiles)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _process(module: str, ros_args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """Start `module`'s main() with `ros_args`; its stderr (the ROS log) goes to `log`."""
    code = f"import sys; from {module} import main; sys.exit(main())"
    with log.open("w") as stderr:  # the child keeps its own handle
        return subprocess.Popen([sys.executable, "-c", code, "--ros-args", *ros_args], env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr)


class StatisticsListener(Node):
    """Keeps the latest counters of the node's intake status."""

    def __init__(self, context: Context):
        super().__init__("nchunk_soak_listener", context=context)
        self.intake = Counters()
        self.create_subscription(DiagnosticArray, "/vqa_node/statistics", self._on_stats, 10)

    def _on_stats(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name == diagnostics.INTAKE:
                self.intake = diagnostics.counters_from(status)


def run(minutes: float = 10.0, rate_hz: float = 30.0, width: int = 640, height: int = 480,
        ask_every_s: float = 5.0, store: str | None = None, as_json: bool = False) -> int:
    store = store or str(shipped_store())
    # a domain of its own, on this host: the child processes and this one's rclpy context share it
    os.environ.update(ROS_DOMAIN_ID=str(random.randint(110, 200)), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
    env = dict(os.environ)
    logs = Path(tempfile.mkdtemp(prefix="nchunk-soak-"))
    node = _process("nchunk_ros.vqa_node", ["--params-file", str(CONFIG), "-p", f"store_path:={store}"], env,
                    logs / "vqa_node.log")
    camera = _process("nchunk_ros.tools.synthetic_camera",
                      ["-p", f"rate_hz:={float(rate_hz)}", "-p", f"width:={width}", "-p", f"height:={height}"], env,
                      logs / "synthetic_camera.log")
    context = Context()
    rclpy.init(args=[], context=context, signal_handler_options=SignalHandlerOptions.NO)
    listener = StatisticsListener(context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(listener)
    client = AskClient(context=context)
    answers, latencies, failures = 0, [], []
    rss = {}
    try:
        if not client.wait_for_service(120.0):
            raise RuntimeError("the node's /ask service did not appear within 120 s")
        waited = time.monotonic() + 60.0  # questions are about frames: the first waits for one in context
        while listener.intake.frames_appended < 1:
            if time.monotonic() > waited:
                raise RuntimeError("no camera frame reached the node within 60 s")
            executor.spin_once(timeout_sec=0.2)
        start = time.monotonic()
        end = start + 60.0 * minutes
        asked = 0
        while time.monotonic() < end:
            due = start + asked * ask_every_s
            while time.monotonic() < due:
                executor.spin_once(timeout_sec=min(0.2, max(0.0, due - time.monotonic())))
            t0 = time.monotonic()
            try:
                r = client.ask(QUESTIONS[asked % len(QUESTIONS)], timeout_s=30.0)
                ok, err = r.success, r.error
            except TimeoutError as exc:
                ok, err = False, str(exc)
            latencies.append(time.monotonic() - t0)
            answers += int(ok)
            if not ok:
                failures.append(err)
            asked += 1
            rss.setdefault("start_mib", _rss_mib(node.pid))
            rss["end_mib"] = _rss_mib(node.pid)
            if time.monotonic() - start >= WARM_UP_FRACTION * 60.0 * minutes:
                rss.setdefault("warm_mib", rss["end_mib"])  # the first sample after the warm-up
            rss["max_mib"] = max(rss.get("max_mib", 0.0), rss["end_mib"])
            if not as_json:
                print(f"\r{(time.monotonic() - start) / 60:5.1f} min  asked {asked}  answered {answers}  "
                      f"node RSS {rss['end_mib']:.0f} MiB  intake {listener.intake.frames_appended} "
                      f"appended / {listener.intake.frames_skipped} skipped", end="", flush=True)
        executor.spin_once(timeout_sec=1.5)  # one more intake status
    finally:
        client.close()
        executor.shutdown()
        listener.destroy_node()
        rclpy.try_shutdown(context=context)
        codes = {}
        for name, proc in (("camera", camera), ("node", node)):
            proc.send_signal(signal.SIGTERM)
            try:
                codes[name] = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = "killed"
    lat = sorted(latencies)
    result = {
        "minutes": minutes, "camera": f"{width}x{height} rgb8 at {rate_hz:g} Hz", "ask_every_s": ask_every_s,
        "node_rss_start_mib": round(rss.get("start_mib", float("nan")), 1),
        "node_rss_end_mib": round(rss.get("end_mib", float("nan")), 1),
        "node_rss_max_mib": round(rss.get("max_mib", float("nan")), 1),
        "node_rss_after_warm_up_mib": round(rss.get("warm_mib", float("nan")), 1),
        # RSS at the end relative to the first sample after the warm-up (+0.03 = grew by 3 %)
        "node_rss_drift_after_warm_up": round(rss["end_mib"] / rss["warm_mib"] - 1.0, 4) if "warm_mib" in rss else None,
        "intake": dataclasses.asdict(listener.intake), "asked": len(latencies), "answered": answers, "failures": failures[:10],
        "answer_s_p50": lat[len(lat) // 2] if lat else None, "answer_s_max": lat[-1] if lat else None,
        "exit_codes": codes, "logs": str(logs),
    }
    if as_json:
        print(json.dumps(result, indent=1))
    else:
        print()
        for key, value in result.items():
            print(f"{key:<20} {value}")
    ok = answers == len(latencies) and all(c == 0 for c in codes.values())
    return 0 if ok else 1
