"""The frame mode a store was calibrated in, and a note when a session runs in another one.

The hot–cold row order and the sparsity allocation are measured on frames appended in one frame
mode (`nchunk convert --frame-tokens`); `nchunk convert` records it in the manifest's model
information (`model.calibration.frame_mode`, with `visual_tokens` of the first calibration frame
and the `frame_tokens` setting that chose it). Stores written before that field existed carry only
the setting, or nothing: they open as before, and the note says what is known.
"""
from __future__ import annotations


def calibration_of(model_info: dict) -> dict:
    """The manifest's calibration record ({} for a store converted without calibration)."""
    calibration = model_info.get("calibration") if isinstance(model_info, dict) else None
    return calibration if isinstance(calibration, dict) else {}


def describe_calibration(model_info: dict) -> str:
    """One line for logs and `nchunk verify`: frames, source and frame mode of the calibration."""
    c = calibration_of(model_info)
    if not c:
        return "calibration: none (rows in the checkpoint's order)"
    source = "synthetic frames" if c.get("synthetic") else str(c.get("source") or "unknown frames")
    line = f"calibration: {c.get('frames', '?')} frame(s) from {source}"
    mode = c.get("frame_mode")
    if mode:
        tokens = c.get("visual_tokens")
        line += f", frame mode {mode}" + (f" ({tokens} visual tokens per frame)" if tokens else "")
    else:
        line += f", frame_tokens {c.get('frame_tokens', 'auto')!r} (frame mode not recorded by older nchunk)"
    return line


def frame_mode_note(model_info: dict, adapter) -> str | None:
    """A note when `adapter` encodes frames in another mode (or pixel budget) than the calibration
    did, None when they agree or the store does not say."""
    c = calibration_of(model_info)
    mode = c.get("frame_mode")
    if not mode:
        return None
    budget = c.get("token_budget")
    if (mode, budget) == (adapter.frame_mode, adapter.token_budget):
        return None
    calibrated = mode + (f" at most {budget} tokens" if budget else "")
    running = adapter.frame_mode + (f" at most {adapter.token_budget} tokens" if adapter.token_budget else "")
    return (f"note: frames are encoded in frame mode {running}, the store was calibrated in {calibrated}: "
            f"the row order and sparsity allocation may fit these frames less well (convert again with "
            f"--frame-tokens to match)")
