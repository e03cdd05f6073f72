"""The /ask service and action definitions (nchunk_interfaces/srv/Ask.srv, action/Ask.action): their
fields, and real round trips; for the action also feedback and cancellation.

The round trips run a server and a client in two separate rclpy contexts (two DDS participants, as
two processes would be) on a random domain id, restricted to this host, with a name unique to the
run, so parallel test runs on one machine do not see each other.
"""
import random
import threading
import time
import uuid

from action_msgs.msg import GoalStatus

import pytest

rclpy = pytest.importorskip("rclpy", reason="ROS 2 (rclpy) is not installed")

from builtin_interfaces.msg import Time  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.signals import SignalHandlerOptions  # noqa: E402

try:
    from nchunk_interfaces.srv import Ask
except ImportError as exc:  # a clear hint instead of a bare collection error
    raise ImportError(
        "nchunk_interfaces is not built: run `bash scripts/build_interfaces.sh .venv` "
        "(PyPI wheels) or build it with colcon (see nchunk_interfaces/README.md)"
    ) from exc

REQUEST_FIELDS = {
    "question": "string",
    "max_new_tokens": "int32",
    "reset_context": "boolean",
    "timeout_s": "double",
}
RESPONSE_FIELDS = {
    "success": "boolean",
    "answer": "string",
    "error": "string",
    "truncated": "boolean",
    "frames_in_context": "int32",
    "newest_frame_stamp": "builtin_interfaces/Time",
    "newest_frame_age_s": "double",
    "context_tokens": "int32",
    "tokens_generated": "int32",
    "queue_s": "double",
    "prefill_s": "double",
    "decode_s": "double",
    "total_s": "double",
    "io_bytes": "uint64",
    "io_reads": "uint64",
    "io_s": "double",
}
DISCOVERY_TIMEOUT_S = 10.0  # only reached when something is wrong
CALL_TIMEOUT_S = 10.0


def test_fields_are_the_documented_contract():
    # Changing the interface is a deliberate act: update Ask.srv, its comments and this test.
    assert Ask.Request.get_fields_and_field_types() == REQUEST_FIELDS
    assert Ask.Response.get_fields_and_field_types() == RESPONSE_FIELDS


def test_defaults_mean_use_the_node_parameters():
    request = Ask.Request()
    assert (request.question, request.max_new_tokens, request.reset_context, request.timeout_s) == (
        "", 0, False, 0.0)
    response = Ask.Response()
    assert response.success is False
    assert response.answer == "" and response.error == ""
    assert response.truncated is False
    assert response.frames_in_context == 0
    assert (response.newest_frame_stamp.sec, response.newest_frame_stamp.nanosec) == (0, 0)
    for name in ("context_tokens", "tokens_generated", "io_bytes", "io_reads"):
        assert getattr(response, name) == 0
    for name in ("newest_frame_age_s", "queue_s", "prefill_s", "decode_s", "total_s", "io_s"):
        assert getattr(response, name) == 0.0


def checked(message_type, **fields):
    """A message that checks field types on assignment (Jazzy and later only do when asked)."""
    if "_check_fields" in message_type.__slots__:
        fields["check_fields"] = True
    return message_type(**fields)


def test_field_types_are_enforced():
    request = checked(Ask.Request, question="What is on the table?", max_new_tokens=64,
                      reset_context=True, timeout_s=2.5)
    assert request.max_new_tokens == 64 and request.reset_context and request.timeout_s == 2.5
    with pytest.raises(AssertionError):
        request.question = 42
    with pytest.raises(AssertionError):
        request.max_new_tokens = 2**31  # int32
    with pytest.raises(AssertionError):
        request.max_new_tokens = 1.5
    response = checked(Ask.Response)
    response.io_bytes = 2**64 - 1  # uint64: a whole model's worth of reads fits
    with pytest.raises(AssertionError):
        response.io_bytes = -1
    with pytest.raises(AssertionError):
        response.newest_frame_stamp = 12.0
    response.newest_frame_stamp = Time(sec=1_700_000_000, nanosec=999_999_999)


def filled_response(request: Ask.Request) -> Ask.Response:
    """Every response field set to a value derived from the request, so a round trip checks all."""
    return Ask.Response(
        success=True,
        answer="echo: " + request.question,
        error="",
        truncated=request.reset_context,
        frames_in_context=7,
        newest_frame_stamp=Time(sec=1_700_000_123, nanosec=456_789_000),
        newest_frame_age_s=0.375,
        context_tokens=7 * 196 + 20,
        tokens_generated=request.max_new_tokens,
        queue_s=0.25,
        prefill_s=1.5,
        decode_s=request.timeout_s,
        total_s=0.25 + 1.5 + request.timeout_s,
        io_bytes=2**40 + 7,  # past 32 bits on purpose
        io_reads=123_456,
        io_s=0.75,
    )


@pytest.fixture
def localhost_only(monkeypatch):
    """Keep discovery on this host (Jazzy and later; ROS_LOCALHOST_ONLY for older releases)."""
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    monkeypatch.delenv("ROS_STATIC_PEERS", raising=False)


def test_round_trip_over_dds(localhost_only):
    domain_id = random.randint(1, 101)
    service_name = f"/test_interfaces/ask_{uuid.uuid4().hex[:12]}"
    server_context, client_context = rclpy.Context(), rclpy.Context()
    for context in (server_context, client_context):
        rclpy.init(context=context, domain_id=domain_id,
                   signal_handler_options=SignalHandlerOptions.NO)
    server_node = rclpy.create_node("ask_test_server", context=server_context)
    client_node = rclpy.create_node("ask_test_client", context=client_context)
    server_executor = SingleThreadedExecutor(context=server_context)
    client_executor = SingleThreadedExecutor(context=client_context)
    received = []

    def handle(request, response):
        received.append(request)
        return filled_response(request)

    server_node.create_service(Ask, service_name, handle)
    client = client_node.create_client(Ask, service_name)
    server_executor.add_node(server_node)
    client_executor.add_node(client_node)
    spinner = threading.Thread(target=server_executor.spin, daemon=True)
    spinner.start()
    try:
        assert client.wait_for_service(timeout_sec=DISCOVERY_TIMEOUT_S), \
            f"{service_name} not discovered within {DISCOVERY_TIMEOUT_S} s"
        request = Ask.Request(question="Wo ist die Tasse? (ünïcødé, 🍵)", max_new_tokens=32,
                              reset_context=True, timeout_s=3.25)
        future = client.call_async(request)
        client_executor.spin_until_future_complete(future, timeout_sec=CALL_TIMEOUT_S)
        assert future.done(), f"no response from {service_name} within {CALL_TIMEOUT_S} s"
        response = future.result()
    finally:
        server_executor.shutdown()
        client_executor.shutdown()
        spinner.join(timeout=5.0)
        server_node.destroy_node()
        client_node.destroy_node()
        rclpy.try_shutdown(context=server_context)
        rclpy.try_shutdown(context=client_context)
    assert not spinner.is_alive()

    assert len(received) == 1
    assert received[0] == request  # every request field arrived intact
    assert response == filled_response(request)  # and every response field came back
    assert response.answer == "echo: Wo ist die Tasse? (ünïcødé, 🍵)"
    assert response.newest_frame_stamp == Time(sec=1_700_000_123, nanosec=456_789_000)
    assert response.io_bytes == 2**40 + 7


# ---- the action: action/Ask.action ----------------------------------------------------------------

FEEDBACK_FIELDS = {"answer": "string", "tokens_generated": "int32"}
ACK_WAIT_S = 0.2  # the test server publishes a feedback again at this interval until it is seen


@pytest.fixture(scope="module")
def AskAction():
    try:
        from nchunk_interfaces.action import Ask as AskAction
    except ImportError as exc:
        raise ImportError("nchunk_interfaces has no action Ask: rebuild it with `bash scripts/build_interfaces.sh "
                          ".venv` (PyPI wheels) or colcon (see nchunk_interfaces/README.md)") from exc
    return AskAction


def test_action_fields_are_the_documented_contract(AskAction):
    from rclpy.type_support import check_for_type_support

    check_for_type_support(AskAction)
    # goal = the service's request, result = its response: one contract, two ways to call it
    assert AskAction.Goal.get_fields_and_field_types() == REQUEST_FIELDS
    assert AskAction.Result.get_fields_and_field_types() == RESPONSE_FIELDS
    assert AskAction.Feedback.get_fields_and_field_types() == FEEDBACK_FIELDS
    goal = AskAction.Goal()
    assert (goal.question, goal.max_new_tokens, goal.reset_context, goal.timeout_s) == ("", 0, False, 0.0)
    assert AskAction.Result().success is False and AskAction.Feedback().tokens_generated == 0


class LockStepServer:
    """An /ask action server answering with the question's words, one feedback per word. It sends
    word i's feedback (again every ACK_WAIT_S, harmless since feedback holds the whole answer so far)
    until the client has seen it, and checks for a cancel request meanwhile: the order of events is
    fixed, not left to timing."""

    def __init__(self, AskAction, node, name):
        from rclpy.action import ActionServer, CancelResponse
        from rclpy.callback_groups import ReentrantCallbackGroup

        self.AskAction = AskAction
        self.seen = threading.Event()
        self.goals = []
        self.cancel_requests = 0
        self.finished = []  # "succeeded" or "canceled", per goal

        def cancel(goal_handle):
            self.cancel_requests += 1
            return CancelResponse.ACCEPT

        self.server = ActionServer(node, AskAction, name, self.execute, cancel_callback=cancel,
                                   callback_group=ReentrantCallbackGroup())

    def result(self, goal, words, **fields):
        return self.AskAction.Result(answer=" ".join(words), tokens_generated=len(words), frames_in_context=1,
                                     newest_frame_stamp=Time(sec=1_700_000_000, nanosec=5), io_bytes=2**40 + 1,
                                     decode_s=goal.timeout_s, **fields)

    def execute(self, goal_handle):
        goal = goal_handle.request
        self.goals.append(goal)
        words = goal.question.split()[:goal.max_new_tokens]
        for i in range(len(words)):
            self.seen.clear()
            feedback = self.AskAction.Feedback(answer=" ".join(words[:i + 1]), tokens_generated=i + 1)
            goal_handle.publish_feedback(feedback)
            while not self.seen.wait(ACK_WAIT_S):
                if goal_handle.is_cancel_requested:
                    goal_handle.canceled()
                    self.finished.append("canceled")
                    return self.result(goal, words[:i + 1], success=False, error="canceled", truncated=True)
                goal_handle.publish_feedback(feedback)
        goal_handle.succeed()
        self.finished.append("succeeded")
        return self.result(goal, words, success=True)


@pytest.fixture
def action_pair(localhost_only, AskAction):
    """(server, client node, client executor, action name): a LockStepServer spinning on its own
    MultiThreadedExecutor (the cancel service runs while a goal executes) and a client node."""
    from rclpy.executors import MultiThreadedExecutor

    domain_id = random.randint(1, 101)
    name = f"/test_interfaces/ask_action_{uuid.uuid4().hex[:12]}"
    server_context, client_context = rclpy.Context(), rclpy.Context()
    for context in (server_context, client_context):
        rclpy.init(context=context, domain_id=domain_id, signal_handler_options=SignalHandlerOptions.NO)
    server_node = rclpy.create_node("ask_action_test_server", context=server_context)
    client_node = rclpy.create_node("ask_action_test_client", context=client_context)
    server = LockStepServer(AskAction, server_node, name)
    server_executor = MultiThreadedExecutor(num_threads=3, context=server_context)
    client_executor = SingleThreadedExecutor(context=client_context)
    server_executor.add_node(server_node)
    client_executor.add_node(client_node)
    spinner = threading.Thread(target=server_executor.spin, daemon=True)
    spinner.start()
    try:
        yield server, client_node, client_executor, name
    finally:
        server.server.destroy()
        server_executor.shutdown()
        client_executor.shutdown()
        spinner.join(timeout=5.0)
        server_node.destroy_node()
        client_node.destroy_node()
        rclpy.try_shutdown(context=server_context)
        rclpy.try_shutdown(context=client_context)
        assert not spinner.is_alive()


def spin_until(executor, future, what):
    executor.spin_until_future_complete(future, timeout_sec=CALL_TIMEOUT_S)
    assert future.done(), f"no {what} within {CALL_TIMEOUT_S} s"
    return future.result()


def test_action_goal_feedback_result_over_dds(action_pair, AskAction):
    from rclpy.action import ActionClient

    server, node, executor, name = action_pair
    client = ActionClient(node, AskAction, name)
    assert client.wait_for_server(timeout_sec=DISCOVERY_TIMEOUT_S), f"{name} not discovered"
    feedback = []

    def on_feedback(message):
        if not feedback or feedback[-1] != message.feedback:  # repeats of one feedback are allowed
            feedback.append(message.feedback)
        server.seen.set()

    goal = AskAction.Goal(question="the red circle is left of the blue square (ünïcødé)", max_new_tokens=5,
                          reset_context=True, timeout_s=2.5)
    handle = spin_until(executor, client.send_goal_async(goal, feedback_callback=on_feedback), "goal response")
    assert handle.accepted
    response = spin_until(executor, handle.get_result_async(), "result")
    client.destroy()

    words = goal.question.split()[:5]
    assert server.goals == [goal]  # every goal field arrived intact
    assert [(f.answer, f.tokens_generated) for f in feedback] == [(" ".join(words[:i]), i) for i in range(1, 6)]
    assert response.status == GoalStatus.STATUS_SUCCEEDED
    assert response.result == server.result(goal, words, success=True)  # every result field came back
    assert response.result.io_bytes == 2**40 + 1 and response.result.decode_s == 2.5
    assert server.finished == ["succeeded"] and server.cancel_requests == 0


def test_action_cancel_stops_the_goal_with_the_partial_answer(action_pair, AskAction):
    from rclpy.action import ActionClient

    server, node, executor, name = action_pair
    client = ActionClient(node, AskAction, name)
    assert client.wait_for_server(timeout_sec=DISCOVERY_TIMEOUT_S), f"{name} not discovered"
    answers = []

    def on_feedback(message):
        if message.feedback.answer not in answers:
            answers.append(message.feedback.answer)
        if message.feedback.tokens_generated < 2:
            server.seen.set()  # the second word is never acknowledged: the server waits, the client cancels

    goal = AskAction.Goal(question="one two three four five six", max_new_tokens=6)
    handle = spin_until(executor, client.send_goal_async(goal, feedback_callback=on_feedback), "goal response")
    assert handle.accepted
    deadline = time.monotonic() + CALL_TIMEOUT_S
    while len(answers) < 2 and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.1)
    assert answers == ["one", "one two"], f"feedback within {CALL_TIMEOUT_S} s: {answers}"
    cancel = spin_until(executor, handle.cancel_goal_async(), "cancel response")
    assert [bytes(g.goal_id.uuid) for g in cancel.goals_canceling] == [bytes(handle.goal_id.uuid)]
    response = spin_until(executor, handle.get_result_async(), "result")
    client.destroy()

    assert answers == ["one", "one two"]
    assert response.status == GoalStatus.STATUS_CANCELED
    result = response.result
    assert (result.success, result.error, result.answer, result.truncated, result.tokens_generated) == (
        False, "canceled", "one two", True, 2)
    assert server.finished == ["canceled"] and server.cancel_requests == 1
