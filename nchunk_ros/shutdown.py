"""Spinning the VQA node until it is asked to stop, and stopping it cleanly and promptly.

`spin` is the executor's spin loop as the node needs it (also used by tests and the demo).

SIGINT and SIGTERM in the vqa_node program (`StopSignals`, `stop_while_spinning`):

rclpy's own handlers shut the ROS context down the moment a signal arrives, after which nothing can
be answered any more. The program starts rclpy without them (SignalHandlerOptions.NO) and installs
these instead:

- during start-up a signal raises KeyboardInterrupt in the main thread (as Python's default does
  for SIGINT), which ends the program with status 0;
- once the node runs, a signal only sets `requested`: the spin loop sees it within a moment, the
  node stops its worker while the executor still spins (a frame append or an answer stops at its
  next layer boundary, callers still waiting get "node shutting down"), and only then is ROS shut
  down;
- a second signal while stopping raises KeyboardInterrupt, as during start-up.
"""
from __future__ import annotations

import signal
import threading
import time

from rclpy.exceptions import InvalidHandle

SIGNALS = (signal.SIGINT, signal.SIGTERM)
SPIN_SLICE_S = 0.1  # a spin loop with `until` asks it at least this often
SHUTDOWN_GRACE_S = 0.5  # spinning on after the worker stopped: the last responses and results go out


class StopSignals:
    """The program's SIGINT / SIGTERM handlers (module docstring). Main thread only."""

    def __init__(self):
        self.requested = threading.Event()
        self._running = False
        self._previous = {}

    def install(self) -> None:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def node_running(self) -> None:
        """From now on a signal asks for a stop instead of interrupting."""
        self._running = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if not self._running or self.requested.is_set():
            raise KeyboardInterrupt
        self.requested.set()


def spin(executor, until=None) -> None:
    """`executor.spin()`, surviving rclpy's race after a subscription is destroyed at run time; with
    `until`, it returns once until() is true (asked every SPIN_SLICE_S).

    When the camera topics or their reliability change, the node destroys its subscriptions while
    the executor may still be waiting on them; rclpy can then raise InvalidHandle ("destruction was
    requested") out of spin_once (ros2/rclpy#1206), which would end spinning for the whole node.
    That one error is harmless here: the next spin_once builds its wait set from the live entities.
    """
    while executor.context.ok() and not executor._is_shutdown and not (until is not None and until()):
        try:
            executor.spin_once(timeout_sec=None if until is None else SPIN_SLICE_S)
        except InvalidHandle:
            continue


def stop_while_spinning(node, executor) -> None:
    """Stop `node` while `executor` spins on, so that the callers still waiting get their responses
    ("node shutting down") and action results, then spin SHUTDOWN_GRACE_S more for the last of them."""
    stopper = threading.Thread(target=node.stop, name="vqa-stop", daemon=True)
    stopper.start()
    spin(executor, until=lambda: not stopper.is_alive())
    grace = time.monotonic() + SHUTDOWN_GRACE_S
    spin(executor, until=lambda: time.monotonic() > grace)
    stopper.join()
