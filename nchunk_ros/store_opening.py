"""Opening the VQA node's store, at start-up and for every model reload.

`open_session(node, values, settings, stopping)` opens the store named by the parameter values,
checks it before anything slow, loads or measures the drive profile (progress in the node's log),
builds the Session and returns it. Parameters the user did not set take the store's recommended
values (store_settings.py), which become the node's parameters once the session is open. Every
failure is a StartupError with a one-line reason (the node exits with it at start-up; a reload
keeps the running model). A stop requested meanwhile (the context going down, or `stopping()`)
raises ExternalShutdownException and leaves nothing open.
"""
from __future__ import annotations

from typing import Callable

from rclpy.executors import ExternalShutdownException

from nchunk_ros.parameters import selection_from, store_directory
from nchunk_ros.session_tasks import StartupError


def open_session(node, v: dict, settings, stopping: Callable[[], bool]):
    """A Session opened with the parameter values `v` for `node` (an rclpy Node: its logger and
    context), except that the parameters the user did not set take the store's values (`settings`,
    a StoreSettings), which become the node's once it is open; StartupError with the one-line reason."""
    log = node.get_logger()
    path = store_directory(v["store_path"])
    if not v["store_path"]:
        log.info(f"store_path is empty: the built-in demo model ({path}); set store_path to use your own store")
    if not path.is_dir():
        raise StartupError(f"store {path} does not exist (store_path)")

    from nchunk_core.io.profile import load_or_profile  # torch comes with these: imported when needed
    from nchunk_core.runtime.session import Session, SessionConfig
    from nchunk_core.store import Store, StoreError

    try:
        recommended = Store.open(path).recommended  # fail fast, before profiling the drive
    except (StoreError, OSError) as exc:
        raise StartupError(f"cannot open store {path}: {exc}") from exc
    from_store = settings.values_for(recommended)
    v = {**v, **from_store}
    try:
        cfg = SessionConfig(device=v["device"], dtype=v["dtype"], selection=selection_from(v),
                            reader_threads=v["reader_threads"], max_frames=v["max_frames"],
                            ram_budget_mib=v["ram_budget_mib"], cache_policy=v["cache_policy"],
                            frame_budget_ms=v["frame_budget_ms"],
                            max_new_tokens=v["max_new_tokens"], frame_tokens=v["frame_tokens"],
                            decoding=v["decoding"], profile_quick=True)
    except ValueError as exc:
        raise StartupError(f"invalid configuration: {exc}") from exc
    shown = [-1]

    def progress(fraction: float, message: str) -> None:
        if not node.context.ok() or stopping():  # the scratch file goes too
            raise ExternalShutdownException()
        decile = int(fraction * 10)
        if decile > shown[0]:
            shown[0] = decile
            log.info(f"drive profile {fraction:4.0%}: {message}")

    try:
        table = load_or_profile(path, threads=v["reader_threads"], quick=True, progress=progress, log=log.info)
    except OSError as exc:
        raise StartupError(f"cannot profile the drive holding {path}: {exc}") from exc
    log.info(f"drive: saturation {table.saturation_bytes // 1024} KiB, peak "
             f"{table.peak_bytes_per_s / 1e6:.0f} MB/s")
    try:
        session = Session.open(path, cfg, log=log.info, table=table)
    except (StoreError, OSError, ValueError, RuntimeError) as exc:
        raise StartupError(f"cannot load the model from {path}: {exc}") from exc
    if not node.context.ok() or stopping():  # a signal arrived while the model was being built
        session.close()
        raise ExternalShutdownException()
    log.info(settings.describe(recommended, from_store, v))
    result = settings.adopt(node, from_store)  # `ros2 param get` shows the values in effect
    if not result.successful:
        log.error(f"the store's settings could not be set as parameters: {result.reason}")
    log.info(f"model ready on {v['device']} ({v['dtype']}): {v['method']} at sparsity {v['sparsity']:g}, "
             f"max_frames {v['max_frames']}, max_new_tokens {v['max_new_tokens']}")
    return session
