"""Opening a store for a session: the drive's latency table, the reader, the model with flash layers
and the processor. No backbone weight comes into RAM here (beyond the row cache's budget).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from nchunk_core.io.latency import LatencyTable
from nchunk_core.io.reader import Reader
from nchunk_core.runtime.calibrated_mode import describe_calibration
from nchunk_core.runtime.config import SessionConfig
from nchunk_core.runtime.flash_model import FlashVLM, build_flash_model
from nchunk_core.runtime.layers import Workspace
from nchunk_core.runtime.processors import load_processor
from nchunk_core.store import Store
from nchunk_core.store.allocation import load_allocation
from nchunk_core.store.naming import torch_dtype


def load_model(store_path, cfg: SessionConfig, log: Callable[[str], None],
               table: LatencyTable | None = None) -> tuple[Store, Reader, FlashVLM, object]:
    """(store, reader, flash model, processor) of the store at `store_path` with the settings `cfg`.

    `table` replaces the drive's latency table (tests, tools); by default it comes from
    `profile.load_or_profile(store_path, cfg.reader_threads, quick=cfg.profile_quick)` (cached per
    drive). The caller owns the reader (closed here only when building the model fails).
    """
    path = Path(store_path)
    if not path.exists():
        raise FileNotFoundError(f"store {path} does not exist")
    store = Store.open(path)
    allocation = load_allocation(store)
    if allocation is None and cfg.selection.allocation == "layerwise":
        log(f"{store.path} has no sparsity allocation: every matrix drops the same fraction of rows "
            f"(`nchunk calibrate` measures one)")
    if table is None:
        from nchunk_core.io.profile import load_or_profile

        table = load_or_profile(store.path, threads=cfg.reader_threads, quick=cfg.profile_quick, log=log)
    reader = Reader(threads=cfg.reader_threads, profile=table)  # the backend the drive profile found faster
    log(f"reader: {reader.backend}, {reader.threads} reads in flight"
        + (f" (io_uring unavailable: {reader.backend_note})" if reader.backend_note else ""))
    try:
        flash = build_flash_model(store, table, cfg.selection, Workspace(reader, cfg.device, cfg.overlap),
                                  device=cfg.device, dtype=torch_dtype(cfg.dtype), allocation=allocation)
        flash.set_ram_budget(int(cfg.ram_budget_mib * 2**20), cfg.cache_policy)
        processor = load_processor(store.path, flash.arch)
    except BaseException:
        reader.close()
        raise
    log(f"opened {store.path}: {flash.arch}, {len(store.groups)} streamed groups, "
        f"{sum(g.nbytes for g in store.groups.values()) / 2**20:.1f} MiB on the drive; "
        f"{describe_calibration(store.model_info)}")
    return store, reader, flash, processor
