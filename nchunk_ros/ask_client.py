"""The /ask client behind `nchunk ask "question"`: asks the VQA node and prints the answer and timing.

    nchunk ask "What colour is the circle?"                    # wait up to 10 s for the service
    nchunk ask --reset --max-new-tokens 16 "What is there now?"

`AskClient` is a small node (own rclpy Context, so it also runs inside a process that has other ROS
work, such as `nchunk demo`) whose `ask` sends one request and waits for the response;
`format_response` renders a response for people. Exit status of `run`: 0 when the node answered,
1 when it refused or failed (the reason goes to stderr) or no service was found.
"""
from __future__ import annotations

import json
import sys
import time

import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions

from nchunk_interfaces.srv import Ask

DEFAULT_SERVICE = "/ask"
CLIENT_MARGIN_S = 5.0  # waited beyond the request's own deadline before giving up on a response
NO_DEADLINE_WAIT_S = 600.0  # a request without timeout_s uses the node's ask_timeout_s, unknown here


class AskClient(Node):
    """A node with one /ask client. Use as a context manager, or call close()."""

    def __init__(self, service: str = DEFAULT_SERVICE, context: Context | None = None, **node_options):
        self._own_context = context is None
        if context is None:
            context = Context()
            rclpy.init(args=[], context=context, signal_handler_options=SignalHandlerOptions.NO)
        super().__init__("nchunk_ask", context=context, **node_options)
        self.service = service
        self._client = self.create_client(Ask, service)
        self._executor = SingleThreadedExecutor(context=context)
        self._executor.add_node(self)

    def wait_for_service(self, timeout_s: float) -> bool:
        return self._client.wait_for_service(timeout_sec=timeout_s)

    def ask(self, question: str, *, max_new_tokens: int = 0, reset_context: bool = False,
            timeout_s: float = 0.0) -> Ask.Response:
        """Send one request and wait for its response; TimeoutError when none comes in time."""
        request = Ask.Request(question=question, max_new_tokens=int(max_new_tokens),
                              reset_context=bool(reset_context), timeout_s=float(timeout_s))
        future = self._client.call_async(request)
        wait = (timeout_s if timeout_s > 0 else NO_DEADLINE_WAIT_S) + CLIENT_MARGIN_S
        self._executor.spin_until_future_complete(future, timeout_sec=wait)
        if not future.done():
            self._client.remove_pending_request(future)
            raise TimeoutError(f"no response from {self.service} within {wait:g} s")
        return future.result()

    def close(self) -> None:
        self._executor.shutdown()
        context = self.context
        self.destroy_node()
        if self._own_context:
            rclpy.try_shutdown(context=context)

    def __enter__(self) -> "AskClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def response_dict(response: Ask.Response) -> dict:
    """Every field of a response as plain JSON-able values (stamp as float seconds)."""
    out = {}
    for name in Ask.Response.get_fields_and_field_types():
        value = getattr(response, name)
        out[name] = value.sec + value.nanosec * 1e-9 if name == "newest_frame_stamp" else value
    return out


def format_response(question: str, r: Ask.Response, asked_at: float | None = None) -> str:
    """The answer and where its time went, for a terminal; `asked_at`: time.time() when it was sent."""
    lines = [f"Q: {question}"]
    if not r.success:
        lines.append(f"error: {r.error}" + (f" (partial answer: {r.answer!r})" if r.answer else ""))
        lines.append(f"time: queue {r.queue_s:.3f} s, total {r.total_s:.3f} s")
        return "\n".join(lines)
    lines.append(f"A: {r.answer}" + ("   [truncated]" if r.truncated else ""))
    stamp = r.newest_frame_stamp.sec + r.newest_frame_stamp.nanosec * 1e-9
    age = ""
    if stamp and asked_at is not None:
        lag = asked_at - stamp
        age = f", newest {lag:.1f} s older than the question" if lag >= 0 else \
            f", newest {-lag:.1f} s newer than the question"
    lines.append(f"context: {r.frames_in_context} frame(s){age}, {r.context_tokens} tokens; "
                 f"{r.tokens_generated} tokens generated")
    per_token = f" ({r.decode_s / r.tokens_generated * 1e3:.0f} ms/token)" if r.tokens_generated else ""
    lines.append(f"time: queue {r.queue_s:.3f} s, prefill {r.prefill_s:.3f} s, decode {r.decode_s:.3f} s"
                 f"{per_token}, total {r.total_s:.3f} s")
    rate = f", {r.io_bytes / r.io_s / 2**20:.0f} MiB/s" if r.io_s > 0 else ""
    reads = f" in {r.io_reads} reads (mean {r.io_bytes / r.io_reads / 1024:.1f} KiB)" if r.io_reads else ""
    lines.append(f"drive: {r.io_bytes / 2**20:.2f} MiB{reads}, {r.io_s:.3f} s busy{rate}")
    return "\n".join(lines)


def run(question: str, *, max_new_tokens: int = 0, reset_context: bool = False, timeout_s: float = 0.0,
        wait_s: float = 10.0, service: str = DEFAULT_SERVICE, as_json: bool = False) -> int:
    """`nchunk ask`: one question, the answer printed; exit status 0 on success."""
    try:
        with AskClient(service) as client:
            if not client.wait_for_service(wait_s):
                print(f"nchunk ask: no {service} service within {wait_s:g} s: is vqa_node running, with the "
                      f"same ROS_DOMAIN_ID?", file=sys.stderr)
                return 1
            asked_at = time.time()
            response = client.ask(question, max_new_tokens=max_new_tokens, reset_context=reset_context,
                                  timeout_s=timeout_s)
    except TimeoutError as exc:
        print(f"nchunk ask: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if as_json:
        print(json.dumps(response_dict(response), indent=1))
    else:
        print(format_response(question, response, asked_at))
    return 0 if response.success else 1
