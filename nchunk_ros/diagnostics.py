"""The VQA node's statistics as diagnostic_msgs/DiagnosticArray, on ~/statistics.

The one place where typed statistics (the session's FrameStats, the worker's Counters) become
messages; until here they travel as dataclasses. Each message holds one DiagnosticStatus, named:

- FRAME ("vqa_node: frame"), after every frame appended: the frame's FrameStats (bytes read, reads,
  I/O, selection, vision and compute seconds, rows read, retained importance, tokens, the frame mode
  and its visual tokens, frames in context, rebuilt), the selection settings and max_frames it was
  appended with, the session's device, dtype and reader_threads, its topic and stamp; ERROR with
  the reason when an append failed.
- INTAKE ("vqa_node: intake"), once a second; key "silent_topics" lists (comma-separated) the camera
  topics with publishers but no frame for camera_transport.SILENCE_S seconds, key "shared_topics" the
  camera topics with more than one publisher, and the level is WARN while either has any.
- RELOAD ("vqa_node: reload"), after a model reload: OK, or ERROR with the reason; key "changes".

Every status also carries the counters (one key per field of worker.Counters) and frames_in_context.
Another process reads them back with `counters_from` (nchunk soak does).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

from nchunk_ros.worker import Counters

if TYPE_CHECKING:  # the runtime (torch) is not needed to read or write these messages
    from nchunk_core.runtime.config import SessionConfig
    from nchunk_core.runtime.results import FrameStats

FRAME = "vqa_node: frame"
INTAKE = "vqa_node: intake"
RELOAD = "vqa_node: reload"
COUNTER_KEYS = tuple(f.name for f in dataclasses.fields(Counters))


def frame_values(topic: str, stats: FrameStats, config: SessionConfig) -> dict:
    """The key/values of a FRAME status for `stats`, appended by a session with `config`."""
    return {
        "topic": topic, "stamp": "" if stats.stamp is None else f"{float(stats.stamp):.6f}",
        "bytes_read": stats.bytes_read, "reads": stats.reads, "io_s": f"{stats.io_s:.6f}",
        "est_io_s": f"{stats.est_io_s:.6f}", "select_s": f"{stats.select_s:.6f}",
        "vision_s": f"{stats.vision_s:.6f}", "compute_s": f"{stats.compute_s:.6f}",
        "total_s": f"{stats.total_s:.6f}", "rows_read": stats.rows_read, "rows_total": stats.rows_total,
        "retained": f"{stats.retained:.4f}", "visual_tokens": stats.visual_tokens, "frame_mode": stats.frame_mode,
        "tokens": stats.tokens, "context_tokens": stats.context_tokens, "frames_in_context": stats.frames_in_context,
        "rebuilt": stats.rebuilt, "sparsity": f"{stats.selection.sparsity:g}", "method": stats.selection.method,
        "allocation": stats.selection.allocation, "frame_budget_ms": f"{stats.frame_budget_ms:g}",
        "budget_met": "" if stats.budget_met is None else stats.budget_met,
        "max_frames": stats.max_frames, "device": config.device, "dtype": config.dtype,
        "reader_threads": config.reader_threads,
    }


def frame_message(stats: FrameStats) -> str:
    """The human-readable line of a FRAME status."""
    mib_s = stats.bytes_read / stats.io_s / 2**20 if stats.io_s > 0 else 0.0
    return (f"frame appended: {stats.bytes_read / 2**20:.2f} MiB in {stats.reads} reads, {stats.io_s * 1e3:.1f} "
            f"ms ({mib_s:.0f} MiB/s), {stats.frames_in_context} frames in context")


def intake_message(counters: Counters, silent_topics=(), shared_topics=()) -> str:
    """The human-readable line of an INTAKE status; `silent_topics`: topics with publishers but no frames;
    `shared_topics`: topics with more than one publisher."""
    silent = f"; publishers but no frames on {', '.join(silent_topics)}" if silent_topics else ""
    shared = f"; more than one publisher on {', '.join(shared_topics)}" if shared_topics else ""
    return (f"{counters.frames_appended} frames appended, {counters.frames_skipped} skipped, "
            f"{counters.frames_malformed} malformed{silent}{shared}")


def status_array(name: str, level: bytes, message: str, values: dict, counters: Counters,
                 frames_in_context: int, hardware_id: str) -> DiagnosticArray:
    """One status `name` with `values`, the counters and frames_in_context (unless `values` has it).
    The caller stamps the header."""
    values = {**values, **dataclasses.asdict(counters)}
    values.setdefault("frames_in_context", frames_in_context)
    status = DiagnosticStatus(level=level, name=name, message=message, hardware_id=hardware_id,
                              values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])
    return DiagnosticArray(status=[status])


def values_of(status: DiagnosticStatus) -> dict[str, str]:
    """A status's key/values as a dict of strings."""
    return {kv.key: kv.value for kv in status.values}


def counters_from(status: DiagnosticStatus) -> Counters:
    """The counters a status of this node carries."""
    values = values_of(status)
    return Counters(**{k: int(values[k]) for k in COUNTER_KEYS if k in values})
