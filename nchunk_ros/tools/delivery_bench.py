"""Delivery bench: how many best-effort sensor_msgs/Image frames reach a subscriber in another process.

    python -m nchunk_ros.tools.delivery_bench                      # default matrix
    python -m nchunk_ros.tools.delivery_bench --sizes 640x480 --rates 5 --configs default,sub_profile
    python -m nchunk_ros.tools.delivery_bench --json

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

PROFILE = Path(__file__).resolve().parent.parent / "config" / "fastdds_camera.xml"
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
    return configs


# -- child processes -------------------------------------------------------------------------------
def _child_pub(a) -> int:
    import array

    import rclpy
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    rclpy.init(args=[])
    node = rclpy.create_node("bench_camera")
    pub = node.create_publisher(Image, "/bench/image", qos_profile_sensor_data)
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
    cwd = str(Path(__file__).resolve().parent.parent)
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
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", choices=["pub", "sub"], help=argparse.SUPPRESS)
    ap.add_argument("--size", default="640x480", help=argparse.SUPPRESS)
    ap.add_argument("--rate", type=float, default=5.0, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=20, help=argparse.SUPPRESS)
    ap.add_argument("--linger", type=float, default=1.0, help="seconds the publisher lives after its last frame")
    ap.add_argument("--depth", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--wait-match", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        a.width, a.height = map(int, a.size.split("x"))
        return _child_pub(a) if a.child == "pub" else _child_sub(a)

    tmp = Path(tempfile.mkdtemp(prefix="nchunk-delivery-"))
    configs = configurations(tmp)
    rows = []
    for name in a.configs.split(","):
        if name not in configs:
            ap.error(f"unknown configuration {name!r}; known: {', '.join(configs)}")
        for size in a.sizes.split(","):
            w, h = map(int, size.split("x"))
            for rate in map(float, a.rates.split(",")):
                row = {"config": name} | run_one(configs[name], w, h, rate, max(1, round(rate * a.seconds)),
                                                 a.sub_depth, a.linger)
                rows.append(row)
                if not a.json:
                    print(f"{name:20s} {row['size']:>9s} {rate:5.1f} Hz  published {row['published']:4d}  "
                          f"received {row['received']:4d}  (matched at first publish: "
                          f"{row['matched_at_first_publish']}, first received #{row['first_received']})",
                          flush=True)
    if a.json:
        print(json.dumps({"sub_depth": a.sub_depth, "rmem_max": _sysctl("net.core.rmem_max"),
                          "rmem_default": _sysctl("net.core.rmem_default"), "rows": rows}, indent=1))
    return 0


def _sysctl(name: str) -> int | None:
    try:
        return int(Path("/proc/sys/" + name.replace(".", "/")).read_text())
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
