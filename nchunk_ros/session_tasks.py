"""What the VQA node's worker does with the session: append a frame, answer a question, reload the model.

`SessionTasks` holds the node's Session and is called only from the worker thread (worker.py),
which also owns the question queue and the counters. It reports through its node: typed frame
statistics (`frame_appended`, turned into messages by diagnostics.py), reload and failure statuses,
answers on ~/answer, and parameters set back after a failed reload.

A reload opens a new session with the new values (as at start-up) and closes the old one only once
the new one works; the context then restarts from the newest frame of the old one. When the new
session cannot be opened, the old one keeps answering, and the parameters that asked for the reload
are set back to the running session's values (a change back asks for no reload of its own), and
so are a frame_tokens or decoding given with them that the running model cannot take (the others
apply to it). A
max_new_tokens above what the new model can hold is lowered to its limit, and the log says so.

A failed read of the store's weights (an I/O error, a file that ended early, a row whose CRC-32C
does not match) fails that frame or question with a one-line reason naming the file, the matrix
group, the row and the offset; it is counted (read_errors, checksum_errors) and logged as one line,
its traceback only at DEBUG level. The node keeps serving.

Every session call stops at its next layer boundary once the worker is stopping (the session's
`cancel` check): a shutdown does not wait for a long frame append, and the question being answered
gets "node shutting down".
"""
from __future__ import annotations

import math
import os
import time
import traceback
from fractions import Fraction

from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticStatus
from nchunk_core.runtime.cancel import Cancelled
from nchunk_interfaces.srv import Ask
from rclpy.executors import ExternalShutdownException
from rclpy.parameter import Parameter

from nchunk_core.io.errors import ChecksumError, IoError
from nchunk_ros import diagnostics
from nchunk_ros.parameters import MODEL_PARAMETERS, RELOAD_PARAMETERS, selection_from
from nchunk_ros.worker import AskJob, Frame, Worker

FAILURE_LOG_PERIOD_S = 5.0


def stamp_seconds(stamp: Time) -> Fraction:
    """A header stamp in seconds, exactly (a float of epoch seconds would lose about 0.1 µs)."""
    return stamp.sec + Fraction(stamp.nanosec, 10**9)


def stamp_time(seconds) -> Time:
    """The header stamp of a number of seconds (the inverse of stamp_seconds)."""
    sec = math.floor(seconds)
    return Time(sec=int(sec), nanosec=int(round((seconds - sec) * 10**9)))


def printable(text: str) -> str:
    """The answer without control characters other than newline and tab (NUL breaks C strings)."""
    return "".join(c for c in text if c in "\n\t" or not (ord(c) < 32 or 127 <= ord(c) < 160))


class StartupError(Exception):
    """The node cannot open a session; the message is the one-line reason (printed on exit at start-up)."""


class SessionTasks:
    """The worker's tasks on the node's session (module docstring)."""

    def __init__(self, node, worker: Worker, session, values: dict):
        self._node = node  # the VQANode: parameter values, logger, opening sessions, publishing
        self._worker = worker
        self._session = session
        self._session_values = {k: values[k] for k in RELOAD_PARAMETERS}  # what it was opened with
        self._newest_topic = ""  # where the newest frame in context came from
        self._newest_received = 0.0  # when it arrived at the node (time.monotonic())

    @property
    def session(self):
        return self._session

    @property
    def session_values(self) -> dict:
        """The values of the reload parameters the running session was opened with."""
        return dict(self._session_values)

    def frames_in_context(self) -> int:
        return self._session.frames_in_context

    def update_session(self, values: dict, model_settings: bool = True) -> None:
        """Hand the selection settings, max_frames, ram_budget_mib, cache_policy, max_new_tokens,
        frame_budget_ms and, with `model_settings`, frame_tokens and decoding of parameter `values` to the session
        (applied at its next call; frame_tokens at its next frame). Without: they are for a model
        being reloaded, which opens with them."""
        model = {"frame_tokens": values["frame_tokens"], "decoding": values["decoding"]} if model_settings else {}
        self._session.update(selection=selection_from(values), max_frames=values["max_frames"],
                             ram_budget_mib=values["ram_budget_mib"], frame_budget_ms=values["frame_budget_ms"],
                             cache_policy=values["cache_policy"],
                             max_new_tokens=min(values["max_new_tokens"], self._session.max_answer_tokens), **model)

    def model_problem(self, changes: dict) -> str:
        """Why the running model refuses the frame_tokens or decoding in parameter `changes` ("" if it
        takes them): a frame mode it lacks, a generation_config.json that does not load."""
        from nchunk_core.runtime.decoding import DecodingSettings

        session = self._session
        try:
            if "frame_tokens" in changes:
                session.adapter.check_frame_tokens(changes["frame_tokens"])
            if "decoding" in changes:
                DecodingSettings.load(session.store.path, session.stop_ids, changes["decoding"])
        except (ValueError, OSError) as exc:
            return str(exc)
        return ""

    def _stopping(self) -> bool:
        """The session's cancel check: true once the worker stops (node shutdown)."""
        return self._worker.stopping

    # -- frames -------------------------------------------------------------------------------------
    def append(self, frame: Frame) -> None:
        try:
            stats = self._session.append_frame(frame.image, stamp=frame.stamp, cancel=self._stopping)
        except Cancelled:
            self._node.get_logger().info(f"frame from {frame.topic} not appended: the node is shutting down")
            return
        except Exception as exc:  # ValueError: a frame the model cannot take; others: I/O or runtime failures
            self._append_failed(frame.topic, exc)
            return
        self._appended(frame, stats)

    def _appended(self, frame: Frame, stats) -> None:
        self._newest_topic, self._newest_received = frame.topic, frame.received
        self._worker.count("frames_appended")
        self._node.frame_appended(frame.topic, stats)
        self.clamp_max_new_tokens(reloaded=False)  # a larger frame than before leaves less room

    def _append_failed(self, topic: str, exc: Exception) -> None:
        self._worker.count("append_failures")
        reason = self._read_failure(exc, f"frame from {topic} not appended")
        if reason is None:
            reason = str(exc)
            detail = "" if isinstance(exc, ValueError) else "\n" + traceback.format_exc()
            self._node.get_logger().error(f"frame from {topic} not appended: {exc}{detail}",
                                          throttle_duration_sec=FAILURE_LOG_PERIOD_S)
        self._node.publish_status(diagnostics.FRAME, DiagnosticStatus.ERROR, f"append failed: {reason}", {})

    def _read_failure(self, exc: BaseException, what: str) -> str | None:
        """The one-line reason when `exc` (or what caused it) is a failed read of the store's weights,
        counted and logged once, traceback at DEBUG; None for any other failure."""
        failure = exc
        while failure is not None and not isinstance(failure, IoError):
            failure = failure.__cause__ or failure.__context__
        if failure is None:
            return None
        reason = read_failure_reason(failure, self._session.store)
        count = self._worker.count("read_errors")
        if isinstance(failure, ChecksumError):
            self._worker.count("checksum_errors")
        log = self._node.get_logger()
        log.error(f"{what}: {reason} (read error {count} since start)")
        log.debug(f"{what}:\n" + "".join(traceback.format_exception(exc)))
        return reason

    # -- questions ----------------------------------------------------------------------------------
    def answer(self, job: AskJob) -> None:
        request, session, values = job.request, self._session, self._node.parameter_values()
        response = Ask.Response()
        response.queue_s = job.started - job.arrival
        limit = values["max_new_tokens"]
        n_new = min(request.max_new_tokens, limit) if request.max_new_tokens > 0 else limit
        extra_prefill = 0.0
        try:
            if request.reset_context:
                t0 = time.monotonic()
                self._restart_context(session)
                extra_prefill = time.monotonic() - t0
            if session.frames_in_context == 0:
                raise ValueError(f"no camera frame yet (listening on {', '.join(values['image_topics'])})")
            answer = session.ask(request.question, max_new_tokens=n_new, deadline=job.deadline,
                                 should_stop=lambda: self._worker.decoding(job), on_token=job.on_token,
                                 cancel=self._stopping)
        except Cancelled:
            self._finish(job, response, "node shutting down", "asks_failed")
            return
        except ValueError as exc:
            self._finish(job, response, str(exc), "asks_failed")
            return
        except Exception as exc:  # a read or runtime failure: answer with it and keep serving
            reason = self._read_failure(exc, "question failed")
            if reason is None:
                self._node.get_logger().error(f"question failed:\n{traceback.format_exc()}")
                reason = f"runtime failure: {type(exc).__name__}: {exc}"
            self._finish(job, response, reason, "asks_failed")
            return
        response.success = True
        response.answer = printable(answer.text)
        response.truncated = answer.truncated
        response.frames_in_context = answer.frames_in_context
        if answer.newest_stamp is not None:
            response.newest_frame_stamp = stamp_time(answer.newest_stamp)
        response.newest_frame_age_s = self.newest_frame_age(job.started)
        response.context_tokens = answer.context_tokens
        response.tokens_generated = answer.tokens_generated
        response.prefill_s = extra_prefill + answer.prefill_s
        response.decode_s = answer.decode_s
        response.io_bytes = int(answer.bytes_read)
        response.io_reads = int(answer.reads)
        response.io_s = float(answer.io_s)
        error, counter = "", "asks_answered"
        if answer.interrupted:  # the partial answer stays in the response
            if self._worker.stopping:
                error, counter = "node shutting down", "asks_timed_out"
            elif job.canceled:
                error, counter = "canceled", "asks_canceled"
            else:
                error, counter = f"timed out after {job.timeout:g} s", "asks_timed_out"
        self._finish(job, response, error, counter)

    def _restart_context(self, session) -> None:
        """reset_context: the context restarts from the newest frame (appended again, as a frame)."""
        try:
            stats = session.reset(keep_newest=True, cancel=self._stopping)
        except Cancelled:
            raise
        except Exception as exc:
            self._append_failed(self._newest_topic, exc)
            raise RuntimeError("the newest frame could not be appended again after the reset") from exc
        if stats is not None:
            self._appended(Frame(None, stats.stamp, self._newest_topic, self._newest_received), stats)

    def newest_frame_age(self, when: float) -> float:
        """Seconds from the newest frame's arrival to `when` (time.monotonic()); 0 without a frame."""
        return max(0.0, when - self._newest_received) if self._session.frames_in_context else 0.0

    def _finish(self, job: AskJob, response: Ask.Response, error: str, counter: str) -> None:
        response.error = error
        if error:
            response.success = False
            response.frames_in_context = self._session.frames_in_context
            response.newest_frame_age_s = self.newest_frame_age(job.started or time.monotonic())
        response.total_s = time.monotonic() - job.arrival
        if not self._worker.deliver(job, response, counter):
            self._node.get_logger().warning(f"a question's deadline passed during its prefill: the caller got "
                                            f"'timed out'; its result ({response.total_s:.2f} s after arrival) "
                                            f"is dropped")
        elif response.success:
            self._node.publish_answer(response.answer)

    # -- reloads ------------------------------------------------------------------------------------
    def reload(self, values: dict, reopen: bool = False) -> None:
        """Open a session with `values`; swap it in if that works, else keep the old one and set back.
        `reopen`: also with the running session's values (the store may have been replaced)."""
        log, old = self._node.get_logger(), self._session
        changes = ", ".join(f"{k} {self._session_values[k]!r} -> {values[k]!r}" for k in RELOAD_PARAMETERS
                            if values[k] != self._session_values[k])
        if not changes and reopen:
            changes = f"store_path {values['store_path']!r} opened again"
        elif not changes:  # set back before the worker got to it
            return
        log.info(f"reloading the model ({changes}): questions wait, frames are skipped meanwhile")
        try:
            session = self._node.open_session(values)
        except ExternalShutdownException:
            return  # stopping
        except Exception as exc:  # StartupError: the one-line reason; anything else: a runtime failure
            reason = str(exc) if isinstance(exc, StartupError) else f"{type(exc).__name__}: {exc}"
            self._worker.count("reload_failures")
            log.error(f"model reload failed, still answering with the running model: {reason}")
            self._node.publish_status(diagnostics.RELOAD, DiagnosticStatus.ERROR, f"reload failed: {reason}",
                                      {"changes": changes})
            self._set_back(values)
            return
        newest = old.newest_frame
        self._session, self._session_values = session, {k: values[k] for k in RELOAD_PARAMETERS}
        if newest is not None:  # the context restarts from the newest frame
            self._worker.restart_from(Frame(*newest, self._newest_topic, self._newest_received))
        self._worker.count("reloads")
        self._worker.reload_finished()
        self.update_session(self._node.parameter_values())  # selection or max_frames changed while it opened
        old.close()
        message = (f"model reloaded ({changes}): earlier frames are gone, the context starts again from the "
                   f"newest frame")
        log.info(message)
        self._node.publish_status(diagnostics.RELOAD, DiagnosticStatus.OK, message, {"changes": changes})
        self.clamp_max_new_tokens(reloaded=True)

    def clamp_max_new_tokens(self, reloaded: bool) -> None:
        """Lower the max_new_tokens parameter to what the session's model holds (Session.max_answer_tokens,
        which a first or larger frame lowers), saying so in the log and, after a start or a reload
        (`reloaded`), as a WARN reload status."""
        wanted, limit = self._node.parameter_values()["max_new_tokens"], self._session.max_answer_tokens
        if wanted <= limit:
            return
        result = self._node.set_parameters_atomically([Parameter("max_new_tokens", value=limit)])
        message = (f"max_new_tokens lowered from {wanted} to {limit}: the model holds "
                   f"{self._session.max_positions} positions, {limit} of them free for an answer")
        if not result.successful:
            message = f"max_new_tokens {wanted} is above this model's limit {limit} and stays: {result.reason}"
        self._node.get_logger().warning(message)
        if reloaded:
            self._node.publish_status(diagnostics.RELOAD, DiagnosticStatus.WARN, message,
                                      {"max_new_tokens": self._node.parameter_values()["max_new_tokens"]})

    def _set_back(self, failed: dict) -> None:
        """Set the parameters that asked for the `failed` reload back to the running session's values."""
        current = self._node.parameter_values()
        back = [Parameter(k, value=self._session_values[k]) for k in RELOAD_PARAMETERS
                if current[k] == failed[k] != self._session_values[k]]
        if not back:  # changed again meanwhile: the next reload tries that
            return
        config = self._session.config  # frame_tokens or decoding meant for the new model: kept if this one takes them
        back += [Parameter(k, value=getattr(config, k)) for k in MODEL_PARAMETERS
                 if current[k] != getattr(config, k) and self.model_problem({k: current[k]})]
        result = self._node.set_parameters_atomically(back)  # the node then finds nothing to reload
        self.update_session(self._node.parameter_values())
        names = ", ".join(f"{p.name} {p.value!r}" for p in back)
        if result.successful:
            self._node.get_logger().info(f"parameters set back to the running model's: {names}")
        else:
            self._node.get_logger().error(f"cannot set the parameters back to the running model's "
                                          f"({names}): {result.reason}")


def read_failure_reason(exc: BaseException, store) -> str:
    """One line naming the file, the matrix group, the row and the offset of a failed read of `store`.

    `exc` is the reader's IoError (nchunk_core/io/errors.py: path, offset, length, errno), a
    ChecksumError (also row and group) or an EndOfFileError (no errno).
    """
    if isinstance(exc, ChecksumError):  # its message names the file, group, row and offset
        return f"damaged weights: {exc}"
    path, offset, length, code = exc.path, exc.offset, exc.length, exc.errno
    group = None if offset is None else _group_at(store, path, offset)
    where = "" if group is None else f" (group {group.name!r}, row {(offset - group.offset) // group.row_bytes})"
    if code and offset is not None and length is not None:
        return f"cannot read weights: {path}, {length} bytes at offset {offset}{where}: {os.strerror(code)}"
    return f"cannot read weights{where}: {str(exc) or type(exc).__name__}"  # the reader's message names the file


def _group_at(store, path, offset: int):
    """The store's group holding byte `offset` of the file `path`, or None."""
    for group in getattr(store, "groups", {}).values():
        if str(group.file) == str(path) and group.offset <= offset < group.offset + group.nbytes:
            return group
    return None
