"""The /ask action of the VQA node over real rclpy and DDS: answers streamed token by token as
feedback, cancel, and the same queue as the /ask service (conftest.py's `rig`, ros_rig.py).

Order, not timing: an observer of the node's streamed layers holds each answer token's forward pass
until the tester has seen the feedback of the tokens before it (or until the tester has canceled),
so what arrives when is fixed.
"""
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("rclpy", reason="ROS 2 (rclpy) is not installed")

from action_msgs.msg import GoalStatus  # noqa: E402

from nchunk_core.store.naming import input_name  # noqa: E402
from ros_rig import TIMEOUT_S, feed, response, wait_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 60.0  # a client process: imports, discovery
QUESTION = "What colour is the square?"
FIRST_INPUT = input_name(0, "attn_in")  # the observer sees it once per forward pass


def one_frame_answer(rig):
    """The context is one frame; the service's answer to QUESTION about it (at least 3 tokens)."""
    feed(rig.tester, rig.node, frames=1, seed=100)
    full = rig.tester.call(QUESTION, reset_context=True)
    assert full.success and full.tokens_generated >= 3, full  # feedback 1 and 2 come before the result
    return full


def test_a_streamed_answer_sends_feedback_before_its_result(rig):
    node, tester = rig.node, rig.tester
    full = one_frame_answer(rig)
    feedback, at_result, forwards = [], [], []

    def lockstep(phase, name, x):  # the forward pass after token k waits until feedback k has arrived
        if phase == "answer" and name == FIRST_INPUT:
            forwards.append(1)
            wait_for(lambda: len(feedback) >= len(forwards), what="the feedback of the tokens so far")

    node.session.set_observer(lockstep)
    try:
        handle = tester.send_goal(QUESTION, feedback.append)
        done = handle.get_result_async()
        done.add_done_callback(lambda f: at_result.append(len(feedback)))
        result = response(done)
    finally:
        node.session.set_observer(None)
    assert result.status == GoalStatus.STATUS_SUCCEEDED
    r = result.result
    assert r.success and r.error == "" and r.answer == full.answer
    assert (r.tokens_generated, r.frames_in_context, r.context_tokens) == (
        full.tokens_generated, full.frames_in_context, full.context_tokens)
    assert r.io_bytes > 0 and r.total_s >= r.prefill_s + r.decode_s
    assert at_result[0] >= 2  # at least two feedback messages before the result
    wait_for(lambda: len(feedback) >= full.tokens_generated, what="the last feedback")
    assert [f.tokens_generated for f in feedback] == list(range(1, full.tokens_generated + 1))
    assert feedback[-1].answer == full.answer
    assert all(full.answer.startswith(f.answer) for f in feedback)


def test_cancel_stops_the_answer_before_its_next_token(rig):
    node, tester = rig.node, rig.tester
    full = one_frame_answer(rig)
    canceled_before = node.counters().asks_canceled
    feedback = []
    release = threading.Event()
    # the forward pass after the first token waits until the tester has canceled
    node.session.set_observer(lambda phase, name, x: release.wait(TIMEOUT_S) if phase == "answer" else None)
    try:
        handle = tester.send_goal(QUESTION, feedback.append)
        wait_for(lambda: feedback, what="the first token's feedback")
        cancel = response(handle.cancel_goal_async())
        assert [bytes(g.goal_id.uuid) for g in cancel.goals_canceling] == [bytes(handle.goal_id.uuid)]
        release.set()
        result = response(handle.get_result_async())
    finally:
        release.set()
        node.session.set_observer(None)
    assert result.status == GoalStatus.STATUS_CANCELED
    r = result.result
    assert (r.success, r.error, r.truncated, r.tokens_generated) == (False, "canceled", True, 1)
    assert r.tokens_generated < full.tokens_generated and full.answer.startswith(r.answer)
    assert r.answer == feedback[0].answer and feedback[0].tokens_generated == 1  # its text may be a space
    assert node.counters().asks_canceled == canceled_before + 1
    again = tester.call(QUESTION)
    assert again.success and again.answer == full.answer  # the canceled answer left the context as it was


def test_goals_share_the_service_queue_and_its_checks(rig):
    node, tester = rig.node, rig.tester
    full = one_frame_answer(rig)
    refused = response(tester.send_goal("   ", lambda f: None).get_result_async())
    assert refused.status == GoalStatus.STATUS_ABORTED and refused.result.error == "empty question"

    release = threading.Event()  # the service's question is held in its prefill; the goal waits behind it
    node.session.set_observer(lambda phase, name, x: release.wait(TIMEOUT_S) if phase == "question" else None)
    try:
        first = tester.call_async(QUESTION)
        wait_for(lambda: node.counters().asks_in_progress, what="the service's question to start")
        handle = tester.send_goal(QUESTION, lambda f: None)
        wait_for(lambda: node.counters().asks_waiting == 1, what="the goal in the queue")
        response(handle.cancel_goal_async())
        waited = response(handle.get_result_async())  # canceled while waiting: at once, nothing decoded
        assert waited.status == GoalStatus.STATUS_CANCELED and waited.result.error == "canceled"
        assert waited.result.answer == "" and node.counters().asks_waiting == 0
    finally:
        release.set()
        node.session.set_observer(None)
    assert response(first).answer == full.answer


def test_nchunk_ask_stream_prints_the_node_s_answer(rig, ros_env):
    full = one_frame_answer(rig)
    done = subprocess.run([sys.executable, "-m", "nchunk_ros.cli", "ask", "--stream", QUESTION], capture_output=True,
                          text=True, timeout=START_TIMEOUT_S, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert f"A: {full.answer}" in done.stdout and "drive: " in done.stdout
