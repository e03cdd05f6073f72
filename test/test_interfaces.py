"""The /ask service definition (nchunk_interfaces/srv/Ask.srv): its fields, and a real round trip.

The round trip runs a server and a client in two separate rclpy contexts (two DDS participants, as
two processes would be) on a random domain id, restricted to this host, with a service name unique
to the run, so parallel test runs on one machine do not see each other.
"""
import random
import threading
import uuid

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
    for name in ("queue_s", "prefill_s", "decode_s", "total_s", "io_s"):
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
