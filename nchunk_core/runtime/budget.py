"""Latency-budget mode: each frame's sparsity chosen so the frame's estimated time fits a budget.

    budget = FrameBudget(io_estimate)           # io_estimate(SelectionSettings) -> seconds per chunk
    plan = budget.plan(selection, budget_s=0.3, max_sparsity=0.9, chunks=1)
    ... append with plan.selection ...
    budget.observe(plan, stats.total_s)

The estimated time of a frame appended at sparsity s is chunks x (base + io(s)):

- io(s) is the latency table's estimate of the reads of one chunk (every streamed input once) at
  sparsity s: the selection each input's layer would make on its calibration importance
  (`io_estimator`), summed;
- base is everything else a chunk costs (vision tower, selection, arithmetic, and what the table
  misses of the reads: per-request overhead, a busy drive), measured on the previous frames as
  their time per chunk minus their io estimate; the plan uses a high quantile (QUANTILE) of the
  last HISTORY frames, so that a frame fits the budget as often as the recent ones would have.

The plan takes the lowest sparsity on a grid of STEP (0, 0.05, ... up to max_sparsity) whose
estimate fits. When none does it says the budget is not met and takes the lowest sparsity whose
estimate is within NEAR_FASTEST of the lowest estimate: usually max_sparsity, but where reads are
a small part of the frame (a model whose weights are a few MB) a higher sparsity would cost accuracy
for a gain below the frame-to-frame noise. Before any frame was measured, base is 0.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable

import numpy as np

from nchunk_core.runtime.select import SelectionSettings

STEP = 0.05  # grid of sparsities the plan chooses from
HISTORY = 16  # frames whose base time is remembered
QUANTILE = 0.8  # of the remembered base times, used to plan
NEAR_FASTEST = 0.05  # a budget that cannot be met: estimates this close to the fastest count as fast


@dataclasses.dataclass(frozen=True)
class BudgetPlan:
    """The settings one frame is appended with, and what was expected of them."""

    selection: SelectionSettings  # the frame's settings: the configured ones at the chosen sparsity
    predicted_s: float  # estimated frame time at that sparsity
    met: bool  # the estimate fits the budget
    chunks: int  # chunks the frame appends (1, more when the context is rebuilt or started)
    io_s: float  # the io estimate per chunk at that sparsity


class FrameBudget:
    """Plans frames against a time budget from an io estimate and measured frame times."""

    def __init__(self, io_estimate: Callable[[SelectionSettings], float], history: int = HISTORY,
                 quantile: float = QUANTILE):
        self._io_estimate = io_estimate
        self._base: collections.deque = collections.deque(maxlen=history)  # seconds per chunk
        self._quantile = quantile
        self._met = True  # the last plan's outcome, for logging changes only

    def io(self, selection: SelectionSettings) -> float:
        """Estimated read seconds of one chunk with `selection`."""
        return float(self._io_estimate(selection))

    @property
    def base_s(self) -> float:
        """Seconds per chunk besides the estimated reads, as planned with (0 before any frame)."""
        return float(np.quantile(list(self._base), self._quantile)) if self._base else 0.0

    def candidates(self, selection: SelectionSettings, max_sparsity: float) -> list[SelectionSettings]:
        """`selection` at 0, STEP, 2 STEP, ... up to max_sparsity (included)."""
        n = int(np.floor(max_sparsity / STEP + 1e-9))
        levels = [round(k * STEP, 6) for k in range(n + 1)]
        if levels[-1] < max_sparsity:
            levels.append(max_sparsity)
        return [dataclasses.replace(selection, sparsity=s) for s in levels]

    def plan(self, selection: SelectionSettings, budget_s: float, max_sparsity: float,
             chunks: int = 1) -> BudgetPlan:
        """The lowest sparsity whose estimated frame time fits `budget_s` (see the module docstring)."""
        if selection.method == "dense":  # dense reads every row: there is nothing to choose
            io = self.io(selection)
            predicted = chunks * (self.base_s + io)
            return BudgetPlan(selection, predicted, predicted <= budget_s, chunks, io)
        base = self.base_s
        options = []  # (selection, io estimate), by rising sparsity
        for option in self.candidates(selection, max_sparsity):
            io = self.io(option)
            predicted = chunks * (base + io)
            if predicted <= budget_s:
                return BudgetPlan(option, predicted, True, chunks, io)
            options.append((option, io))
        fastest = min(base + io for _, io in options)
        option, io = next((o, io) for o, io in options if base + io <= fastest * (1.0 + NEAR_FASTEST))
        return BudgetPlan(option, chunks * (base + io), False, chunks, io)

    def plan_frame(self, cfg, chunks: int, log: Callable[[str], None]) -> BudgetPlan:
        """`plan` for a SessionConfig with a frame budget; logs when the budget stops (or starts
        again) being met."""
        plan = self.plan(cfg.selection, cfg.frame_budget_ms / 1e3, cfg.budget_max_sparsity, chunks)
        if plan.met != self._met:
            log(f"frame budget {cfg.frame_budget_ms:g} ms " + (
                "met again" if plan.met else f"cannot be met: estimated {plan.predicted_s * 1e3:.1f} ms at best, at "
                f"sparsity {plan.selection.sparsity:g} (at most budget_max_sparsity "
                f"{cfg.budget_max_sparsity:g})"))
            self._met = plan.met
        return plan

    def observe(self, plan: BudgetPlan, total_s: float) -> None:
        """Record a frame appended with `plan` that took `total_s`."""
        self._base.append(max(0.0, total_s / plan.chunks - plan.io_s))


def io_estimator(flash, store) -> Callable[[SelectionSettings], float]:
    """io(selection) for a FlashVLM: Σ over its inputs of the table's estimate of the rows that
    input would read on its calibration importance (mean |x| per channel over the calibration
    frames, in stored order; equal importance when the store has none), rows in the row cache
    free. Memoised per settings and cache plan."""
    from nchunk_core.runtime.flash_model import per_input_settings
    from nchunk_core.runtime.row_cache import select_cached
    from nchunk_core.store.naming import CALIBRATION_PREFIX

    memo: dict[tuple, float] = {}

    importance: dict[str, np.ndarray] = {}  # input -> float32 [rows] in stored order, read at first use

    def load() -> None:
        names = set(store.resident_names())
        for name, layer in flash.layers.items():
            key = f"{CALIBRATION_PREFIX}{name}/mean_importance"
            if key in names:
                v = store.resident("cpu", [key])[key].float().numpy()  # [rows] original channel order
                importance[name] = v if layer.perm is None else v[layer.perm.cpu().numpy()]
            else:
                importance[name] = np.ones(layer.rows, dtype=np.float32)

    def estimate(selection: SelectionSettings) -> float:
        cached = tuple(layer.workspace.cache.rows(name) for name, layer in flash.layers.items())
        key = (selection, cached)
        if key in memo:
            return memo[key]
        if not importance:
            load()
        per_input = per_input_settings(selection, flash.allocation)
        total = 0.0
        for (name, layer), c in zip(flash.layers.items(), cached):
            s = per_input.get(name, selection)
            total += select_cached(importance[name], s.budget(layer.rows), c, s.method, layer.table,
                                   layer.row_bytes, s.windows).est_latency_s
        memo[key] = total
        return total

    return estimate
