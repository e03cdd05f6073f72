"""The /ask action (nchunk_interfaces/action/Ask): the /ask service's question, answered token by token.

A goal is the service's request and goes the same way: the node's checks, then the worker's queue,
with the same deadline (`timeout_s`, else ask_timeout_s) and the same limit on waiting questions.
While the answer is decoded, every token publishes feedback with the answer so far. A cancel stops
decoding before the next token (a goal still waiting leaves the queue at once): the goal ends
canceled, with error "canceled" and the answer so far. Otherwise the goal succeeds when the answer
is complete and is aborted on any error (the same errors as the service: "timed out", "busy: …",
"node shutting down", …). The result carries every field of the service's response.
"""
from __future__ import annotations

import threading
import time

from rclpy.action import ActionServer, CancelResponse
from rclpy.callback_groups import ReentrantCallbackGroup

from nchunk_interfaces.action import Ask as AskAction
from nchunk_interfaces.srv import Ask

from nchunk_ros.session_tasks import printable
from nchunk_ros.worker import AskJob

CANCELING_WAIT_S = 1.0  # for rclpy to mark an accepted cancel before the goal ends canceled
RESULT_FIELDS = tuple(AskAction.Result.get_fields_and_field_types())


def result_of(response: Ask.Response) -> AskAction.Result:
    """The action result holding every field of the service `response` (the same fields)."""
    result = AskAction.Result()
    for name in RESULT_FIELDS:
        setattr(result, name, getattr(response, name))
    return result


class AskActionServer:
    """Serves the /ask action of `node` (a VQANode) through its `serve` and its worker's `cancel`."""

    def __init__(self, node, name: str, worker):
        self._node = node
        self._worker = worker
        self._lock = threading.Lock()
        self._jobs: dict[bytes, AskJob] = {}  # goal id -> the job answering it
        self._cancel_requested: set[bytes] = set()  # goals canceled before their job existed
        self._server = ActionServer(node, AskAction, name, self._execute, cancel_callback=self._cancel,
                                    callback_group=ReentrantCallbackGroup())

    def destroy(self) -> None:
        self._server.destroy()

    def _cancel(self, goal_handle) -> CancelResponse:
        goal_id = bytes(goal_handle.goal_id.uuid)
        with self._lock:
            job = self._jobs.get(goal_id)
            if job is None:
                self._cancel_requested.add(goal_id)
        if job is not None:
            self._worker.cancel(job)
        return CancelResponse.ACCEPT

    def _execute(self, goal_handle) -> AskAction.Result:
        goal = goal_handle.request
        goal_id = bytes(goal_handle.goal_id.uuid)
        request = Ask.Request(question=goal.question, max_new_tokens=goal.max_new_tokens,
                              reset_context=goal.reset_context, timeout_s=goal.timeout_s)

        def feedback(answer: str, tokens: int) -> None:
            try:
                goal_handle.publish_feedback(AskAction.Feedback(answer=printable(answer), tokens_generated=tokens))
            except Exception:  # the context went down meanwhile: the result says what matters
                pass

        def queued(job: AskJob) -> None:
            with self._lock:
                self._jobs[goal_id] = job
                canceled = goal_id in self._cancel_requested
            if canceled:
                self._worker.cancel(job)

        try:
            response = self._node.serve(request, time.monotonic(), on_token=feedback, queued=queued)
        finally:
            with self._lock:
                self._jobs.pop(goal_id, None)
                self._cancel_requested.discard(goal_id)
        self._end(goal_handle, response)
        return result_of(response)

    @staticmethod
    def _end(goal_handle, response: Ask.Response) -> None:
        if response.success:
            goal_handle.succeed()
            return
        if response.error == "canceled":
            deadline = time.monotonic() + CANCELING_WAIT_S
            while not goal_handle.is_cancel_requested and time.monotonic() < deadline:
                time.sleep(0.01)  # the cancel was accepted: rclpy marks the goal canceling right after
            if goal_handle.is_cancel_requested:
                goal_handle.canceled()
                return
        goal_handle.abort()
