"""The VQA node's worker without DDS: the order it serves reloads, questions and frames in, the
one-slot mailbox, the bounded queue, deadlines while waiting, and stopping.

The worker runs its real thread; its tasks are recorded by `Tasks` (frames go into a count of
frames in context, questions are answered with their own text), and a gate holds the task being
run, so that what waits meanwhile is known exactly: every check is on order and outcome.
"""
import threading
import time

import pytest

pytest.importorskip("nchunk_interfaces", reason="the nchunk_interfaces package is not built")

from nchunk_interfaces.srv import Ask  # noqa: E402
from nchunk_ros.worker import AskJob, Counters, Frame, Worker  # noqa: E402

WAIT_S = 20.0  # only reached when something is wrong


def wait_for(condition, what):
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.005)


class Tasks:
    """The worker's tasks, recorded in the order it runs them."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.done = []  # (kind, name)
        self.running = []  # (kind, name) of every task started
        self.in_context = 0
        self.gate = threading.Event()  # a task waits here until the test opens it
        self.gate.set()

    def frames_in_context(self) -> int:
        return self.in_context

    def _run(self, kind, name):
        self.running.append((kind, name))
        assert self.gate.wait(WAIT_S)
        self.done.append((kind, name))

    def append(self, frame: Frame) -> None:
        self._run("frame", frame.topic)
        if frame.topic != "broken":  # a frame the model refuses stays out of the context
            self.in_context += 1

    def answer(self, job: AskJob) -> None:
        self._run("ask", job.request.question)
        self.worker.deliver(job, Ask.Response(success=True, answer=job.request.question), "asks_answered")

    def reload(self, values: dict) -> None:
        self._run("reload", values["name"])


@pytest.fixture
def worker():
    w = Worker(log_error=lambda text: pytest.fail(text), max_waiting=2)
    tasks = Tasks(w)
    w.start(tasks)
    yield w, tasks
    tasks.gate.set()
    w.stop()


def busy_with(worker, tasks, topic="first"):
    """Close the gate and hand the worker a frame: it is then busy with it until the gate opens."""
    tasks.gate.clear()
    started = len(tasks.running)
    worker.offer_frame(Frame(None, 0, topic))
    wait_for(lambda: len(tasks.running) > started, "the worker to take the frame")


def ask_in_thread(worker, question, timeout=WAIT_S):
    """worker.ask from another thread (it blocks, as an /ask callback does); [response] once it returns."""
    arrival = time.monotonic()
    out = []
    thread = threading.Thread(target=lambda: out.append(worker.ask(AskJob(Ask.Request(question=question), arrival,
                                                                           arrival + timeout, timeout))))
    thread.start()
    return out, thread


def test_reload_then_questions_in_arrival_order_then_the_newest_frame(worker):
    w, tasks = worker
    busy_with(w, tasks)
    w.offer_frame(Frame(None, 1, "older"))
    first, t1 = ask_in_thread(w, "Q1")
    wait_for(lambda: w.counters().asks_waiting == 1, "Q1 in the queue")
    second, t2 = ask_in_thread(w, "Q2")
    wait_for(lambda: w.counters().asks_waiting == 2, "Q2 in the queue")
    w.request_reload({"name": "new model"})
    w.offer_frame(Frame(None, 2, "newest"))  # replaces the older one, which is skipped
    assert w.counters().frames_skipped == 1 and w.counters().asks_in_progress == 0
    tasks.gate.set()
    t1.join(WAIT_S), t2.join(WAIT_S)
    wait_for(lambda: len(tasks.done) == 5, "every task")
    assert tasks.done == [("frame", "first"), ("reload", "new model"), ("ask", "Q1"), ("ask", "Q2"),
                          ("frame", "newest")]
    assert first[0].success and first[0].answer == "Q1" and second[0].answer == "Q2"
    counters = w.counters()
    assert (counters.asks_answered, counters.asks_waiting, counters.reloading) == (2, 0, 0)


def test_a_question_without_a_frame_in_context_takes_the_waiting_frame_at_once(worker):
    w, tasks = worker
    w.set_append_rate(0.001)  # one frame per 1000 s
    w.offer_frame(Frame(None, 0, "broken"))  # appended (the rate allows a first one) but refused by the model
    wait_for(lambda: tasks.done == [("frame", "broken")], "the first frame")
    w.offer_frame(Frame(None, 1, "good"))  # waits for the rate limit...
    answer, thread = ask_in_thread(w, "Q")  # ... unless a question needs a frame in context
    thread.join(WAIT_S)
    assert tasks.done == [("frame", "broken"), ("frame", "good"), ("ask", "Q")] and answer[0].success

    w.offer_frame(Frame(None, 2, "later"))  # a frame is in context: this one waits for the rate limit
    answer, thread = ask_in_thread(w, "Q again")
    thread.join(WAIT_S)
    assert tasks.done[-1] == ("ask", "Q again") and ("frame", "later") not in tasks.done
    w.set_append_rate(0.0)  # no limit: the waiting frame goes now
    wait_for(lambda: tasks.done[-1] == ("frame", "later"), "the frame after the rate change")


def test_queue_is_bounded_and_deadlines_pass_while_waiting(worker):
    w, tasks = worker
    busy_with(w, tasks)
    kept = [ask_in_thread(w, f"Q{i}") for i in range(2)]
    wait_for(lambda: w.counters().asks_waiting == 2, "two questions waiting")
    busy = w.ask(AskJob(Ask.Request(question="one more"), time.monotonic(), time.monotonic() + WAIT_S, WAIT_S))
    assert not busy.success and busy.error == "busy: 2 questions are already waiting; try again later"

    tasks.gate.set()
    for _, thread in kept:
        thread.join(WAIT_S)
    busy_with(w, tasks, "second")
    late, thread = ask_in_thread(w, "late", timeout=0.05)  # the worker stays busy past this deadline
    thread.join(WAIT_S)
    assert not late[0].success and late[0].error == "timed out" and late[0].answer == ""
    assert late[0].queue_s > 0 and late[0].total_s >= late[0].queue_s
    assert w.counters().asks_waiting == 0  # it left the queue at its deadline
    tasks.gate.set()
    wait_for(lambda: tasks.done[-1] == ("frame", "second"), "the frame")
    assert ("ask", "late") not in tasks.running
    counters = w.counters()
    assert (counters.asks_busy, counters.asks_timed_out, counters.asks_answered) == (1, 1, 2)


def test_a_reload_holds_questions_up_and_can_be_cancelled(worker):
    w, tasks = worker
    busy_with(w, tasks)
    w.request_reload({"name": "cancelled"})
    w.request_reload(None)  # set back before the worker got to it
    tasks.gate.set()
    wait_for(lambda: tasks.done == [("frame", "first")], "the frame")

    tasks.gate.clear()
    w.request_reload({"name": "slow"})
    wait_for(lambda: tasks.running[-1] == ("reload", "slow"), "the reload to start")
    assert w.counters().reloading == 1
    late, thread = ask_in_thread(w, "during the reload", timeout=0.05)
    thread.join(WAIT_S)
    assert late[0].error == "reloading the model; timed out after 0.05 s"
    tasks.gate.set()
    wait_for(lambda: w.counters().reloading == 0, "the reload to end")
    assert [name for kind, name in tasks.done if kind == "reload"] == ["slow"]


def test_stop_fails_waiting_questions_and_ends_the_thread(worker):
    w, tasks = worker
    busy_with(w, tasks)
    waiting, thread = ask_in_thread(w, "Q")
    wait_for(lambda: w.counters().asks_waiting == 1, "the question in the queue")
    stopping = threading.Thread(target=w.stop)  # it waits for the task being run
    stopping.start()
    thread.join(WAIT_S)  # the waiting question is answered at once
    assert not waiting[0].success and waiting[0].error == "node shutting down"
    assert stopping.is_alive() and w.stopping
    tasks.gate.set()
    stopping.join(WAIT_S)
    assert not stopping.is_alive() and tasks.done == [("frame", "first")]  # the question never ran


def test_counters_are_a_typed_snapshot(worker):
    w, _ = worker
    assert w.counters() == Counters()
    assert w.count("frames_received") == 1 and w.count("frames_received") == 2
    assert w.counters().frames_received == 2
    with pytest.raises(KeyError):
        w.count("asks_waiting")  # measured, not counted


def test_cancel_takes_a_waiting_question_out_and_stops_one_being_answered(worker):
    w, tasks = worker
    busy_with(w, tasks)
    arrival = time.monotonic()
    waiting = AskJob(Ask.Request(question="waiting"), arrival, arrival + WAIT_S, WAIT_S)
    out = []
    thread = threading.Thread(target=lambda: out.append(w.ask(waiting)))
    thread.start()
    wait_for(lambda: w.counters().asks_waiting == 1, "the question in the queue")
    w.cancel(waiting)
    thread.join(WAIT_S)
    assert not out[0].success and out[0].error == "canceled"  # at once, while the frame still runs
    assert w.counters().asks_waiting == 0 and w.counters().asks_canceled == 1

    early = AskJob(Ask.Request(question="early"), arrival, arrival + WAIT_S, WAIT_S)
    w.cancel(early)  # canceled before it was queued
    assert w.ask(early).error == "canceled" and w.counters().asks_canceled == 2

    answering = AskJob(Ask.Request(question="answering"), arrival, arrival + WAIT_S, WAIT_S)
    assert not w.decoding(answering)  # asked before each token: go on
    w.cancel(answering)
    assert w.decoding(answering)  # stop before the next token
    tasks.gate.set()
    wait_for(lambda: tasks.done == [("frame", "first")], "the frame")
    assert [name for kind, name in tasks.done if kind == "ask"] == []  # the canceled ones never ran
