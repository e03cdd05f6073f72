"""Latency-budget mode: the frame's sparsity is chosen so that the estimated frame time fits.

The io estimate comes from a synthetic latency table with an expensive request (so reading fewer
rows pays), and the measured part is given to the planner, so nothing here depends on the speed
of the machine; the session tests use budgets that are met or missed at any speed.
"""
import dataclasses

import pytest

from nchunk_core.io.latency import LatencyTable
from nchunk_core.runtime.budget import NEAR_FASTEST, FrameBudget, io_estimator
from nchunk_core.runtime.config import SessionConfig
from nchunk_core.runtime.select import SelectionSettings
from nchunk_core.runtime.session import Session
from nchunk_core.testing.tiny_models import make_frame

SLOW_DRIVE = LatencyTable.synthetic(setup_s=2e-3, peak_bytes_per_s=2e6, max_kib=64)  # 2 ms a request, 2 MB/s


@pytest.fixture(scope="module")
def estimator(tiny_stores):
    """io(selection) of the tiny SmolVLM store on the slow synthetic drive."""
    with Session.open(tiny_stores["smolvlm"], SessionConfig(), table=SLOW_DRIVE) as session:
        yield io_estimator(session._flash, session.store)


def test_io_estimate_falls_with_sparsity(estimator):
    io = [estimator(SelectionSettings(s, "chunking")) for s in (0.0, 0.3, 0.6, 0.9)]
    assert io[0] > io[1] > io[2] > io[3] > 0


def test_a_smaller_budget_gets_a_higher_sparsity(estimator):
    budget = FrameBudget(estimator)
    plan = budget.plan(SelectionSettings(0.0, "chunking"), budget_s=1.0, max_sparsity=0.9)
    budget.observe(plan, total_s=plan.io_s + 0.010)  # 10 ms besides the reads
    assert budget.base_s == pytest.approx(0.010)
    dense_s = 0.010 + budget.io(SelectionSettings(0.0, "chunking"))
    fastest_s = 0.010 + budget.io(SelectionSettings(0.9, "chunking"))
    chosen = []
    for fraction in (1.5, 1.01, 0.8, 0.6, 0.4):
        budget_s = fastest_s + fraction * (dense_s - fastest_s)
        plan = budget.plan(SelectionSettings(0.2, "chunking"), budget_s, max_sparsity=0.9)
        assert plan.met and plan.predicted_s <= budget_s
        assert plan.selection.method == "chunking" and plan.selection.windows is None
        chosen.append(plan.selection.sparsity)
    assert chosen[0] == chosen[1] == 0.0  # the configured 0.2 is not a floor: accuracy first
    assert chosen[1] < chosen[2] < chosen[3] < chosen[4] <= 0.9
    # lower than the cheapest estimate: the highest allowed sparsity, and not met
    plan = budget.plan(SelectionSettings(0.0, "chunking"), fastest_s * 0.5, max_sparsity=0.7)
    assert not plan.met and plan.selection.sparsity == 0.7
    # a rebuild appends several chunks: the same budget needs a higher sparsity
    one = budget.plan(SelectionSettings(0.0, "chunking"), 2.5 * dense_s, 0.9, chunks=1)
    three = budget.plan(SelectionSettings(0.0, "chunking"), 2.5 * dense_s, 0.9, chunks=3)
    assert one.selection.sparsity == 0.0 < three.selection.sparsity


def test_a_budget_out_of_reach_costs_no_accuracy_for_a_gain_below_the_noise(estimator):
    budget = FrameBudget(estimator)
    plan = budget.plan(SelectionSettings(0.0, "chunking"), budget_s=1e-9, max_sparsity=0.9)
    assert not plan.met and plan.selection.sparsity == 0.9  # reads are all of the frame: the fastest
    io_dense, io_fastest = budget.io(SelectionSettings(0.0, "chunking")), budget.io(SelectionSettings(0.9, "chunking"))
    # a frame whose reads are a small part: besides them it takes 100x what reading every row takes
    budget.observe(plan, total_s=plan.io_s + 100 * io_dense)
    plan = budget.plan(SelectionSettings(0.0, "chunking"), budget_s=1e-9, max_sparsity=0.9)
    assert not plan.met and plan.selection.sparsity == 0.0  # 0.9 would gain under 1 %
    assert plan.predicted_s <= (budget.base_s + io_fastest) * (1 + NEAR_FASTEST)
    # where 0.9 gains more than NEAR_FASTEST, the plan takes the lowest sparsity that is that fast
    budget = FrameBudget(estimator)
    budget.observe(plan, total_s=plan.io_s + 2 * io_dense)
    plan = budget.plan(SelectionSettings(0.0, "chunking"), budget_s=1e-9, max_sparsity=0.9)
    fastest_s = budget.base_s + io_fastest
    assert 0.0 < plan.selection.sparsity <= 0.9 and plan.predicted_s <= fastest_s * (1 + NEAR_FASTEST)
    lower = dataclasses.replace(plan.selection, sparsity=round(plan.selection.sparsity - 0.05, 6))
    assert budget.base_s + budget.io(lower) > fastest_s * (1 + NEAR_FASTEST)


def test_planning_uses_a_high_quantile_of_recent_frames(estimator):
    budget = FrameBudget(estimator, history=4, quantile=0.75)
    plan = budget.plan(SelectionSettings(0.0, "chunking"), 10.0, 0.9)
    for extra in (0.001, 0.001, 0.001, 0.101):  # one slow frame among four
        budget.observe(plan, plan.io_s + extra)
    assert 0.001 < budget.base_s <= 0.101
    for _ in range(4):  # it is forgotten after `history` frames
        budget.observe(plan, plan.io_s + 0.002)
    assert budget.base_s == pytest.approx(0.002)


@pytest.mark.parametrize("field, value", [("frame_budget_ms", -1.0), ("frame_budget_ms", float("nan")),
                                          ("frame_budget_ms", "300"), ("frame_budget_ms", True),
                                          ("budget_max_sparsity", 1.0), ("budget_max_sparsity", -0.1)])
def test_budget_settings_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        SessionConfig(**{field: value})


def test_session_reports_the_sparsity_the_budget_chose(tiny_stores):
    notes = []
    cfg = SessionConfig(selection=SelectionSettings(0.3, "chunking"), frame_budget_ms=1e-3, budget_max_sparsity=0.8)
    with Session.open(tiny_stores["smolvlm"], cfg, log=notes.append, table=SLOW_DRIVE) as session:
        missed = [session.append_frame(make_frame(seed=s)) for s in (1, 2)]
        session.update(frame_budget_ms=1e9)  # met at any speed: the lowest sparsity
        met = session.append_frame(make_frame(seed=3))
        answer = session.ask("what?", max_new_tokens=1)  # questions keep the configured sparsity
        question_rows = [c.rows / c.rows_total for c in session._flash.stats]
        session.update(frame_budget_ms=0.0)
        off = session.append_frame(make_frame(seed=4))
        with pytest.raises(ValueError, match="frame_budget_ms"):
            session.update(frame_budget_ms=-5.0)
    for s in missed:
        assert s.budget_met is False and s.frame_budget_ms == 1e-3 and s.selection.sparsity == 0.8
        assert s.rows_read < 0.3 * s.rows_total and s.predicted_s > 1e-6
    assert sum("cannot be met" in n for n in notes) == 1  # said once, not at every frame
    assert met.budget_met is True and met.selection.sparsity == 0.0 and met.rows_read == met.rows_total
    assert any("met again" in n for n in notes)
    assert answer.bytes_read > 0 and all(f == pytest.approx(0.7, abs=0.02) for f in question_rows)
    assert off.budget_met is None and off.frame_budget_ms == 0.0
    assert off.selection == dataclasses.replace(cfg.selection) and off.predicted_s == 0.0
