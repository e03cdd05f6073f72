"""Delivery bench: how many best-effort sensor_msgs/Image frames reach a subscriber in another process.

    python -m nchunk_ros.tools.delivery_bench                      # default matrix
    python -m nchunk_ros.tools.delivery_bench --sizes 640x480 --rates 5 --configs default,sub_profile
    python -m nchunk_ros.tools.delivery_bench --json
    python -m nchunk_ros.tools.delivery_bench --configs node,node_plain --rates 5,15 --append-rate 2

For every (configuration, size, rate) it starts a subscriber process and then a publisher process
(both plain rclpy, rgb8 frames, sensor-data QoS on the publisher: best effort, KEEP_LAST 5; the
subscriber is the node's: best effort, KEEP_LAST 1, volatile), publishes a bounded number of frames
and prints published / received. Everything stays on this host: each run has a domain of its own
and discovery is limited to loopback (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST, or, where a Fast DDS
profile is applied, a loopback-only copy of it). Every child has a hard time limit; the bench exits
by itself.

Configurations (--configs); "plain" = no profile and ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST:
  default        both plain; the publisher publishes at once, like a driver started by hand
  wait_match     both plain; the publisher waits until it sees the subscriber before its first frame
  pub_shm16      publisher with a 16 MiB shared-memory segment, subscriber with default transports
  sub_udp_small  plain publisher; subscriber on UDP only with the OS default receive buffer
  sub_profile    plain publisher; subscriber as the node runs with its profile under LOCALHOST
                 (config/fastdds_camera_localhost.xml, range SYSTEM_DEFAULT)
  sub_profile_nowait           as sub_profile, the publisher publishes at once
  both_profile                 that profile on both processes
  sub_profile_as_is_localhost  config/fastdds_camera.xml on the subscriber with the range left at
                 LOCALHOST: rmw_fastrtps adds its default SHM + UDP and the profile does not help
  node           the subscriber is the real VQA node (VQANode on --store, default the built-in model,
                 max_frames 1, max_append_rate_hz --append-rate), its camera transport profile applied
                 as its main does; also reports the frames it appended. One node serves every row.
  node_plain     the same node with plain loopback transports (SHM + UDP, OS buffers), as when the
                 user's own FASTDDS_DEFAULT_PROFILES_FILE is set and the node leaves it alone
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository (nchunk_ros/tools/ is two levels down)
PROFILE = ROOT / "config" / "fastdds_camera.xml"
PROFILE_LOCALHOST = PROFILE.with_name("fastdds_camera_localhost.xml")
CHILD_LIMIT_S = 45.0

# Loopback-only Fast DDS profiles for the bench. {transports} is filled per configuration.
_XML = """<?xml version="1.0" encoding="UTF-8"?>
<dds xmlns="http://www.eprosima.com">
  <profiles>
    <transport_descriptors>{descriptors}</transport_descriptors>
    <participant profile_name="bench" is_default_profile="true">
      <rtps>
        <builtin>
          <metatrafficUnicastLocatorList><locator><udpv4><address>127.0.0.1</address></udpv4></locator></metatrafficUnicastLocatorList>
          <initialPeersList><locator><udpv4><address>127.0.0.1</address></udpv4></locator></initialPeersList>
        </builtin>
        <userTransports>{ids}</userTransports>
        <useBuiltinTransports>false</useBuiltinTransports>
      </rtps>
    </participant>
  </profiles>
</dds>
"""
_UDP = ("<transport_descriptor><transport_id>{id}</transport_id><type>UDPv4</type>"
        "<maxInitialPeersRange>32</maxInitialPeersRange>"
        "<interfaceWhiteList><address>127.0.0.1</address></interfaceWhiteList>{bufs}</transport_descriptor>")
_SHM = "<transport_descriptor><transport_id>{id}</transport_id><type>SHM</type>{seg}</transport_descriptor>"


def _loopback_profile(path: Path, shm_segment: int | None, udp_buffer: int | None, with_shm: bool = True) -> str:
    """A loopback-only profile: UDP on 127.0.0.1 (with `udp_buffer` socket buffers) and SHM."""
    bufs = "" if udp_buffer is None else (f"<sendBufferSize>{udp_buffer}</sendBufferSize>"
                                          f"<receiveBufferSize>{udp_buffer}</receiveBufferSize>")
    descriptors = _UDP.format(id="udp", bufs=bufs)
    ids = "<transport_id>udp</transport_id>"
    if with_shm:
        seg = "" if shm_segment is None else f"<segment_size>{shm_segment}</segment_size>"
        descriptors = _SHM.format(id="shm", seg=seg) + descriptors
        ids = "<transport_id>shm</transport_id>" + ids
    path.write_text(_XML.format(descriptors=descriptors, ids=ids))
    return str(path)


def configurations(tmp: Path) -> dict[str, dict]:
    """name -> {"pub_env", "sub_env", "wait_match"}; env values of None remove the variable."""
    local = {"ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST", "FASTDDS_DEFAULT_PROFILES_FILE": None}

    def prof(xml: str) -> dict:
        # SYSTEM_DEFAULT leaves the participant as the profile sets it (LOCALHOST would add rmw's own
        # default SHM + UDP transports next to the profile's); the profile itself is loopback-only.
        return {"ROS_AUTOMATIC_DISCOVERY_RANGE": "SYSTEM_DEFAULT", "FASTDDS_DEFAULT_PROFILES_FILE": xml}

    configs = {
        "default": {"pub_env": local, "sub_env": local, "wait_match": False},
        "wait_match": {"pub_env": local, "sub_env": local, "wait_match": True},
        "pub_shm16": {"pub_env": prof(_loopback_profile(tmp / "pub_shm16.xml", 16 << 20, None)),
                      "sub_env": prof(_loopback_profile(tmp / "sub_plain.xml", None, None)), "wait_match": True},
        "sub_udp_small": {"pub_env": local,
                          "sub_env": prof(_loopback_profile(tmp / "sub_udp_small.xml", None, None, with_shm=False)),
                          "wait_match": True},
    }
    # What the node does (docs/camera_transport.md): with LOCALHOST it applies the loopback variant
    # of its profile and sets the range to SYSTEM_DEFAULT. The publisher is a plain one, LOCALHOST,
    # no profile: any camera driver on this host.
    node = {"ROS_AUTOMATIC_DISCOVERY_RANGE": "SYSTEM_DEFAULT", "FASTDDS_DEFAULT_PROFILES_FILE": str(PROFILE_LOCALHOST)}
    configs["sub_profile"] = {"pub_env": local, "sub_env": node, "wait_match": True}
    configs["sub_profile_nowait"] = {"pub_env": local, "sub_env": node, "wait_match": False}
    configs["both_profile"] = {"pub_env": node, "sub_env": node, "wait_match": True}
    # the pitfall: the general profile as is, with LOCALHOST (rmw_fastrtps adds its default SHM + UDP)
    configs["sub_profile_as_is_localhost"] = {"pub_env": local, "wait_match": True,
                                              "sub_env": local | {"FASTDDS_DEFAULT_PROFILES_FILE": str(PROFILE)}}
    # The real node: its main() applies the profile to an environment like `local`; node_plain has a
    # profile of the user's (plain loopback), which the node leaves alone.
    configs["node"] = {"pub_env": local, "sub_env": local, "wait_match": True, "node": True}
    configs["node_plain"] = {"pub_env": local, "wait_match": True, "node": True,
                             "sub_env": prof(_loopback_profile(tmp / "node_plain.xml", None, None))}
    return configs


# -- child processes -------------------------------------------------------------------------------
def _child_pub(a) -> int:
    import array

    import rclpy
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    rclpy.init(args=[])
    node = rclpy.create_node("bench_camera")
    pub = node.create_publisher(Image, a.topic, qos_profile_sensor_data)
    msg = Image(height=a.height, width=a.width, encoding="rgb8", step=a.width * 3)
    msg.data = array.array("B", bytes(range(256)) * (a.width * a.height * 3 // 256) +
                           bytes(a.width * a.height * 3 % 256))
    t0 = time.monotonic()
    if a.wait_match:
        while pub.get_subscription_count() == 0 and time.monotonic() - t0 < 10.0:
            time.sleep(0.01)
    waited = time.monotonic() - t0
    matched_at_first = pub.get_subscription_count()
    start = time.monotonic()
    for i in range(a.count):
        time.sleep(max(0.0, start + i / a.rate - time.monotonic()))
        msg.header.frame_id = str(i)
        msg.header.stamp = node.get_clock().now().to_msg()
        pub.publish(msg)
    time.sleep(a.linger)  # keep the writer alive while the last frames are in flight
    print(json.dumps({"published": a.count, "matched_at_first_publish": matched_at_first,
                      "match_wait_s": round(waited, 3), "publish_s": round(time.monotonic() - start, 3)}),
          flush=True)
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


def _child_sub(a) -> int:
    import select

    import rclpy
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    rclpy.init(args=[])
    node = rclpy.create_node("bench_listener")
    seqs, sizes = [], set()
    qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=a.depth, durability=DurabilityPolicy.VOLATILE,
                     reliability=ReliabilityPolicy.BEST_EFFORT)
    def on_image(msg):
        seqs.append(int(msg.header.frame_id) if msg.header.frame_id.isdigit() else -1)
        sizes.add(len(msg.data))

    node.create_subscription(Image, "/bench/image", on_image, qos)
    print("READY", flush=True)
    deadline = time.monotonic() + CHILD_LIMIT_S
    while time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.05)
        if select.select([sys.stdin], [], [], 0)[0]:
            break  # the parent says stop
    print(json.dumps({"received": len(seqs), "first": seqs[0] if seqs else None, "sizes": sorted(sizes)}), flush=True)
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


def _child_node(a) -> int:
    """The VQA node as its main() runs it (profile first, then rclpy.init); on stdin, "c" prints its
    counters as one JSON line and "stop" ends it."""
    import dataclasses
    import threading

    from nchunk_ros import camera_transport

    profile = camera_transport.apply_camera_transport_profile(os.environ)
    import rclpy
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter

    from nchunk_ros import vqa_node

    rclpy.init(args=[])
    values = {"store_path": a.store, "image_topics": ["/bench/image"], "max_frames": 1,
              "max_append_rate_hz": a.append_rate, "sparsity": 0.1}
    node = vqa_node.VQANode(parameter_overrides=[Parameter(k, value=v) for k, v in values.items()])
    executor = MultiThreadedExecutor(num_threads=vqa_node.EXECUTOR_THREADS)
    executor.add_node(node)
    spinner = threading.Thread(target=vqa_node.spin, args=(executor,), daemon=True)
    spinner.start()
    print("READY " + json.dumps({"profile": profile}), flush=True)
    for line in sys.stdin:
        if line.strip() != "c":
            break
        print(json.dumps(dataclasses.asdict(node.counters())), flush=True)
    node.stop()
    executor.shutdown()
    node.destroy_node()
    rclpy.try_shutdown()
    spinner.join(5.0)
    return 0


class NodeSubscriber:
    """A VQA node child process serving every row of a node configuration."""

    def __init__(self, config: dict, domain: int, store: str, append_rate: float):
        me = [sys.executable, "-m", "nchunk_ros.tools.delivery_bench"]
        self.proc = subprocess.Popen(me + ["--child", "node", "--store", store, "--append-rate", str(append_rate)],
                                     cwd=str(ROOT), text=True,
                                     env=_env(config["sub_env"], domain), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        line = ""
        while not line.startswith("READY"):
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("the node did not start")
        self.profile = json.loads(line.split(" ", 1)[1])["profile"]

    def counters(self) -> dict:
        self.proc.stdin.write("c\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        try:
            self.proc.communicate("stop\n", timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_node_row(node: NodeSubscriber, config: dict, domain: int, width: int, height: int, rate: float,
                 count: int, linger: float = 1.0) -> dict:
    """One row against a running node: published, received and appended frames."""
    before = node.counters()
    me = [sys.executable, "-m", "nchunk_ros.tools.delivery_bench"]
    pub = subprocess.run(me + ["--child", "pub", "--size", f"{width}x{height}", "--rate", str(rate), "--count",
                               str(count), "--linger", str(linger), "--topic", "/bench/image", "--wait-match"],
                         cwd=str(ROOT), env=_env(config["pub_env"], domain),
                         text=True, capture_output=True, timeout=CHILD_LIMIT_S)
    time.sleep(1.0)  # a frame waiting for the rate limit is appended
    after = node.counters()
    p = _last_json(pub.stdout)
    delta = {k: after[k] - before[k] for k in ("frames_received", "frames_appended", "frames_skipped")}
    publish_s = p.get("publish_s", 0.0)
    return {"size": f"{width}x{height}", "bytes": width * height * 3, "rate_hz": rate,
            "published": p.get("published", 0), "received": delta["frames_received"],
            "appended": delta["frames_appended"], "publish_s": publish_s,
            "appended_per_s": round(delta["frames_appended"] / publish_s, 2) if publish_s else None,
            "matched_at_first_publish": p.get("matched_at_first_publish"), "first_received": None}


# -- the parent ------------------------------------------------------------------------------------
def _env(overrides: dict, domain: int) -> dict:
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain))
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _last_json(text: str) -> dict:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {}


def run_one(config: dict, width: int, height: int, rate: float, count: int, sub_depth: int = 1,
            linger: float = 1.0) -> dict:
    domain = random.randint(120, 230)
    me = [sys.executable, "-m", "nchunk_ros.tools.delivery_bench"]
    cwd = str(ROOT)
    sub = subprocess.Popen(me + ["--child", "sub", "--depth", str(sub_depth)], cwd=cwd, text=True,
                           env=_env(config["sub_env"], domain), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL)
    try:
        ready = sub.stdout.readline().strip()  # the subscription exists
        if ready != "READY":
            raise RuntimeError("subscriber did not start")
        pub = subprocess.run(me + ["--child", "pub", "--size", f"{width}x{height}", "--rate", str(rate),
                                   "--count", str(count), "--linger", str(linger)]
                             + (["--wait-match"] if config["wait_match"] else []),
                             cwd=cwd, env=_env(config["pub_env"], domain), text=True, capture_output=True,
                             timeout=CHILD_LIMIT_S)
        time.sleep(0.5)
        out, _ = sub.communicate("stop\n", timeout=15)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
    p, s = _last_json(pub.stdout), _last_json(out)
    return {"size": f"{width}x{height}", "bytes": width * height * 3, "rate_hz": rate,
            "published": p.get("published", 0), "received": s.get("received", 0),
            "matched_at_first_publish": p.get("matched_at_first_publish"), "first_received": s.get("first")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="320x240,640x480,1280x720")
    ap.add_argument("--rates", default="5,15")
    ap.add_argument("--configs", default="default,wait_match,sub_profile,both_profile")
    ap.add_argument("--seconds", type=float, default=4.0, help="publishing time per run (frames = rate × seconds)")
    ap.add_argument("--sub-depth", type=int, default=1)
    ap.add_argument("--store", default=str(ROOT / "nchunk_core" / "demo" / "data" / "shapes-vlm"),
                    help="node configurations: the store the node answers from (default: the built-in model)")
    ap.add_argument("--append-rate", type=float, default=2.0, help="node configurations: max_append_rate_hz")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", choices=["pub", "sub", "node"], help=argparse.SUPPRESS)
    ap.add_argument("--topic", default="/bench/image", help=argparse.SUPPRESS)
    ap.add_argument("--size", default="640x480", help=argparse.SUPPRESS)
    ap.add_argument("--rate", type=float, default=5.0, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=20, help=argparse.SUPPRESS)
    ap.add_argument("--linger", type=float, default=1.0, help="seconds the publisher lives after its last frame")
    ap.add_argument("--depth", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--wait-match", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        a.width, a.height = map(int, a.size.split("x"))
        return {"pub": _child_pub, "sub": _child_sub, "node": _child_node}[a.child](a)

    tmp = Path(tempfile.mkdtemp(prefix="nchunk-delivery-"))
    configs = configurations(tmp)
    rows = []
    for name in a.configs.split(","):
        if name not in configs:
            ap.error(f"unknown configuration {name!r}; known: {', '.join(configs)}")
        config, node = configs[name], None
        domain = random.randint(120, 230)
        if config.get("node"):
            node = NodeSubscriber(config, domain, a.store, a.append_rate)
        try:
            for size in a.sizes.split(","):
                w, h = map(int, size.split("x"))
                for rate in map(float, a.rates.split(",")):
                    count = max(1, round(rate * a.seconds))
                    row = {"config": name} | (run_one(config, w, h, rate, count, a.sub_depth, a.linger) if node is None
                                              else run_node_row(node, config, domain, w, h, rate, count, a.linger))
                    rows.append(row)
                    if not a.json:
                        _print_row(name, row)
        finally:
            if node is not None:
                node.close()
    if a.json:
        print(json.dumps({"sub_depth": a.sub_depth, "rmem_max": _sysctl("net.core.rmem_max"),
                          "rmem_default": _sysctl("net.core.rmem_default"), "rows": rows}, indent=1))
    return 0


def _print_row(name: str, row: dict) -> None:
    line = (f"{name:20s} {row['size']:>9s} {row['rate_hz']:5.1f} Hz  published {row['published']:4d}  "
            f"received {row['received']:4d}")
    if "appended" in row:
        line += f"  appended {row['appended']:4d} ({row['appended_per_s']} per s)"
    else:
        line += (f"  (matched at first publish: {row['matched_at_first_publish']}, first received "
                 f"#{row['first_received']})")
    print(line, flush=True)


def _sysctl(name: str) -> int | None:
    try:
        return int(Path("/proc/sys/" + name.replace(".", "/")).read_text())
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
