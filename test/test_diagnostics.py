"""The node's statistics messages: typed statistics in, DiagnosticArray out, counters read back."""
import dataclasses
from fractions import Fraction

import pytest

pytest.importorskip("rclpy", reason="ROS 2 (rclpy) is not installed")

from diagnostic_msgs.msg import DiagnosticStatus  # noqa: E402

from nchunk_core.runtime.config import SessionConfig  # noqa: E402
from nchunk_core.runtime.results import FrameStats  # noqa: E402
from nchunk_core.runtime.select import SelectionSettings  # noqa: E402
from nchunk_ros import diagnostics  # noqa: E402
from nchunk_ros.session_tasks import stamp_seconds, stamp_time  # noqa: E402
from nchunk_ros.worker import Counters  # noqa: E402

STATS = FrameStats(visual_tokens=16, tokens=40, context_tokens=90, rows_read=300, rows_total=600,
                   bytes_read=3 * 2**20, reads=12, est_io_s=0.002, io_s=0.003, select_s=0.001, compute_s=0.01,
                   vision_s=0.02, total_s=0.04, retained=0.8125, frames_in_context=2, rebuilt=False,
                   stamp=Fraction(1001, 2), selection=SelectionSettings(0.25, "magnitude"), max_frames=3)


def test_a_frame_status_reports_what_the_frame_used():
    config = SessionConfig(reader_threads=2, selection=SelectionSettings(0.7, "chunking"), max_frames=8)
    values = diagnostics.frame_values("/cam", STATS, config)
    assert (values["sparsity"], values["method"], values["max_frames"]) == ("0.25", "magnitude", 3)
    assert (values["stamp"], values["reads"], values["context_tokens"]) == ("500.500000", 12, 90)
    assert (values["device"], values["dtype"], values["reader_threads"]) == ("cpu", "float32", 2)
    assert diagnostics.frame_message(STATS).startswith("frame appended: 3.00 MiB in 12 reads, 3.0 ms")


def test_every_status_carries_the_counters_and_they_read_back():
    counters = Counters(frames_received=7, frames_appended=5, asks_busy=1, reloading=1)
    msg = diagnostics.status_array(diagnostics.INTAKE, DiagnosticStatus.OK, diagnostics.intake_message(counters),
                                   {}, counters, frames_in_context=4, hardware_id="/store")
    (status,) = msg.status
    values = diagnostics.values_of(status)
    assert set(diagnostics.COUNTER_KEYS) <= set(values) and values["frames_in_context"] == "4"
    assert diagnostics.counters_from(status) == counters
    assert status.message == "5 frames appended, 0 skipped, 0 malformed" and status.hardware_id == "/store"
    frame = diagnostics.status_array(diagnostics.FRAME, DiagnosticStatus.OK, "", {"frames_in_context": 2},
                                     counters, frames_in_context=4, hardware_id="")
    assert diagnostics.values_of(frame.status[0])["frames_in_context"] == "2"  # the frame's own count wins
    assert dataclasses.asdict(diagnostics.counters_from(DiagnosticStatus())) == dataclasses.asdict(Counters())


def test_stamps_go_through_the_session_exactly():
    from builtin_interfaces.msg import Time

    for sec, nanosec in ((1_700_000_000, 123_456_789), (1000, 0), (0, 1), (2_000_000_000, 999_999_999)):
        t = stamp_time(stamp_seconds(Time(sec=sec, nanosec=nanosec)))
        assert (t.sec, t.nanosec) == (sec, nanosec)
