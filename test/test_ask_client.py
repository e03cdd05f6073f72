"""`nchunk ask --stream`: a separate process asks an /ask action server and prints the answer as the
feedback arrives; Ctrl-C (SIGINT) cancels the goal and the process ends with status 130.

The server runs here, in its own rclpy context on a random domain id: a server that sends one word
per feedback and waits, before the next word, until this test has read the word on the client's
standard output, so the test sees that the words were printed while the answer was still being
generated, without relying on timing.
"""
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

rclpy = pytest.importorskip("rclpy", reason="ROS 2 (rclpy) is not installed")

from rclpy.action import ActionServer, CancelResponse  # noqa: E402
from rclpy.callback_groups import ReentrantCallbackGroup  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.signals import SignalHandlerOptions  # noqa: E402

from nchunk_ros.ask_client import TokenPrinter  # noqa: E402
from ros_rig import SIGINT_DEFAULT  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 60.0  # only reached when something is wrong
REPUBLISH_S = 0.2  # the server sends the current feedback again at this interval until it is read


class StreamingServer:
    """Answers with the question's words; word i+1 only after `proceed` is set for word i."""

    def __init__(self, node, name):
        try:
            from nchunk_interfaces.action import Ask
        except ImportError as exc:
            raise ImportError("nchunk_interfaces has no action Ask: rebuild it with `bash scripts/build_interfaces.sh "
                              ".venv` (PyPI wheels) or colcon (see nchunk_interfaces/README.md)") from exc

        self.Ask = Ask
        self.proceed = threading.Event()
        self.stopping = threading.Event()  # set at teardown: a goal still running ends (a failed test must not hang)
        self.cancel_requests = 0
        self.finished = []

        def cancel(goal_handle):
            self.cancel_requests += 1
            return CancelResponse.ACCEPT

        self.server = ActionServer(node, Ask, name, self.execute, cancel_callback=cancel,
                                   callback_group=ReentrantCallbackGroup())

    def execute(self, goal_handle):
        words = goal_handle.request.question.split()
        for i in range(len(words)):
            self.proceed.clear()
            feedback = self.Ask.Feedback(answer=" ".join(words[:i + 1]), tokens_generated=i + 1)
            goal_handle.publish_feedback(feedback)
            while not self.proceed.wait(REPUBLISH_S):
                if self.stopping.is_set():
                    goal_handle.abort()
                    self.finished.append("aborted")
                    return self.Ask.Result(success=False, error="test server stopping")
                if goal_handle.is_cancel_requested:
                    goal_handle.canceled()
                    self.finished.append("canceled")
                    return self.Ask.Result(success=False, error="canceled", answer=feedback.answer, truncated=True,
                                           tokens_generated=i + 1)
                goal_handle.publish_feedback(feedback)
        goal_handle.succeed()
        self.finished.append("succeeded")
        return self.Ask.Result(success=True, answer=" ".join(words), tokens_generated=len(words), frames_in_context=1,
                               decode_s=0.5, io_bytes=3 << 20, io_reads=12, io_s=0.01)


@pytest.fixture
def server(monkeypatch):
    domain_id = random.randint(1, 101)
    name = f"/test_ask_client/ask_{uuid.uuid4().hex[:12]}"
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain_id, signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node("ask_stream_test_server", context=context)
    server = StreamingServer(node, name)
    executor = MultiThreadedExecutor(num_threads=3, context=context)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain_id), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1")
    env.pop("ROS_STATIC_PEERS", None)
    try:
        yield server, name, env
    finally:
        server.stopping.set()
        server.server.destroy()
        executor.shutdown()
        spinner.join(timeout=5.0)
        node.destroy_node()
        rclpy.try_shutdown(context=context)


def start_client(name, env, question):
    program = SIGINT_DEFAULT + "import runpy; runpy.run_module('nchunk_ros.cli', run_name='__main__', alter_sys=True)"
    return subprocess.Popen([sys.executable, "-c", program, "ask", "--stream", "--service", name,
                             "--wait", str(WAIT_S), question], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=ROOT)


def read_until(process, text: str, seen: bytearray) -> str:
    """Read the client's standard output until it holds `text`; all read so far (`seen` grows)."""
    deadline = time.monotonic() + WAIT_S
    while text.encode() not in seen:
        assert time.monotonic() < deadline, f"{text!r} not printed within {WAIT_S} s; printed {bytes(seen)!r}"
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            chunk = os.read(process.stdout.fileno(), 4096)
            assert chunk or process.poll() is None, f"client ended early: {bytes(seen)!r} {process.stderr.read()!r}"
            seen += chunk
    return seen.decode()


def test_stream_prints_each_word_while_the_answer_is_generated(server):
    srv, name, env = server
    process = start_client(name, env, "red square left of blue")
    seen = bytearray()
    try:
        words = "red square left of blue".split()
        for i in range(len(words)):
            so_far = "Q: red square left of blue\nA: " + " ".join(words[:i + 1])
            assert read_until(process, so_far, seen) == so_far  # printed now, and nothing ahead of the server
            srv.proceed.set()
        out, err = process.communicate(timeout=WAIT_S)
    finally:
        process.kill()
    out = seen.decode() + out.decode()
    assert process.returncode == 0, out + err.decode()
    assert out.startswith("Q: red square left of blue\nA: red square left of blue\n")
    assert "5 tokens generated" in out and "drive: 3.00 MiB in 12 reads" in out
    assert srv.finished == ["succeeded"] and srv.cancel_requests == 0


def test_ctrl_c_cancels_the_goal(server):
    srv, name, env = server
    process = start_client(name, env, "one two three four")
    seen = bytearray()
    try:
        read_until(process, "\nA: one", seen)
        srv.proceed.set()
        read_until(process, "\nA: one two", seen)  # the server now waits on "two"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=WAIT_S)
    finally:
        process.kill()
    out, err = seen.decode() + out.decode(), err.decode()
    assert process.returncode == 130, out + err
    assert out.startswith("Q: one two three four\nA: one two") and "three" not in out.split("\nA: ", 1)[1]
    assert "interrupted: goal canceled" in err and "Traceback" not in err
    assert srv.finished == ["canceled"] and srv.cancel_requests == 1


def test_token_printer_prints_what_each_feedback_adds():
    class Out(list):
        def write(self, text):
            self.append(text)

        def flush(self):
            pass

    out = Out()
    printer = TokenPrinter(out)
    for answer in ("green", "green square", "green square", "green squares"):
        printer(answer)
    printer("nothing")  # a text that does not continue the shown one is shown again, on a new line
    assert out == ["green", " square", "", "s", "\n   nothing"]
