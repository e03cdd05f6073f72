"""The VQA node under load and damage, over real rclpy and DDS on real files (conftest.py's rigs).

Every /ask call of a burst gets a response; back-to-back questions do not starve the camera; a
damaged or unreadable store fails the frame or question that reads it, with the file, group, row
and offset, and the node keeps serving; a store replaced on disk is opened again by setting
store_path to its value; max_new_tokens is held to what the model can hold; a camera topic with
publishers but no frames, or with two publishers, is reported. No assertion here bounds a wall-clock time: each asserts an
outcome, or an age against the configured append interval with a margin.
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="ROS 2 (rclpy) is not installed")

import rclpy.executors  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from rcl_interfaces.msg import Log  # noqa: E402
from rclpy.qos import QoSProfile, qos_profile_rosout_default, qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from nchunk_core.store import Store  # noqa: E402
from nchunk_interfaces.srv import Ask  # noqa: E402
from nchunk_ros import diagnostics  # noqa: E402
from nchunk_ros.camera_transport import SILENCE_S  # noqa: E402
from nchunk_ros.image_conversion import array_to_image  # noqa: E402
from nchunk_ros.worker import MAX_WAITING_ASKS  # noqa: E402
from ros_rig import RAW_TOPIC, COMPRESSED_TOPIC, feed, publish_until, wait_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 20.0  # only reached when something is wrong


def node_log(rig, level=Log.ERROR):
    """A list that fills with the node's /rosout messages at `level` or above."""
    lines = []
    name = rig.node.get_name()
    rig.tester.create_subscription(Log, "/rosout", lambda m: lines.append(m.msg) if m.name.endswith(name)
                                   and m.level >= level else None, qos_profile_rosout_default)
    return lines


# ---- every call gets a response ------------------------------------------------------------------

def test_a_burst_of_100_calls_gets_100_responses(rig):
    node, tester = rig.node, rig.tester
    feed(tester, node, frames=1, seed=200)
    client = tester.create_client(Ask, "/ask", qos_profile=QoSProfile(depth=1000))  # deep enough for 100 replies
    assert client.wait_for_service(timeout_sec=TIMEOUT_S)
    futures = [client.call_async(Ask.Request(question=f"Question {i}?", max_new_tokens=2)) for i in range(100)]
    wait_for(lambda: all(f.done() for f in futures), timeout=120.0, what="100 responses")
    responses = [f.result() for f in futures]
    answered = [r for r in responses if r.success]
    busy = [r for r in responses if r.error.startswith("busy: ")]
    timed_out = [r for r in responses if r.error.startswith("timed out")]
    assert len(answered) + len(busy) + len(timed_out) == 100, {r.error for r in responses}
    assert len(answered) >= MAX_WAITING_ASKS and busy
    assert all(f"busy: {MAX_WAITING_ASKS} questions are already waiting" in r.error for r in busy)
    tester.destroy_client(client)


# ---- fresh frames under back-to-back questions ---------------------------------------------------

def test_back_to_back_questions_from_two_clients_keep_the_frames_fresh(rig):
    """A 10 Hz camera that changes scene and two clients asking back to back: every answer's newest
    frame is at most max(append interval, one append) plus a camera period old, with a margin."""
    node, tester = rig.node, rig.tester
    rate_hz, camera_period, margin = 2.0, 0.1, 1.0
    feed(tester, node, frames=1, seed=300)
    assert tester.set_params(max_append_rate_hz=rate_hz, max_new_tokens=16)[0].successful  # answers take a while
    seen = len(tester.frame_statuses())
    appended = node.counters().frames_appended
    stop = threading.Event()

    def camera():
        i = 0
        while not stop.is_set():
            published.append(tester.publish_frame(seed=400 + i % 7))  # a new scene, a new stamp every frame
            i += 1
            stop.wait(camera_period)

    answers, published = [], []

    def client(question):  # for about 6 s of camera time
        while (len(published) < 60 or len(answers) < 10) and not stop.is_set():
            r = tester.call(question)
            assert r.success, r.error
            answers.append(r)

    threads = [threading.Thread(target=camera)] + [threading.Thread(target=client, args=(q,))
                                                   for q in ("What is there?", "Where is it?")]
    try:
        for t in threads:
            t.start()
        for t in threads[1:]:
            t.join(120.0)
    finally:
        stop.set()
        for t in threads:
            t.join(TIMEOUT_S)
        tester.set_params(max_append_rate_hz=50.0, max_new_tokens=4)
    assert len(answers) >= 10, len(answers)
    append_s = max(float(s["total_s"]) for s in tester.frame_statuses()[seen:])
    bound = max(1.0 / rate_hz, append_s) + camera_period + margin
    ages = [r.newest_frame_age_s for r in answers]
    assert max(ages) <= bound, (bound, ages)
    assert all(r.frames_in_context >= 1 and r.newest_frame_age_s > 0 for r in answers)
    stamps = [r.newest_frame_stamp.sec for r in answers]
    assert len(set(stamps)) > 3  # the answers followed the camera
    assert node.counters().frames_appended - appended >= 3


# ---- damaged and unreadable weights --------------------------------------------------------------

def first_row(store_path):
    """(group, weight file) of the first streamed group of a store."""
    group = min(Store.open(store_path).groups.values(), key=lambda g: (g.file, g.offset))
    return group, group.file


def test_damaged_then_unreadable_weights_fail_with_file_group_row_offset(start_rig, node_store, tmp_path):
    store = shutil.copytree(node_store, tmp_path / "store")
    rig = start_rig(name="vqa_damage", service="/ask_damage", store_path=str(store), sparsity=0.0)  # reads every row
    try:
        node, tester = rig.node, rig.tester
        errors = node_log(rig)
        feed(tester, node, frames=1, seed=500)
        assert tester.call().success
        group, path = first_row(store)
        row = 3
        offset = group.offset + row * group.row_bytes
        with open(path, "r+b") as f:  # flip the bytes of one row
            f.seek(offset)
            data = f.read(8)
            f.seek(offset)
            f.write(bytes(b ^ 0xFF for b in data))
        r = tester.call("What is there now?")
        assert not r.success and r.error.startswith("damaged weights: "), r.error
        assert str(path) in r.error and repr(group.name) in r.error and f"row {row} " in r.error
        assert f"offset {offset}" in r.error
        assert (node.counters().read_errors, node.counters().checksum_errors) == (1, 1)

        os.truncate(path, group.offset + group.row_bytes)  # the file ends inside the first group
        r = tester.call("And now?")
        assert not r.success and r.error.startswith("cannot read weights") and str(path) in r.error, r.error
        assert f"(group {group.name!r}, row 0)" in r.error
        assert node.counters().read_errors == 2 and node.counters().checksum_errors == 1
        wait_for(lambda: len(errors) >= 2, what="the read errors in the log")
        assert all("\n" not in line and "Traceback" not in line for line in errors), errors
        assert "(read error 1 since start)" in errors[0] and "(read error 2 since start)" in errors[1]
        wait_for(lambda: tester.latest("read_errors") == 2, what="the count on ~/statistics")
        assert node.session is not None and tester.call("Still there?").error.startswith("cannot read weights")
        failures, read_errors = node.counters().append_failures, node.counters().read_errors
        publish_until(lambda: tester.publish_frame(seed=501), lambda: node.counters().append_failures > failures,
                      "a frame that cannot be appended")
        assert node.counters().read_errors == read_errors + 1
        assert all("\n" not in line and "Traceback" not in line for line in errors), errors
    finally:
        rig.stop()


def test_a_failed_read_names_file_length_offset_group_row_and_errno(node_store):
    from nchunk_core.io.errors import from_native
    from nchunk_ros.session_tasks import read_failure_reason

    store = Store.open(node_store)
    group, path = first_row(node_store)
    error = from_native("io", errno.EIO, "read failed", "pread", str(path), group.offset + 2 * group.row_bytes, 4096)
    assert read_failure_reason(error, store) == (f"cannot read weights: {path}, 4096 bytes at offset "
                                                 f"{error.offset} (group {group.name!r}, row 2): Input/output error")


# ---- reloads: a store replaced on disk, and max_new_tokens -----------------------------------------

def smaller_model_copy(node_store, path, positions):
    """A copy of the store whose model holds `positions` positions (config.json only)."""
    copy = shutil.copytree(node_store, path)
    config = json.loads((copy / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = positions
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_oversized_max_new_tokens_is_refused_with_the_limit(rig):
    node, tester = rig.node, rig.tester
    limit = node.session.max_answer_tokens
    assert limit < node.session.max_positions
    (result,) = tester.set_params(max_new_tokens=4096)
    assert not result.successful and f"at most {limit} answer tokens" in result.reason, result.reason
    (result,) = tester.set_params(max_new_tokens=limit + 1)
    assert not result.successful
    assert tester.get_param("max_new_tokens") == 4
    try:
        assert tester.set_params(max_new_tokens=limit)[0].successful
        feed(tester, node, frames=1, seed=600)
        r = tester.call()  # no limit of its own: the node's
        assert r.success, r.error
    finally:
        tester.set_params(max_new_tokens=4)


def test_store_replaced_by_rename_is_opened_again_and_a_smaller_model_lowers_max_new_tokens(rig, node_store,
                                                                                           tmp_path):
    node, tester = rig.node, rig.tester
    store = shutil.copytree(node_store, tmp_path / "store")
    try:
        assert tester.set_params(store_path=str(store))[0].successful
        wait_for(lambda: node.session.store.path == store.resolve(), what="the copy to be loaded")
        assert tester.set_params(max_new_tokens=600)[0].successful
        before, reloads = node.session, node.counters().reloads

        smaller_model_copy(node_store, tmp_path / "replacement", 512)
        (tmp_path / "store").rename(tmp_path / "store.old")  # replaced the usual way: rename, rename
        (tmp_path / "replacement").rename(store)
        (result,) = tester.set_params(store_path=str(store))  # the same value: opened again
        assert result.successful
        wait_for(lambda: node.counters().reloads == reloads + 1, what="the store to be opened again")
        assert node.session is not before and node.session.max_positions == 512
        message = wait_for(lambda: [m for level, m in tester.reloads if level == DiagnosticStatus.WARN],
                           what="the warning on ~/statistics")[-1]
        assert "max_new_tokens lowered from 600 to " in message and "512 positions" in message
        wait_for(lambda: any("opened again" in m for _, m in tester.reloads), what="the reload status")
        feed(tester, node, frames=1, seed=610)  # the limit counts the frame: known once one is in context
        limit = node.session.max_answer_tokens
        assert limit < 600
        wait_for(lambda: tester.get_param("max_new_tokens") == limit, what="max_new_tokens lowered")
        r = tester.call()
        assert r.success, r.error
    finally:
        tester.set_params_atomically(store_path=str(node_store), max_new_tokens=4)
    wait_for(lambda: node.session.store.path == node_store.resolve(), what="the original store back")


# ---- camera topics with publishers but no frames -------------------------------------------------

def test_a_silent_camera_topic_is_reported_once(rig):
    tester = rig.tester
    topic = "/silent_cam/image_raw"
    warnings = node_log(rig, Log.WARN)
    publisher = tester.create_publisher(Image, topic, qos_profile_sensor_data)  # it never publishes
    try:
        assert tester.set_params(image_topics=[RAW_TOPIC, COMPRESSED_TOPIC, topic])[0].successful
        status = wait_for(lambda: [(level, v) for name, level, v in list(tester.statuses)
                                   if name == diagnostics.INTAKE and topic in v.get("silent_topics", "")],
                          timeout=SILENCE_S + TIMEOUT_S, what="the silent topic on ~/statistics")[-1]
        assert status[0] == DiagnosticStatus.WARN
        said = wait_for(lambda: [w for w in warnings if topic in w], what="the warning in the log")
        assert "best_effort" in said[0] and "likely cause" in said[0]
        time.sleep(2 * 1.0)  # two more intake periods: still silent, not said again
        assert len([w for w in warnings if topic in w]) == 1
        frame = array_to_image(np.zeros((64, 96, 3), np.uint8), "rgb8")
        seen = len(tester.statuses)
        publish_until(lambda: publisher.publish(frame),
                      lambda: any(name == diagnostics.INTAKE and topic not in v.get("silent_topics", topic)
                                  for name, _, v in list(tester.statuses)[seen:]), "the topic to be heard")
    finally:
        tester.set_params(image_topics=[RAW_TOPIC, COMPRESSED_TOPIC])
        tester.destroy_publisher(publisher)


def test_a_camera_topic_with_two_publishers_is_reported(rig):
    tester = rig.tester
    warnings = node_log(rig, Log.WARN)
    second = tester.create_publisher(Image, RAW_TOPIC, qos_profile_sensor_data)  # beside rig.tester's own
    try:
        status = wait_for(lambda: [(level, v) for name, level, v in list(tester.statuses)
                                   if name == diagnostics.INTAKE and RAW_TOPIC in v.get("shared_topics", "")],
                          timeout=TIMEOUT_S, what="the shared topic on ~/statistics")[-1]
        assert status[0] == DiagnosticStatus.WARN
        said = wait_for(lambda: [w for w in warnings if "publishers" in w and RAW_TOPIC in w],
                        what="the warning in the log")
        assert f"/{tester.get_name()}" in said[0] and "image_topics" in said[0]
    finally:
        tester.destroy_publisher(second)
    wait_for(lambda: [v for name, _, v in list(tester.statuses)[-3:]
                      if name == diagnostics.INTAKE and v.get("shared_topics") == ""], what="the topic no longer shared")


# ---- VGA frames from a camera in another process -----------------------------------------------

def test_vga_camera_in_another_process_is_appended_at_the_configured_rate(node_store, ros_env):
    """The node as its own process (its main applies the camera transport profile) and a plain
    best-effort publisher here: 640×480 rgb8 frames (900 KiB, above Fast DDS's 512 KiB shared-memory
    segment) at 15 Hz arrive, and the node appends them at max_append_rate_hz."""
    from rclpy.context import Context
    from rclpy.signals import SignalHandlerOptions

    from nchunk_ros.tools.synthetic_camera import random_scene, render_scene

    rate_hz, camera_hz, count, topic = 2.0, 15.0, 90, "/vga_cam/image_raw"
    domain = (int(ros_env["ROS_DOMAIN_ID"]) + 7) % 200 + 20
    proc = subprocess.Popen([sys.executable, "-m", "nchunk_ros.vqa_node", "--ros-args", "-p",
                             f"store_path:={node_store}", "-p", f"image_topics:=[{topic}]", "-p",
                             f"max_append_rate_hz:={rate_hz}"], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=dict(os.environ, ROS_DOMAIN_ID=str(domain),
                                                               PYTHONUNBUFFERED="1"))
    lines = []
    ctx = Context()
    rclpy.init(args=[], context=ctx, domain_id=domain, signal_handler_options=SignalHandlerOptions.NO)
    camera = rclpy.create_node("vga_camera", context=ctx)
    executor = rclpy.executors.SingleThreadedExecutor(context=ctx)
    executor.add_node(camera)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    try:
        while not any("ready: /ask served" in line for line in lines):
            line = proc.stdout.readline()
            assert line, "the node did not come up:\n" + "".join(lines)
            lines.append(line)
        threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
        assert any("camera transport: Fast DDS profile" in line for line in lines), "".join(lines)
        counters = []
        camera.create_subscription(
            DiagnosticArray, "/vqa_node/statistics",
            lambda m: counters.extend(diagnostics.counters_from(s) for s in m.status), 100)
        publisher = camera.create_publisher(Image, topic, qos_profile_sensor_data)
        spinner.start()
        wait_for(lambda: publisher.get_subscription_count() > 0, what="the node's subscription")
        wait_for(lambda: counters, what="the node's statistics")
        frame = array_to_image(render_scene(random_scene(np.random.default_rng(0), 640, 480)), "rgb8")
        start = time.monotonic()
        for i in range(count):
            time.sleep(max(0.0, start + i / camera_hz - time.monotonic()))
            frame.header.stamp = camera.get_clock().now().to_msg()
            publisher.publish(frame)
        elapsed = time.monotonic() - start
        time.sleep(2 * 1.0)  # the last frames land and two more statistics come
        received = counters[-1]
        assert received.frames_received >= 0.8 * count, (received, "".join(lines[-20:]))
        assert received.frames_malformed == 0
        appended = received.frames_appended
        assert 0.5 * rate_hz * elapsed <= appended <= rate_hz * (elapsed + 3.0) + 1, (appended, elapsed)
    finally:
        executor.shutdown()
        camera.destroy_node()
        rclpy.try_shutdown(context=ctx)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, "".join(lines)
