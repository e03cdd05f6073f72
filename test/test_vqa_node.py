"""The VQA node (nchunk_ros/vqa_node.py) over real rclpy and DDS, on a real tiny store.

Everything here runs a real node in its own rclpy Context and MultiThreadedExecutor, talking over
Fast DDS on this host (a random domain id per module, discovery restricted to localhost) to a tester
node in a second Context (a second DDS participant, as another process would be): conftest.py's
`rig` and `start_rig`, ros_rig.py. The start-up and signal tests run the node as a process. The
store is a tiny random SmolVLM converted with `nchunk convert`; the drive profile is a synthetic
table placed in a private cache so that no test profiles the drive. The parameter checks and the
worker's order are tested without DDS (test_parameters.py, test_worker.py).
"""
import ast
import array
import importlib.util
import json
import os
import re
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

from diagnostic_msgs.msg import DiagnosticStatus  # noqa: E402
from rclpy.context import Context  # noqa: E402
from rclpy.parameter import Parameter, parameter_dict_from_yaml_file  # noqa: E402
from rclpy.signals import SignalHandlerOptions  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from nchunk_core.io.latency import LatencyTable  # noqa: E402
from nchunk_ros import vqa_node  # noqa: E402
from nchunk_ros.image_conversion import array_to_image  # noqa: E402
from nchunk_ros.session_tasks import printable  # noqa: E402
from nchunk_ros.vqa_node import VQANode  # noqa: E402
from nchunk_ros.worker import MAX_WAITING_ASKS  # noqa: E402
from ros_rig import COMPRESSED_TOPIC, RAW_TOPIC, SIGINT_DEFAULT, feed, publish_until, response, wait_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config" / "vqa.yaml"
LAUNCH = ROOT / "launch" / "vqa.launch.py"
TIMEOUT_S = 20.0  # only reached when something is wrong
START_TIMEOUT_S = 60.0  # a node process: imports, model build


# ---- the node over DDS ---------------------------------------------------------------------------

def test_ask_before_any_frame_is_refused(start_rig):
    rig = start_rig(name="vqa_fresh", service="/ask_fresh")
    try:
        r = rig.tester.call()
        assert not r.success and r.error.startswith("no camera frame yet")
        assert r.frames_in_context == 0 and r.newest_frame_stamp.sec == 0
    finally:
        rig.stop()


def test_frames_grow_the_context(rig):
    node, tester = rig.node, rig.tester
    start = node.session.frames_in_context
    feed(tester, node, frames=2)
    feed(tester, node, frames=1, compressed=True, seed=5)
    assert node.session.frames_in_context == start + 3
    stats = wait_for(lambda: len(tester.frame_statuses()) >= start + 3 and tester.frame_statuses(),
                     what="frame statistics")
    in_context = [int(s["frames_in_context"]) for s in stats]
    assert in_context[-3:] == [start + 1, start + 2, start + 3]
    last = stats[-1]
    assert int(last["bytes_read"]) > 0 and int(last["reads"]) > 0 and float(last["io_s"]) > 0
    assert int(last["rows_read"]) < int(last["rows_total"])  # sparsity 0.5
    assert last["topic"] == COMPRESSED_TOPIC


def test_ask_answers_with_every_field(rig):
    node, tester = rig.node, rig.tester
    stamp = tester.publish_frame(seed=11)
    wait_for(lambda: any(s["stamp"] == f"{stamp.sec:.6f}" for s in tester.frame_statuses()), what="the frame")
    r = tester.call("What shapes do you see?")
    assert r.success, r.error
    assert r.error == "" and r.answer != ""
    assert r.frames_in_context == node.session.frames_in_context >= 1
    assert (r.newest_frame_stamp.sec, r.newest_frame_stamp.nanosec) == (stamp.sec, stamp.nanosec)
    assert 0 < r.tokens_generated <= 4 and r.context_tokens > r.frames_in_context
    assert r.truncated == (r.tokens_generated == 4)
    assert r.prefill_s > 0 and r.decode_s >= 0 and r.queue_s >= 0
    assert r.total_s >= r.queue_s + r.prefill_s + r.decode_s
    assert r.io_bytes > 0 and r.io_s > 0 and r.io_reads > 0
    wait_for(lambda: r.answer in tester.answers, what="the answer on ~/answer")
    again = tester.call("What shapes do you see?")
    assert again.answer == r.answer  # the question did not change the context
    short = tester.call("What shapes do you see?", max_new_tokens=1)
    assert short.tokens_generated <= 1
    clamped = tester.call("What shapes do you see?", max_new_tokens=1000)  # the node's limit is 4
    assert clamped.success and clamped.tokens_generated <= 4


def test_reset_context_keeps_only_the_newest_frame(rig):
    node, tester = rig.node, rig.tester
    feed(tester, node, frames=2, seed=20)
    assert node.session.frames_in_context >= 2
    r = tester.call("What is there now?", reset_context=True)
    assert r.success, r.error
    assert r.frames_in_context == 1
    assert r.newest_frame_stamp.sec == tester.stamp_sec
    feed(tester, node, frames=1, seed=30)
    assert node.session.frames_in_context == 2  # later frames are appended after the newest one


def test_bad_questions_are_refused(rig):
    tester = rig.tester
    for question, error in (("", "empty question"), ("   \n", "empty question"),
                            ("why? " * 1000, "characters long")):
        r = tester.call(question)
        assert not r.success and error in r.error and r.answer == ""
    r = tester.call("many words " * 200)  # under the character limit, over the model's token limit
    assert not r.success and "tokens long" in r.error
    r = tester.call("ok?", max_new_tokens=-1)
    assert not r.success and "max_new_tokens" in r.error


def test_parameter_change_applies_to_the_next_frame(rig):
    node, tester = rig.node, rig.tester
    results = tester.set_params(sparsity=0.25, method="magnitude")
    assert all(r.successful for r in results), results
    seen = len(tester.frame_statuses())
    feed(tester, node, frames=2, seed=40)
    fresh = wait_for(lambda: tester.frame_statuses()[seen:] if len(tester.frame_statuses()) >= seen + 2 else None,
                     what="statistics of the new frames")
    for s in fresh:
        assert (s["sparsity"], s["method"]) == ("0.25", "magnitude")
        assert int(s["rows_read"]) / int(s["rows_total"]) == pytest.approx(0.75, abs=0.02)

    refused = {
        "sparsity": (1.5, "out of range"),
        "method": ("bogus", "method must be one of"),
        "chunk_max_kib": (8.0, "below the smallest window"),
        "store_path": ("/elsewhere", "store /elsewhere does not exist"),
        "image_topics": (Parameter("image_topics", Parameter.Type.STRING_ARRAY, []), "image_topics is empty"),
    }
    for name, (value, reason) in refused.items():
        (result,) = tester.set_params(**{name: value})
        assert not result.successful and reason in result.reason, (name, result.reason)
    future = tester.params.get_parameters(["sparsity", "method"])
    wait_for(future.done, what="get_parameters")
    sparsity, method = future.result().values
    assert (sparsity.double_value, method.string_value) == (0.25, "magnitude")  # the refusals changed nothing
    assert tester.set_params(sparsity=0.5, method="chunking")[0].successful


def test_topics_and_reliability_change_at_run_time(rig):
    node, tester = rig.node, rig.tester
    try:
        assert tester.set_params(image_topics=[RAW_TOPIC])[0].successful
        wait_for(lambda: tester.compressed.get_subscription_count() == 0, what="the compressed topic to be dropped")
        assert tester.raw.get_subscription_count() == 1
        assert tester.set_params(qos_reliability="reliable")[0].successful
        # a reliable subscription does not match the tester's best-effort publisher
        wait_for(lambda: tester.raw.get_subscription_count() == 0, what="the reliable re-subscription")
    finally:
        tester.set_params(image_topics=[RAW_TOPIC, COMPRESSED_TOPIC], qos_reliability="best_effort")
    wait_for(lambda: tester.raw.get_subscription_count() == 1 and tester.compressed.get_subscription_count() == 1,
             what="the original subscriptions")
    feed(tester, node, frames=1, seed=45)


def test_malformed_images_are_counted_and_the_node_keeps_answering(rig):
    node, tester = rig.node, rig.tester
    good = array_to_image(np.zeros((64, 96, 3), np.uint8), "rgb8")
    short = Image(height=64, width=96, encoding="rgb8", step=96 * 3, data=array.array("B", bytes(100)))
    bad_step = Image(height=64, width=96, encoding="rgb8", step=10, data=array.array("B", bytes(640)))
    unknown = Image(height=good.height, width=good.width, encoding="yuv422", step=good.step, data=good.data)
    huge = Image(height=100_000, width=100_000, encoding="mono8", step=100_000, data=array.array("B", bytes(64)))
    corrupt = CompressedImage(format="jpeg", data=array.array("B", b"\xff\xd8\xff\xe0" + bytes(60)))
    appended = node.counters().frames_appended
    for msg in (short, bad_step, unknown, huge, corrupt):
        before = node.counters().frames_malformed
        publisher = tester.compressed if isinstance(msg, CompressedImage) else tester.raw
        publish_until(lambda: publisher.publish(msg), lambda: node.counters().frames_malformed > before,
                      "the malformed count")
    assert node.counters().frames_appended == appended
    wait_for(lambda: tester.latest("frames_malformed") >= 5, timeout=5, what="the count on ~/statistics")
    feed(tester, node, frames=1, seed=50)
    r = tester.call()
    assert r.success, r.error


def test_concurrent_questions_are_queued_and_bounded(rig):
    node, tester = rig.node, rig.tester
    feed(tester, node, frames=1, seed=60)
    # as many as may wait: all are served in turn even if the worker is still busy with a frame
    futures = [tester.call_async(f"Question {i}?", max_new_tokens=8) for i in range(MAX_WAITING_ASKS)]
    responses = [response(f) for f in futures]
    assert all(r.success for r in responses), [r.error for r in responses]
    assert max(r.queue_s for r in responses) > 0.0  # some waited behind others

    assert tester.set_params(max_new_tokens=48)[0].successful  # requests are clamped to this
    try:
        slow = tester.call_async("A long answer?", max_new_tokens=48)
        wait_for(lambda: node.counters().asks_in_progress, what="the long answer to start")
        futures = [tester.call_async(f"Again {i}?", max_new_tokens=2) for i in range(MAX_WAITING_ASKS + 3)]
        responses = [response(f) for f in futures]
        assert response(slow).success
    finally:
        tester.set_params(max_new_tokens=4)
    busy = [r for r in responses if not r.success]
    assert all(r.error.startswith("busy") for r in busy), [r.error for r in busy]
    assert len(busy) >= 1 and len(responses) - len(busy) >= MAX_WAITING_ASKS


def test_deadline_passes_while_waiting(rig):
    tester = rig.tester
    slow = tester.call_async("A long answer?", max_new_tokens=4, timeout_s=30.0)
    started = time.monotonic()
    late = tester.call("Quick?", timeout_s=0.01)
    assert not late.success and late.error == "timed out" and late.answer == ""
    assert time.monotonic() - started < 5.0
    assert response(slow).success


def test_deadline_during_the_answer_returns_what_was_generated(rig):
    node, tester = rig.node, rig.tester
    feed(tester, node, frames=1, seed=100)
    question = "What colour is the square?"
    full = tester.call(question, reset_context=True)  # the context is now that one frame, for every call below
    assert full.success and full.tokens_generated >= 2, full

    # The answer's first token comes from the prefill; the forward pass that would give the second one
    # is held (by an observer of the streamed layers) until the request's deadline has surely passed:
    # its arrival came before that pass began. Decoding stops before the second token.
    held = []

    def hold_the_answer(phase, name, x):
        if phase == "answer" and not held:
            held.append(time.monotonic())
            time.sleep(2.0 + 0.1)  # past arrival + timeout_s

    node.session.set_observer(hold_the_answer)
    try:
        r = tester.call(question, timeout_s=2.0)
    finally:
        node.session.set_observer(None)
    assert held and not r.success and r.error == "timed out after 2 s"
    assert r.tokens_generated == 1 and r.truncated and r.frames_in_context == 1 and r.decode_s > 0.5, r
    one_token = node.session.ask(question, max_new_tokens=1)  # the node is idle: the same context, directly
    assert r.answer == printable(one_token.text)

    # The question's prefill is held until the caller has its response: the deadline passed during the
    # prefill, so the response came at once, with an empty answer, and the worker's result is dropped.
    release = threading.Event()
    node.session.set_observer(lambda phase, name, x: release.wait(TIMEOUT_S) if phase == "question" else None)
    timed_out = node.counters().asks_timed_out
    try:
        r = tester.call(question, timeout_s=1.0)
        prefill_held = not release.is_set()
    finally:
        release.set()
        node.session.set_observer(None)
    assert prefill_held  # the response came before the prefill ended
    assert not r.success and r.error == "timed out after 1 s" and r.answer == "" and r.tokens_generated == 0
    assert node.counters().asks_timed_out == timed_out + 1
    again = tester.call(question)
    assert again.success and again.answer == full.answer  # the stopped questions left the context as it was
    assert node.counters().asks_timed_out == timed_out + 1  # the dropped result was not counted again


def test_reload_parameters_reopen_the_model(rig, node_store):
    from nchunk_core.io.profile import cache_path

    node, tester = rig.node, rig.tester
    LatencyTable.synthetic().save(cache_path(node_store, 2))  # cached for reader_threads 2: the reload measures nothing
    feed(tester, node, frames=2, seed=80)
    old, reloads = node.session, node.counters().reloads
    seen = len(tester.frame_statuses())
    try:
        assert tester.set_params_atomically(reader_threads=2, dtype="bfloat16").successful  # one reload
        # the new session's first frame is the newest camera frame: the context restarted from it
        first = wait_for(lambda: [s for s in tester.frame_statuses()[seen:] if s["reader_threads"] == "2"],
                         what="a frame appended by the reloaded model")[0]
        assert (first["dtype"], first["frames_in_context"], int(first["reloads"])) == ("bfloat16", "1", reloads + 1)
        assert node.session is not old and (node.session.config.reader_threads, node.session.config.dtype) == (2, "bfloat16")
        with pytest.raises(RuntimeError, match="closed"):
            old.ask("Still there?")
        level, message = wait_for(lambda: tester.reloads, what="the reload status")[-1]
        assert level == DiagnosticStatus.OK and "reader_threads 6 -> 2" in message and "starts again" in message
        feed(tester, node, frames=1, seed=82)
        r = tester.call()
        assert r.success and r.frames_in_context == 2, r.error
    finally:
        tester.set_params_atomically(reader_threads=6, dtype="float32")
    wait_for(lambda: (node.session.config.reader_threads, node.session.config.dtype) == (6, "float32"),
             what="the model reloaded with the original values")


def test_bad_store_path_or_device_at_run_time_keeps_the_running_model(rig, node_store, tmp_path):
    import torch

    node, tester = rig.node, rig.tester
    old, failures = node.session, node.counters().reload_failures
    for path, reason in ((tmp_path / "missing", "does not exist"), (tmp_path, "not an nchunk store")):
        (result,) = tester.set_params(store_path=str(path))
        assert not result.successful and reason in result.reason, result.reason
    broken = shutil.copytree(node_store, tmp_path / "broken")
    (broken / "manifest.json").write_text("{")
    (result,) = tester.set_params(store_path=str(broken))
    assert result.successful  # it looks like a store: opening it on the worker finds out, and sets it back
    wait_for(lambda: tester.get_param("store_path") == str(node_store), what="store_path set back")
    assert node.session is old and node.counters().reload_failures == failures + 1
    level, message = wait_for(lambda: tester.reloads and tester.reloads[-1][0] == DiagnosticStatus.ERROR
                              and tester.reloads, what="the reload failure on ~/statistics")[-1]
    assert f"cannot open store {broken}" in message and "manifest.json" in message and "\n" not in message
    if not torch.cuda.is_available():  # a device this machine does not have: refused by the reload, set back
        assert tester.set_params(device="cuda")[0].successful
        wait_for(lambda: tester.get_param("device") == "cpu", what="device set back")
        wait_for(lambda: "sees no CUDA device" in tester.reloads[-1][1], what="the reload failure")
        assert node.session is old
    feed(tester, node, frames=1, seed=85)
    r = tester.call()
    assert r.success, r.error


def test_max_frames_changes_at_run_time(rig):
    node, tester = rig.node, rig.tester
    feed(tester, node, frames=3, seed=90)
    assert node.session.frames_in_context >= 3
    try:
        assert tester.set_params(max_frames=2)[0].successful
        seen = len(tester.frame_statuses())
        feed(tester, node, frames=3, seed=93)
        stats = wait_for(lambda: tester.frame_statuses()[seen:] if len(tester.frame_statuses()) >= seen + 3 else None,
                         what="statistics of the new frames")
        assert all((s["frames_in_context"], s["rebuilt"], s["max_frames"]) == ("2", "True", "2") for s in stats), stats
        assert node.session.frames_in_context == 2
        assert tester.call().frames_in_context == 2
    finally:
        tester.set_params(max_frames=8)


def test_frame_tokens_and_decoding_change_at_run_time(rig):
    """frame_tokens costs the next frame (the frames in context keep theirs), decoding the next
    question; values the running model cannot take are refused with the reason, and change nothing."""
    node, tester = rig.node, rig.tester
    seen = len(tester.frame_statuses())
    feed(tester, node, frames=1, seed=110)
    tiles = wait_for(lambda: tester.frame_statuses()[seen:], what="the frame's statistics")[-1]
    assert tiles["frame_mode"] == "tiles"  # auto on a store without a chat template: the processor's layout
    refused = {"video": "not a frame mode of smolvlm", "bogus": "frame_tokens must be auto", 64: "no pixel budget"}
    for value, reason in refused.items():
        (result,) = tester.set_params(frame_tokens=value)
        assert not result.successful and reason in result.reason, (value, result.reason)
    (result,) = tester.set_params(decoding="sample")
    assert not result.successful and "decoding must be one of checkpoint, greedy" in result.reason
    assert (tester.get_param("frame_tokens"), tester.get_param("decoding")) == ("auto", "checkpoint")
    try:
        assert all(r.successful for r in tester.set_params(frame_tokens="image", decoding="greedy"))
        in_context = node.session.frames_in_context
        seen = len(tester.frame_statuses())
        feed(tester, node, frames=1, seed=111)
        image = wait_for(lambda: tester.frame_statuses()[seen:], what="the next frame's statistics")[-1]
        assert image["frame_mode"] == "image" and int(image["visual_tokens"]) < int(tiles["visual_tokens"])
        if in_context < int(image["max_frames"]):  # no rebuild: the earlier frames stayed as they were
            assert image["rebuilt"] == "False" and int(image["frames_in_context"]) == in_context + 1
        r = tester.call()
        assert r.success, r.error
        assert node.session.decoding.mode == "greedy" and node.session.config.frame_tokens == "image"
    finally:
        assert all(r.successful for r in tester.set_params(frame_tokens="auto", decoding="checkpoint"))
    feed(tester, node, frames=1, seed=112)
    wait_for(lambda: tester.frame_statuses()[-1]["frame_mode"] == "tiles", what="tiles again")


def test_a_frame_mode_the_new_model_lacks_fails_its_reload(rig, node_store, tiny_stores, tmp_path):
    """frame_tokens video is LLaVA-OneVision's: a reload from it to the SmolVLM store fails with the
    reason, store_path is set back and the running model keeps answering."""
    from nchunk_core.io.profile import cache_path

    node, tester = rig.node, rig.tester
    llava = tiny_stores["llava_onevision"]
    LatencyTable.synthetic().save(cache_path(llava, 6))
    try:
        assert tester.set_params_atomically(store_path=str(llava), frame_tokens="video").successful
        wait_for(lambda: node.session.store.path == llava, what="the LLaVA-OneVision store")
        feed(tester, node, frames=1, seed=115)
        wait_for(lambda: tester.frame_statuses()[-1]["frame_mode"] == "video", what="a video frame's statistics")
        failures = node.counters().reload_failures
        (result,) = tester.set_params(store_path=str(node_store))  # the new model is asked at the reload
        assert result.successful
        wait_for(lambda: node.counters().reload_failures == failures + 1, what="the failed reload")
        wait_for(lambda: tester.get_param("store_path") == str(llava), what="store_path set back")
        level, message = wait_for(lambda: tester.reloads and tester.reloads[-1][0] == DiagnosticStatus.ERROR
                                  and tester.reloads, what="the reload failure on ~/statistics")[-1]
        assert "not a frame mode of smolvlm" in message and "choose auto, image, tiles" in message, message
        assert node.session.store.path == llava and tester.call().success
    finally:
        assert tester.set_params_atomically(store_path=str(node_store), frame_tokens="auto").successful
    wait_for(lambda: node.session.store.path == node_store, what="the SmolVLM store again")
    # a reload that fails sets back the frame mode that came with it, since the running model lacks it
    broken = shutil.copytree(llava, tmp_path / "broken")
    (broken / "manifest.json").write_text("{")
    assert tester.set_params_atomically(store_path=str(broken), frame_tokens="video").successful
    wait_for(lambda: (tester.get_param("store_path"), tester.get_param("frame_tokens")) == (str(node_store), "auto"),
             what="store_path and frame_tokens set back")
    assert node.session.store.path == node_store
    feed(tester, node, frames=1, seed=116)
    assert tester.call().success
    wait_for(lambda: tester.frame_statuses()[-1]["frame_mode"] == "tiles", what="a tiled frame's statistics")


def test_nchunk_ask_command(rig, ros_env):
    feed(rig.tester, rig.node, frames=1, seed=70)
    cli = [sys.executable, "-m", "nchunk_ros.cli", "ask"]
    done = subprocess.run([*cli, "What is there?", "--max-new-tokens", "2"], capture_output=True, text=True,
                          timeout=START_TIMEOUT_S, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "A: " in done.stdout and "drive: " in done.stdout and "reads" in done.stdout
    done = subprocess.run([*cli, "  ", "--json"], capture_output=True, text=True, timeout=START_TIMEOUT_S, cwd=ROOT)
    assert done.returncode == 1 and json.loads(done.stdout)["error"] == "empty question"
    done = subprocess.run([*cli, "Anyone?", "--service", "/nobody", "--wait", "0.5"], capture_output=True,
                          text=True, timeout=START_TIMEOUT_S, cwd=ROOT)
    assert done.returncode == 1 and "no /nobody service within 0.5 s" in done.stderr


def test_invalid_configuration_is_a_startup_error(node_store, ros_env):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: device cuda is valid here")
    ctx = Context()
    rclpy.init(args=[], context=ctx, domain_id=int(ros_env["ROS_DOMAIN_ID"]),
               signal_handler_options=SignalHandlerOptions.NO)
    try:
        with pytest.raises(vqa_node.StartupError, match="invalid configuration: device 'cuda'"):
            VQANode(context=ctx, parameter_overrides=[Parameter("store_path", value=str(node_store)),
                                                      Parameter("device", value="cuda")])
    finally:
        rclpy.try_shutdown(context=ctx)


# ---- the node as a process -------------------------------------------------------------------------

def node_process(*ros_args, domain_offset=1):
    env = dict(os.environ, ROS_DOMAIN_ID=str((int(os.environ["ROS_DOMAIN_ID"]) + domain_offset) % 200 + 20),
               PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "nchunk_ros.vqa_node", "--ros-args", *ros_args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def test_bad_store_path_exits_1_with_its_reason(ros_env, tmp_path):
    proc = node_process("-p", f"store_path:={tmp_path / 'missing'}")
    out, _ = proc.communicate(timeout=START_TIMEOUT_S)
    assert proc.returncode == 1
    assert f"vqa_node: store {tmp_path / 'missing'} does not exist" in out.splitlines()[-1]
    proc = node_process("-p", f"store_path:={tmp_path}", "-p", "sparsity:=2.0")
    out, _ = proc.communicate(timeout=START_TIMEOUT_S)
    assert proc.returncode == 1 and "sparsity out of range" in out.splitlines()[-1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_params_file_start_and_clean_exit_on_signal(node_store, ros_env, sig):
    proc = node_process("--params-file", str(CONFIG), "-p", f"store_path:={node_store}")
    lines = []
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not any("ready: /ask served" in line for line in lines):
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, "node did not come up:\n" + "".join(lines)
            lines.append(line)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines) + out
    assert proc.returncode == 0, log
    assert "terminate called" not in log and "Traceback" not in log
    yaml_values = parameter_dict_from_yaml_file(str(CONFIG), target_nodes=["vqa_node"])
    topic = Parameter.from_parameter_msg(yaml_values["image_topics"]).value[0]
    reliability = Parameter.from_parameter_msg(yaml_values["qos_reliability"]).value
    assert f"camera: {topic} (Image, {reliability})" in log  # the file's values were used
    assert "sparsity" not in yaml_values and "chunking at sparsity 0," in log  # unset: the store's value


# Child programs that send the process a real SIGINT at one moment of vqa_node's start-up, then run it.
INTERRUPT_AT = {
    "imports": """
import importlib.abc, os, signal, sys
class InterruptOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "rclpy":  # the first third-party import of nchunk_ros.vqa_node
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
sys.meta_path.insert(0, InterruptOnImport())
""",
    "rclpy.init": """
import os, signal, rclpy
init = rclpy.init
def interrupted_init(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    return init(*args, **kwargs)
rclpy.init = interrupted_init
""",
    "model build": """
import importlib.abc, os, signal, sys
class InterruptOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "nchunk_core.runtime.session":  # imported while the node opens the store, after rclpy.init
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
sys.meta_path.insert(0, InterruptOnImport())
""",
}


@pytest.mark.parametrize("moment", list(INTERRUPT_AT))
def test_sigint_during_start_up_exits_0_quietly(node_store, ros_env, moment):
    child = SIGINT_DEFAULT + INTERRUPT_AT[moment] + f"""
import runpy, sys
sys.argv = ["vqa_node", "--ros-args", "-p", "store_path:={node_store}"]
runpy.run_module("nchunk_ros.vqa_node", run_name="__main__")
"""
    run_env = dict(os.environ, ROS_DOMAIN_ID=str((int(os.environ["ROS_DOMAIN_ID"]) + 3) % 200 + 20))
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=START_TIMEOUT_S,
                          cwd=ROOT, env=run_env)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert "Traceback" not in log and "terminate called" not in log and "ready: /ask served" not in log, log


# ---- the launch file -----------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("launch_ros") is None, reason="launch_ros is not installed")
def test_launch_description_with_launch_ros():
    spec = importlib.util.spec_from_file_location("vqa_launch", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    names = [getattr(e, "name", None) for e in description.entities]
    assert "params_file" in names


def test_launch_file_names_the_node_and_the_params_file():
    tree = ast.parse(LAUNCH.read_text())
    assert ast.get_docstring(tree)
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "generate_launch_description" in functions
    calls = {n.func.id if isinstance(n.func, ast.Name) else n.func.attr: n for n in ast.walk(tree)
             if isinstance(n, ast.Call)}
    node = {k.arg: k.value for k in calls["Node"].keywords}
    assert ast.literal_eval(node["executable"]) == "vqa_node" and ast.literal_eval(node["name"]) == "vqa_node"
    assert isinstance(node["parameters"], ast.List)
    argument = calls["DeclareLaunchArgument"]
    assert ast.literal_eval(argument.args[0]) == "params_file"
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert {"config", "vqa.yaml", "nchunk_ros", "params_file"} <= strings
    assert "get_package_share_directory" in calls
    setup = (ROOT / "setup.py").read_text()
    assert re.search(r'"vqa_node = nchunk_ros\.vqa_node:main"', setup)
    assert 'share_files("launch")' in setup and 'share_files("config")' in setup
