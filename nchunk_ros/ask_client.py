"""The /ask client behind `nchunk ask "question"`: asks the VQA node and prints the answer and timing.

    nchunk ask "What colour is the circle?"                    # wait up to 10 s for the service
    nchunk ask --reset --max-new-tokens 16 "What is there now?"
    nchunk ask --stream "What is on the table?"                # token by token; Ctrl-C cancels

`AskClient` is a small node (own rclpy Context, so it also runs inside a process that has other ROS
work, such as `nchunk demo`) whose `ask` sends one request to the /ask service and waits for the
response, and whose `ask_streaming` sends the same question as a goal of the /ask action
(nchunk_interfaces/action/Ask), hands each feedback (the answer so far) to a callback, and cancels
the goal when interrupted (Ctrl-C). `format_response` renders a response or result for people.
Exit status of `run`: 0 when the node answered, 1 when it refused or failed (the reason goes to
stderr) or no service or action server was found, 130 when interrupted (a streamed goal is canceled
first).
"""
from __future__ import annotations

import json
import sys
import time
from typing import Callable

import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions

from nchunk_interfaces.srv import Ask

DEFAULT_SERVICE = "/ask"  # the service, and the action of the same name
CLIENT_MARGIN_S = 5.0  # waited beyond the request's own deadline before giving up on a response
NO_DEADLINE_WAIT_S = 600.0  # a request without timeout_s uses the node's ask_timeout_s, unknown here
CANCEL_WAIT_S = 5.0  # after Ctrl-C: for the node to accept the cancel, then for the goal's result
SPIN_SLICE_S = 0.1  # longest wait inside rclpy, where a Ctrl-C is not seen


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
        self._action_client = None  # made by the first ask_streaming: older builds have no action
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
        if not self._spin_until(future, wait):
            self._client.remove_pending_request(future)
            raise TimeoutError(f"no response from {self.service} within {wait:g} s")
        return future.result()

    def _spin_until(self, future, timeout_s: float) -> bool:
        """Spin until `future` is done or `timeout_s` passed; whether it is done. Spins in short
        slices, so that Ctrl-C (KeyboardInterrupt) is seen at once even when nothing arrives."""
        deadline = time.monotonic() + timeout_s
        while not future.done() and (left := deadline - time.monotonic()) > 0:
            self._executor.spin_until_future_complete(future, timeout_sec=min(left, SPIN_SLICE_S))
        return future.done()

    def wait_for_action_server(self, timeout_s: float) -> bool:
        return self._actions().wait_for_server(timeout_sec=timeout_s)

    def _actions(self):
        if self._action_client is None:
            from rclpy.action import ActionClient

            from nchunk_interfaces.action import Ask as AskAction

            self._action_client = ActionClient(self, AskAction, self.service)
        return self._action_client

    def ask_streaming(self, question: str, on_feedback: Callable[[str, int], None], *, max_new_tokens: int = 0,
                      reset_context: bool = False, timeout_s: float = 0.0):
        """Send the question as an /ask action goal; `on_feedback(answer_so_far, tokens_generated)`
        for each feedback; returns (result, status) with status a GoalStatus value (4 succeeded,
        5 canceled, 6 aborted). RuntimeError when the goal is rejected, TimeoutError when no result
        comes in time. On KeyboardInterrupt the goal is canceled, its result awaited for up to
        CANCEL_WAIT_S, and the interrupt raised again as `Interrupted` carrying that result.
        """
        from nchunk_interfaces.action import Ask as AskAction

        goal = AskAction.Goal(question=question, max_new_tokens=int(max_new_tokens),
                              reset_context=bool(reset_context), timeout_s=float(timeout_s))
        wait = (timeout_s if timeout_s > 0 else NO_DEADLINE_WAIT_S) + CLIENT_MARGIN_S
        sent = self._actions().send_goal_async(
            goal, feedback_callback=lambda m: on_feedback(m.feedback.answer, m.feedback.tokens_generated))
        result = None
        try:
            if not self._spin_until(sent, wait):
                raise TimeoutError(f"{self.service} did not accept or reject the goal within {wait:g} s")
            handle = sent.result()
            if not handle.accepted:
                raise RuntimeError(f"{self.service} rejected the goal")
            result = handle.get_result_async()
            if not self._spin_until(result, wait):
                raise TimeoutError(f"no result from {self.service} within {wait:g} s")
            return result.result().result, result.result().status
        except KeyboardInterrupt:
            raise Interrupted(self._cancel(sent, result)) from None

    def _cancel(self, sent, result):
        """Cancel the goal `sent` (once accepted); its result when it comes within CANCEL_WAIT_S, or None."""
        if not (sent.done() or self._spin_until(sent, CANCEL_WAIT_S)) or not sent.result().accepted:
            return None
        handle = sent.result()
        self._spin_until(handle.cancel_goal_async(), CANCEL_WAIT_S)
        if result is None:
            result = handle.get_result_async()
        return result.result().result if self._spin_until(result, CANCEL_WAIT_S) else None

    def close(self) -> None:
        self._executor.shutdown()
        if self._action_client is not None:
            self._action_client.destroy()
        context = self.context
        self.destroy_node()
        if self._own_context:
            rclpy.try_shutdown(context=context)

    def __enter__(self) -> "AskClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during `ask_streaming`: the goal was canceled; `result` is its result, None if none came."""

    def __init__(self, result):
        super().__init__("interrupted")
        self.result = result


class TokenPrinter:
    """Prints a streamed answer as it grows: what each feedback adds to the text already shown."""

    def __init__(self, out=None):
        self.out = sys.stdout if out is None else out
        self.shown = ""

    def __call__(self, answer: str, tokens_generated: int = 0) -> None:
        if answer.startswith(self.shown):
            self.out.write(answer[len(self.shown):])
        else:  # decoding the longer text changed its start (a merged word piece): show it again
            self.out.write("\n   " + answer)
        self.out.flush()
        self.shown = answer


def response_dict(response) -> dict:
    """Every field of a response (or an action result: the same fields) as plain JSON-able values
    (stamp as float seconds)."""
    out = {}
    for name in type(response).get_fields_and_field_types():
        value = getattr(response, name)
        out[name] = value.sec + value.nanosec * 1e-9 if name == "newest_frame_stamp" else value
    return out


def format_response(question: str, r: Ask.Response, asked_at: float | None = None) -> str:
    """The answer and where its time went, for a terminal; `asked_at`: time.time() when it was sent.
    `r`: an Ask.Response, or an action's Ask.Result (the same fields)."""
    lines = [f"Q: {question}"]
    if not r.success:
        lines.append(f"error: {r.error}" + (f" (partial answer: {r.answer!r})" if r.answer else ""))
        lines.append(f"time: queue {r.queue_s:.3f} s, total {r.total_s:.3f} s")
        return "\n".join(lines)
    lines.append(f"A: {r.answer}" + ("   [truncated]" if r.truncated else ""))
    return "\n".join(lines + format_details(r, asked_at))


def format_details(r: Ask.Response, asked_at: float | None = None) -> list[str]:
    """The lines of format_response after the answer: context, time and drive reads."""
    lines = []
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
    return lines


def run(question: str, *, max_new_tokens: int = 0, reset_context: bool = False, timeout_s: float = 0.0,
        wait_s: float = 10.0, service: str = DEFAULT_SERVICE, as_json: bool = False, stream: bool = False) -> int:
    """`nchunk ask`: one question, the answer printed; exit status 0 on success.

    stream: ask through the /ask action and print the answer token by token as feedback arrives
    (with as_json, only the result is printed); Ctrl-C cancels the goal and prints what came.
    """
    if stream:
        return _run_streaming(question, max_new_tokens=max_new_tokens, reset_context=reset_context,
                              timeout_s=timeout_s, wait_s=wait_s, service=service, as_json=as_json)
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


def _run_streaming(question: str, *, max_new_tokens: int, reset_context: bool, timeout_s: float, wait_s: float,
                   service: str, as_json: bool) -> int:
    printer = TokenPrinter()
    on_feedback = (lambda answer, tokens: None) if as_json else printer
    started = False
    try:
        with AskClient(service) as client:
            if not client.wait_for_action_server(wait_s):
                print(f"nchunk ask: no {service} action server within {wait_s:g} s: is vqa_node running (a "
                      f"version that serves the action), with the same ROS_DOMAIN_ID?", file=sys.stderr)
                return 1
            asked_at = time.time()
            if not as_json:
                print(f"Q: {question}\nA: ", end="", flush=True)
                started = True
            result, _ = client.ask_streaming(question, on_feedback, max_new_tokens=max_new_tokens,
                                             reset_context=reset_context, timeout_s=timeout_s)
    except (TimeoutError, RuntimeError) as exc:
        print(("\n" if started else "") + f"nchunk ask: {exc}", file=sys.stderr)
        return 1
    except Interrupted as interrupted:
        if as_json and interrupted.result is not None:
            print(json.dumps(response_dict(interrupted.result), indent=1))
        elif started:
            print(flush=True)
        print("interrupted: goal canceled" if interrupted.result is not None else "interrupted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(("\n" if started else "") + "interrupted", file=sys.stderr)
        return 130
    if as_json:
        print(json.dumps(response_dict(result), indent=1))
        return 0 if result.success else 1
    if result.success:
        printer(result.answer)  # whatever the last feedback did not show yet
        print("   [truncated]" if result.truncated else "")
        print("\n".join(format_details(result, asked_at)))
    else:
        print()
        print(f"error: {result.error}" + (f" (partial answer: {result.answer!r})" if result.answer else ""))
        print(f"time: queue {result.queue_s:.3f} s, total {result.total_s:.3f} s")
    return 0 if result.success else 1
