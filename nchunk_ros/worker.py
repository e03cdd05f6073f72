"""The VQA node's worker: one thread runs every session call, in a fixed order (plain threads, no DDS).

Other threads hand it work:

- camera callbacks put the newest frame in a one-slot mailbox (`offer_frame`); a frame still
  waiting there is replaced and counted as skipped;
- /ask callbacks queue a question (`ask`): at most `max_waiting` wait behind the one being
  answered (more are refused as busy), and each caller blocks until its answer or its deadline;
- parameter changes ask for a model reload (`request_reload`; None cancels one not yet started).

The worker takes, in this order: a wanted reload; the oldest question, once a frame is in context
(or when no frame waits); the newest frame, at most `append_rate_hz` frames a second (0: no limit),
and at once when a question waits for a first frame. What a task does is the business of the
`tasks` object given to `start` (session_tasks.SessionTasks in the node): `reload(values)`,
`answer(job)`, `append(frame)` and `frames_in_context()`.

Deadlines: a question still waiting at its deadline gets "timed out" at once ("reloading the model;
timed out after N s" when a reload held it up); one whose answer is being decoded (`decoding`)
stops before its next token and gets its partial answer; one in its question's prefill, which
cannot be interrupted, gets "timed out after N s" at once and the worker's result is dropped.

Cancel (the /ask action, `cancel`): a question still waiting gets "canceled" at once; one being
answered stops decoding before its next token (its answer says "canceled").
"""
from __future__ import annotations

import collections
import dataclasses
import math
import threading
import time
import traceback
from typing import Callable

from nchunk_interfaces.srv import Ask

MAX_WAITING_ASKS = 4  # requests waiting behind the one being answered; more are refused as busy


@dataclasses.dataclass
class Frame:
    image: object  # np.ndarray uint8 [H, W, 3] RGB, or a PIL RGB image
    stamp: object  # seconds, exact (fractions.Fraction of the header stamp)
    topic: str


@dataclasses.dataclass
class AskJob:
    request: Ask.Request
    arrival: float  # time.monotonic()
    deadline: float
    timeout: float  # deadline - arrival
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    response: Ask.Response | None = None
    started: float = 0.0  # time.monotonic() when the worker took it; 0 while waiting
    decoding: bool = False  # the worker is past the question's prefill (a deadline now gives a partial answer)
    abandoned: bool = False  # the caller stopped waiting (deadline)
    canceled: bool = False  # the caller canceled it (the /ask action): decoding stops before the next token
    on_token: Callable[[str, int], None] | None = None  # answer so far, tokens generated (the action's feedback)


@dataclasses.dataclass(frozen=True)
class Counters:
    """The node's intake, reload and /ask counters at one moment (diagnostics.py publishes them)."""

    frames_received: int = 0
    frames_appended: int = 0
    frames_skipped: int = 0  # replaced by a newer frame before the worker got to them
    frames_malformed: int = 0
    append_failures: int = 0
    reloads: int = 0
    reload_failures: int = 0
    reloading: int = 0  # 1 while a reload runs
    asks_answered: int = 0
    asks_failed: int = 0
    asks_refused: int = 0
    asks_busy: int = 0
    asks_timed_out: int = 0
    asks_canceled: int = 0
    asks_waiting: int = 0
    asks_in_progress: int = 0


COUNTED = tuple(f.name for f in dataclasses.fields(Counters)
                if f.name not in ("reloading", "asks_waiting", "asks_in_progress"))


def failed(response: Ask.Response, error: str, arrival: float) -> Ask.Response:
    """`response` with success false, `error` and the total time since `arrival`."""
    response.success = False
    response.error = error
    response.total_s = time.monotonic() - arrival
    return response


class Worker:
    """The mailbox, the question queue, the counters and the thread that serves them (module docstring)."""

    def __init__(self, log_error: Callable[[str], None], max_waiting: int = MAX_WAITING_ASKS,
                 append_rate_hz: float = 0.0):
        self._log_error = log_error
        self._max_waiting = max_waiting
        self._append_rate_hz = append_rate_hz
        self._lock = threading.Condition()  # guards everything below
        self._pending: Frame | None = None
        self._asks: collections.deque[AskJob] = collections.deque()
        self._answering: AskJob | None = None
        self._reload: dict | None = None  # parameter values a reload is wanted with
        self._reloading = False
        self._stop = False
        self._last_append = -math.inf
        self._frame_seen = False  # a well-formed frame has arrived
        self._counts = collections.Counter()
        self._tasks = None
        self._thread: threading.Thread | None = None

    def start(self, tasks) -> None:
        self._tasks = tasks
        self._thread = threading.Thread(target=self._run, name="vqa-worker", daemon=True)
        self._thread.start()

    # -- inputs -------------------------------------------------------------------------------------
    def count(self, name: str) -> int:
        """Add one to the counter `name` (a COUNTED field); its new value."""
        if name not in COUNTED:
            raise KeyError(name)
        with self._lock:
            self._counts[name] += 1
            return self._counts[name]

    def offer_frame(self, frame: Frame) -> None:
        """The newest camera frame: it replaces one still waiting (counted as skipped)."""
        with self._lock:
            if self._pending is not None:
                self._counts["frames_skipped"] += 1
            self._pending = frame
            self._frame_seen = True
            self._lock.notify_all()

    def restart_from(self, frame: Frame) -> None:
        """Append `frame` next unless a newer one waits (the context restarts from it after a reload)."""
        with self._lock:
            if self._pending is None:
                self._pending = frame
                self._lock.notify_all()

    def set_append_rate(self, hz: float) -> None:
        with self._lock:
            self._append_rate_hz = hz
            self._lock.notify_all()

    def request_reload(self, values: dict | None) -> None:
        """Reload the model with parameter `values` before the next frame or question; None cancels
        a reload that has not started."""
        with self._lock:
            self._reload = values
            self._lock.notify_all()

    @property
    def frame_seen(self) -> bool:
        return self._frame_seen

    @property
    def stopping(self) -> bool:
        return self._stop

    # -- questions ----------------------------------------------------------------------------------
    def ask(self, job: AskJob) -> Ask.Response:
        """Queue `job` and wait for its response, or for its deadline (module docstring)."""
        response = Ask.Response()
        with self._lock:
            if job.canceled:  # before it was queued
                self._counts["asks_canceled"] += 1
                return failed(response, "canceled", job.arrival)
            if self._stop:
                return failed(response, "node shutting down", job.arrival)
            waiting = len(self._asks)  # queued jobs have not started yet
            if waiting >= self._max_waiting:
                self._counts["asks_busy"] += 1
                return failed(response, f"busy: {waiting} questions are already waiting; try again later",
                              job.arrival)
            self._asks.append(job)
            self._lock.notify_all()
        if job.done.wait(max(0.0, job.deadline - time.monotonic())):
            return job.response
        with self._lock:
            if job.done.is_set():  # finished right at the deadline
                return job.response
            decoding = job.decoding
            if not decoding:
                job.abandoned = True
                if not job.started:
                    self._asks.remove(job)
            reloading = self._reloading
            self._counts["asks_timed_out"] += not decoding
        if decoding:  # decoding stops before its next token: the partial answer comes in a moment
            job.done.wait()
            return job.response
        if job.started:  # the deadline passed during the question's prefill: no answer token yet
            error = f"timed out after {job.timeout:g} s"
        else:
            error = f"reloading the model; timed out after {job.timeout:g} s" if reloading else "timed out"
        response.frames_in_context = self._tasks.frames_in_context()
        response.queue_s = (job.started or time.monotonic()) - job.arrival
        return failed(response, error, job.arrival)

    def decoding(self, job: AskJob) -> bool:
        """Asked by the answer before each token (so the prefill is over): whether to stop now."""
        with self._lock:
            job.decoding = True
            return job.abandoned or job.canceled or self._stop

    def cancel(self, job: AskJob) -> None:
        """The caller cancels `job` (module docstring)."""
        with self._lock:
            job.canceled = True
            if job.started or job.done.is_set() or job not in self._asks:
                return  # being answered (stops before its next token), or finished
            self._asks.remove(job)
            self._counts["asks_canceled"] += 1
            job.response = failed(Ask.Response(), "canceled", job.arrival)
            job.done.set()

    def deliver(self, job: AskJob, response: Ask.Response, counter: str) -> bool:
        """Hand `response` to the caller waiting for `job` and count it; False when the caller gave
        up at its deadline (the response is dropped)."""
        with self._lock:
            if job.abandoned:
                return False
            self._counts[counter] += 1
            job.response = response
            job.done.set()
            return True

    # -- the thread ---------------------------------------------------------------------------------
    def _next_task(self) -> tuple[str | None, object]:
        """Under the lock: ("reload", parameter values) first, then ("ask", AskJob), then ("frame",
        Frame); (None, None) to stop."""
        while not self._stop:
            if self._reload is not None:
                values, self._reload, self._reloading = self._reload, None, True
                return "reload", values
            in_context = self._tasks.frames_in_context()
            if self._asks and (in_context > 0 or self._pending is None):
                job = self._asks.popleft()
                job.started = time.monotonic()
                self._answering = job
                return "ask", job
            if self._pending is not None:
                rate = self._append_rate_hz
                wait = self._last_append + (1.0 / rate if rate > 0 else 0.0) - time.monotonic()
                if wait <= 0 or (self._asks and in_context == 0):
                    frame, self._pending = self._pending, None
                    self._last_append = time.monotonic()
                    return "frame", frame
                self._lock.wait(wait)
            else:
                self._lock.wait()
        return None, None

    def _run(self) -> None:
        while True:
            with self._lock:
                task, item = self._next_task()
            if task is None:
                return  # stopping
            try:
                if task == "reload":
                    self._tasks.reload(item)
                elif task == "ask":
                    self._answer(item)
                else:
                    self._tasks.append(item)
            except Exception:  # never let the worker die: log and go on
                self._log_error("worker failure:\n" + traceback.format_exc())
            finally:
                with self._lock:
                    if task == "reload":
                        self._reloading = False
                    self._answering = None

    def _answer(self, job: AskJob) -> None:
        try:
            self._tasks.answer(job)
        except Exception as exc:  # a bug: the caller must still get a response
            self._log_error("answering failed:\n" + traceback.format_exc())
            if not job.done.is_set():
                self.deliver(job, failed(Ask.Response(), f"internal error: {type(exc).__name__}: {exc}",
                                         job.arrival), "asks_failed")

    # -- state and shutdown -------------------------------------------------------------------------
    def counters(self) -> Counters:
        with self._lock:
            return Counters(**self._counts, reloading=int(self._reloading), asks_waiting=len(self._asks),
                            asks_in_progress=int(self._answering is not None))

    def reload_finished(self) -> None:
        """The reload task has its new session in place (the counters stop saying reloading)."""
        with self._lock:
            self._reloading = False

    def stop(self) -> None:
        """Stop the thread (a decode stops before its next token) and fail the waiting questions.

        Idempotent; returns once the thread has ended (unless called from it).
        """
        with self._lock:
            self._stop = True
            waiting = list(self._asks)
            self._asks.clear()
            self._reload = None
            self._lock.notify_all()
        for job in waiting:
            job.response = Ask.Response(success=False, error="node shutting down")
            job.done.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
