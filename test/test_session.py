"""The session: exact at sparsity 0 against the dense model in RAM, sparse when asked, bounded context,
clear errors for bad frames, questions, settings and stores.

Reference: the Hugging Face model loaded from the same checkpoint, appending the same chunks through
frame_append (proven equal to one-shot in test_tiny_models.py). Logits are compared at every forward
(prompt prefix, each frame, the question, each generated token) through a hook on the LM head.
"""
import json
import shutil
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from nchunk_core import cli
from nchunk_core.convert.converter import convert
from nchunk_core.runtime.cancel import Cancelled
from nchunk_core.runtime.flash_model import ProjectionView
from nchunk_core.runtime.adapters import adapter_for
from nchunk_core.runtime.decoding import greedy_decode
from nchunk_core.io.latency import LatencyTable
from nchunk_core.runtime.select import ChunkParams, SelectionSettings
from nchunk_core.runtime.session import Answer, FrameStats, Session, SessionConfig
from nchunk_core.store import Store, StoreError
from nchunk_core.testing.tiny_models import ARCHS, load_tiny_vlm, make_frame

QUESTION = "What is in the box?"
NEW_TOKENS = 5
TABLE = LatencyTable.synthetic()
# case -> (checkpoint arch, store (conftest.tiny_stores), session options)
CASES = {
    "llava_onevision": ("llava_onevision", "llava_onevision", {}),
    "llava_onevision-video": ("llava_onevision", "llava_onevision", {"frame_tokens": "video"}),
    "qwen2_5_vl": ("qwen2_5_vl", "qwen2_5_vl", {}),
    "qwen2_5_vl-unbundled": ("qwen2_5_vl", "qwen2_5_vl-unbundled", {}),
    "smolvlm": ("smolvlm", "smolvlm", {}),
}


@pytest.fixture(scope="module")
def built(tiny_checkpoints, tiny_stores):
    """arch -> (checkpoint dir, model in RAM, processor); case -> store converted with calibration."""
    models = {arch: tiny_checkpoints[arch] for arch in ARCHS}
    loaded = {arch: load_tiny_vlm(path) for arch, path in models.items()}
    stores = {case: tiny_stores[store] for case, (_, store, _) in CASES.items()}
    return models, loaded, stores


def open_session(built, case, sparsity=0.0, method="chunking", **cfg):
    """A session on the case's store, with SelectionSettings(sparsity, method) and `cfg`."""
    session_opts = CASES[case][2]
    selection = SelectionSettings(sparsity, method)
    return Session.open(built[2][case], SessionConfig(**{**session_opts, "selection": selection, **cfg}), table=TABLE)


def record_logits(model):
    """Logits of the last token of every forward of `model`, in order."""
    seen = []
    model.lm_head.register_forward_hook(lambda m, args, out: seen.append(out[0, -1].detach().float().clone()))
    return seen


def dense_reference(built, case, frame_seeds, stop_ids, n_new=NEW_TOKENS):
    """(logits of every forward, greedy tokens) of the dense model appending the same chunks."""
    arch, _, session_opts = CASES[case]
    model, processor = built[1][arch]
    adapter = adapter_for(model, processor, **session_opts)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(out[0, -1].float().clone()))
    try:
        chunks = [adapter.encode_text(adapter.prompt_prefix)]
        chunks += [adapter.encode_frame(make_frame(seed=s)) for s in frame_seeds]
        chunks.append(adapter.encode_question(QUESTION))
        cache, pos = DynamicCache(), 0
        for c in chunks:
            logits, pos = adapter.append(c, cache, pos)
        tokens, _ = greedy_decode(adapter, logits, cache, pos, n_new, stop_ids)
    finally:
        hook.remove()
    return seen, tokens


@pytest.mark.parametrize("case", list(CASES))
def test_sparsity_zero_matches_dense_model(built, case):
    session = open_session(built, case, sparsity=0.0, method="chunking", max_new_tokens=NEW_TOKENS)
    seen = record_logits(session.model)
    stats = [session.append_frame(make_frame(seed=s), stamp=float(s)) for s in (1, 2)]
    answer = session.ask(QUESTION)
    ref, ref_tokens = dense_reference(built, case, (1, 2), session.stop_ids)

    assert len(seen) == len(ref) == 4 + len(ref_tokens) - 1
    diff = max((a - b).abs().max().item() for a, b in zip(seen, ref))
    print(f"{case}: max |Δlogit| {diff:.2e} over {len(seen)} forwards")
    assert diff <= 1e-4
    assert answer.token_ids == ref_tokens
    assert isinstance(answer, Answer) and len(ref_tokens) <= NEW_TOKENS
    assert answer.tokens_generated == len([t for t in ref_tokens if t not in session.stop_ids])
    assert answer.frames_in_context == 2 and answer.newest_stamp == 2.0
    assert answer.bytes_read > 0 and answer.prefill_s > 0 and answer.retained == pytest.approx(1.0)
    for s in stats:
        assert isinstance(s, FrameStats) and not s.rebuilt and s.visual_tokens > 0
        assert s.rows_read == s.rows_total > 0 and s.retained == pytest.approx(1.0)
        assert s.total_s >= s.vision_s + s.io_s + s.select_s - 1e-6 and s.compute_s >= 0
    assert stats[1].bytes_read == sum(g.nbytes for g in session.store.groups.values())
    assert stats[1].reads == len(session.store.inputs())  # every row: one run per input
    # the question left no trace: the same question gets the same answer from the same context
    again = session.ask(QUESTION)
    assert again.token_ids == answer.token_ids
    session.close()


@pytest.mark.parametrize("case", ["qwen2_5_vl", "qwen2_5_vl-unbundled", "smolvlm"])
def test_sparse_projections_read_fewer_rows_and_compute_exactly_on_them(built, case):
    """At 50 %, every projection equals x[S] · W[:, S]ᵀ (+ b) over its selected channels S, and
    bytes read halve. (The tiny random models have no heavy-tailed activations, so dropping half the
    channels changes their logits a lot; closeness on a real model is a benchmark question.)"""
    arch = CASES[case][0]
    reference = built[1][arch][0]
    session = open_session(built, case, sparsity=0.5, method="magnitude")
    checked = []

    def check(name):
        def hook(view, args, y):
            x = args[0]
            flash = view._shared.flash
            xs = x.reshape(-1, flash.rows)
            xs = xs if flash.perm is None else xs[:, flash.perm]
            rows = torch.as_tensor(flash.select(xs).row_indices())
            keep = rows if flash.perm is None else flash.perm[rows]  # original channels read
            lin = reference.get_submodule(name)
            want = x[..., keep] @ lin.weight[:, keep].T + (0 if lin.bias is None else lin.bias)
            torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
            checked.append(name)
        return hook

    for name, module in session.model.named_modules():
        if isinstance(module, ProjectionView):
            module.register_forward_hook(check(name))
    seen = record_logits(session.model)
    sparse = [session.append_frame(make_frame(seed=s)) for s in (1, 2)]
    answer = session.ask(QUESTION, max_new_tokens=2)
    assert len(checked) == 7 * 2 * (4 + len(answer.token_ids) - 1)
    total = sum(g.nbytes for g in session.store.groups.values())
    assert sparse[1].bytes_read == pytest.approx(total / 2, rel=0.03)
    assert sparse[1].rows_read == pytest.approx(sparse[1].rows_total / 2, rel=0.03)
    assert 0.5 < sparse[1].retained < 1.0 and sparse[1].reads > len(session.store.inputs())
    assert all(torch.isfinite(s).all() for s in seen)

    session.update(SelectionSettings(0.25, "chunking"))  # applied at the next call
    assert session.config.selection.sparsity == 0.25
    stats = session.append_frame(make_frame(seed=3))
    assert stats.selection == SelectionSettings(0.25, "chunking") and sparse[1].selection.method == "magnitude"
    assert stats.bytes_read == pytest.approx(0.75 * total, rel=0.03) and 0.75 < stats.retained < 1.0
    session.close()


def test_logits_drift_grows_with_sparsity(built):
    """Bounded and ordered: the frame's logits move away from dense as sparsity grows, never blow up."""
    drift = []
    for sparsity in (0.0, 0.02, 0.5):
        session = open_session(built, "llava_onevision", sparsity=sparsity, method="chunking")
        seen = record_logits(session.model)
        session.append_frame(make_frame(seed=1))
        drift.append(seen[-1])
        session.close()
    dense = drift[0]
    err = [((d - dense).norm() / dense.norm()).item() for d in drift[1:]]
    assert 0 < err[0] < err[1] < 2.0, err


def test_bounded_context_rebuilds_from_recent_frames(built):
    session = open_session(built, "smolvlm", max_frames=3)
    seen = record_logits(session.model)
    in_context, rebuilt, lengths = [], [], []
    for seed in range(1, 10):
        s = session.append_frame(make_frame(seed=seed), stamp=seed)
        in_context.append(s.frames_in_context)
        rebuilt.append(s.rebuilt)
        lengths.append(session._cache.get_seq_length())
        assert session.newest_stamp == seed and len(session._kept) <= 1
    assert in_context == [1, 2, 3, 2, 3, 2, 3, 2, 3]
    assert rebuilt == [False, False, False, True, False, True, False, True, False]
    assert max(lengths) == lengths[2]  # never more than max_frames frames of KV cache
    # after the last rebuild (frame 8) the context is: prefix, frame 7 (kept), frame 8, frame 9
    ref, tokens = dense_reference(built, "smolvlm", (7, 8, 9), session.stop_ids, n_new=2)
    assert (seen[-1] - ref[3]).abs().max() <= 1e-4  # ref: prefix, 7, 8, 9, question, tokens
    assert session.ask(QUESTION, max_new_tokens=2).token_ids == tokens
    session.reset()
    assert session.frames_in_context == 0 and session.newest_stamp is None
    session.close()


def test_max_frames_update_rebuilds_at_the_next_frame(built):
    session = open_session(built, "smolvlm", max_frames=8)
    seen = record_logits(session.model)
    for seed in range(1, 6):
        session.append_frame(make_frame(seed=seed))
    with pytest.raises(ValueError, match="max_frames"):
        session.update(max_frames=0)
    session.update(max_frames=2)
    assert session.config.max_frames == 2 and session.frames_in_context == 5  # applied at the next call
    stats = [session.append_frame(make_frame(seed=seed)) for seed in (6, 7)]
    assert [(s.rebuilt, s.frames_in_context) for s in stats] == [(True, 2), (True, 2)]
    assert len(session._kept) == 1
    # the last rebuild kept frame 6 (max_frames // 2 = 1 earlier frame): prefix, 6, 7
    ref, tokens = dense_reference(built, "smolvlm", (6, 7), session.stop_ids, n_new=2)
    assert (seen[-1] - ref[2]).abs().max() <= 1e-4
    assert session.ask(QUESTION, max_new_tokens=2).token_ids == tokens
    session.close()


def test_deadline_and_should_stop_give_a_partial_answer(built):
    session = open_session(built, "smolvlm", max_new_tokens=NEW_TOKENS)
    session.append_frame(make_frame(seed=1))
    full = session.ask(QUESTION)
    assert not full.interrupted and full.tokens_generated == NEW_TOKENS  # no early end: 2 tokens is partial
    checks = []

    def after_two_tokens():
        checks.append(1)
        return len(checks) > 2  # asked before each new token: stop before the third

    partial = session.ask(QUESTION, should_stop=after_two_tokens)
    assert partial.interrupted and partial.tokens_generated == 2 and partial.token_ids == full.token_ids[:2]
    assert partial.text == session.tokenizer.decode(full.token_ids[:2], skip_special_tokens=True).strip()
    late = session.ask(QUESTION, deadline=time.monotonic() - 1.0)  # passed before decoding began
    assert late.interrupted and late.token_ids == [] and late.text == "" and late.prefill_s > 0
    assert not session.ask(QUESTION, deadline=time.monotonic() + 600).interrupted
    assert session.ask(QUESTION).token_ids == full.token_ids  # the stopped questions left no trace
    for bad in (float("nan"), True, "soon"):
        with pytest.raises(ValueError, match="deadline"):
            session.ask(QUESTION, deadline=bad)
    session.close()


def counting_check(stop_at=None):
    """A cancel check that counts how often it is asked and says stop at call `stop_at` (1-based)."""
    calls = []

    def check():
        calls.append(1)
        return stop_at is not None and len(calls) >= stop_at

    return check, calls


def test_cancel_stops_at_a_layer_boundary_and_leaves_the_context_as_it_was(built):
    session = open_session(built, "smolvlm", max_new_tokens=NEW_TOKENS)
    check, calls = counting_check()
    session.append_frame(make_frame(seed=1), cancel=check)
    first = len(calls)  # prefix and frame: every decoder layer and vision-tower layer asked once
    assert first >= 2 * session.model.config.text_config.num_hidden_layers
    books = (session.frames_in_context, session.context_tokens, session.newest_stamp)
    answer = session.ask(QUESTION)

    check, calls = counting_check()
    session.append_frame(make_frame(seed=2), cancel=check)
    per_frame = len(calls)
    session.reset(keep_newest=False)
    session.append_frame(make_frame(seed=1))
    assert session.ask(QUESTION).token_ids == answer.token_ids

    for stop_at in (1, per_frame):  # before the vision tower, and before the frame's last decoder layer
        check, calls = counting_check(stop_at)
        with pytest.raises(Cancelled):
            session.append_frame(make_frame(seed=2), stamp=5.0, cancel=check)
        assert len(calls) == stop_at
        assert (session.frames_in_context, session.context_tokens, session.newest_stamp) == books
        assert session._cache.get_seq_length() == session.context_tokens  # cropped back
    check, calls = counting_check(3)
    with pytest.raises(Cancelled):
        session.ask(QUESTION, cancel=check)  # stopped in the question's prefill
    assert session.ask(QUESTION).token_ids == answer.token_ids  # the context is what it was
    stats = session.append_frame(make_frame(seed=2), cancel=lambda: False)
    assert stats.frames_in_context == 2
    with pytest.raises(Cancelled):
        session.reset(keep_newest=True, cancel=lambda: True)
    assert session.frames_in_context == 0 and session.context_tokens == 0  # as documented: empty
    session.close()


def test_on_token_reports_the_answer_as_it_grows(built):
    session = open_session(built, "smolvlm", max_new_tokens=NEW_TOKENS)
    session.append_frame(make_frame(seed=1))
    seen = []
    answer = session.ask(QUESTION, on_token=lambda text, n: seen.append((text, n)))
    ids = [t for t in answer.token_ids if t not in session.stop_ids]
    assert [n for _, n in seen] == list(range(1, len(ids) + 1))
    assert seen[-1] == (answer.text, answer.tokens_generated)
    for text, n in seen:
        assert text == session.tokenizer.decode(ids[:n], skip_special_tokens=True).strip()
    session.close()


def test_the_session_keeps_its_books(built):
    """Tokens in the cache, the newest stamp, what each frame used, and the answer's counts."""
    session = open_session(built, "smolvlm", max_new_tokens=NEW_TOKENS)
    first = session.append_frame(make_frame(seed=1), stamp=10.5)
    session.update(SelectionSettings(0.5, "magnitude"), max_frames=4)
    second = session.append_frame(make_frame(seed=2), stamp=11.5)
    assert first.context_tokens == first.tokens > first.visual_tokens  # the prompt prefix came with it
    assert second.context_tokens == first.context_tokens + second.tokens
    assert session.context_tokens == second.context_tokens == session._cache.get_seq_length()
    assert (first.stamp, second.stamp, session.newest_stamp) == (10.5, 11.5, 11.5)
    assert (first.selection, first.max_frames) == (SelectionSettings(0.0, "chunking"), 8)  # before the update
    assert (second.selection, second.max_frames) == (SelectionSettings(0.5, "magnitude"), 4)

    full = session.ask(QUESTION)
    question = session.adapter.encode_text(session.adapter.question_prompt(QUESTION)).num_tokens
    assert full.question_tokens == question and full.context_tokens == session.context_tokens + question
    assert session.context_tokens == session._cache.get_seq_length()  # the question left the cache
    assert full.tokens_generated == len(full.token_ids) == NEW_TOKENS and full.truncated and not full.interrupted
    assert full.newest_stamp == 11.5 and full.frames_in_context == 2

    # a stop token ends an answer: it is in token_ids, not in tokens_generated, and not truncated
    k = next(i for i, t in enumerate(full.token_ids) if i > 0 and t not in full.token_ids[:i])
    stop_ids, session.stop_ids = session.stop_ids, (full.token_ids[k],)
    try:
        ended = session.ask(QUESTION)
    finally:
        session.stop_ids = stop_ids
    assert ended.token_ids == full.token_ids[:k + 1] and ended.tokens_generated == k
    assert not ended.truncated and not ended.interrupted
    assert ended.text == session.tokenizer.decode(full.token_ids[:k], skip_special_tokens=True).strip()
    stopped = session.ask(QUESTION, should_stop=lambda: True)
    assert stopped.interrupted and stopped.truncated and stopped.tokens_generated == 0
    session.close()


def test_reset_keeping_the_newest_frame_restarts_the_context_from_it(built):
    session = open_session(built, "smolvlm")
    seen = record_logits(session.model)
    for seed in (1, 2, 3):
        session.append_frame(make_frame(seed=seed), stamp=float(seed))
    restart = session.reset(keep_newest=True)
    assert isinstance(restart, FrameStats) and restart.frames_in_context == 1 and restart.stamp == 3.0
    assert session.frames_in_context == 1 and session.newest_stamp == 3.0
    assert session.context_tokens == restart.context_tokens == restart.tokens == session._cache.get_seq_length()
    ref, tokens = dense_reference(built, "smolvlm", (3,), session.stop_ids, n_new=2)
    assert (seen[-1] - ref[1]).abs().max() <= 1e-4  # ref: prefix, frame 3, question, tokens
    assert session.ask(QUESTION, max_new_tokens=2).token_ids == tokens
    assert session.reset(keep_newest=True) is None and session.frames_in_context == 1  # alone already
    assert session.append_frame(make_frame(seed=4)).frames_in_context == 2  # later frames follow it
    assert session.reset() is None and session.frames_in_context == session.context_tokens == 0
    assert session.reset(keep_newest=True) is None and session.newest_stamp is None
    session.close()


@pytest.mark.parametrize("question,match", [
    ("", "empty"), ("   \n", "empty"), ("why " * 100, "tokens long"), (42, "string"),
])
def test_bad_questions(built, question, match):
    session = open_session(built, "qwen2_5_vl", max_question_tokens=64)
    session.append_frame(make_frame())
    with pytest.raises(ValueError, match=match):
        session.ask(question)
    with pytest.raises(ValueError, match="max_new_tokens"):
        session.ask(QUESTION, max_new_tokens=0)
    assert len(session.ask(QUESTION, max_new_tokens=1).token_ids) == 1  # still works
    session.close()


def test_ask_before_any_frame(built):
    with open_session(built, "smolvlm") as session:
        with pytest.raises(ValueError, match="no frame"):
            session.ask(QUESTION)


BAD_FRAMES = {
    "gray-array": (np.zeros((48, 64), np.uint8), ValueError, r"\[H, W, 3\]"),
    "rgba-array": (np.zeros((48, 64, 4), np.uint8), ValueError, r"\[H, W, 3\]"),
    "float-array": (np.zeros((48, 64, 3), np.float32), ValueError, "uint8"),
    "batch": (np.zeros((2, 48, 64, 3), np.uint8), ValueError, r"\[H, W, 3\]"),
    "tiny": (np.zeros((4, 4, 3), np.uint8), ValueError, "each side"),
    "huge": (np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (20000, 20000, 3)), ValueError, "each side"),
    "sliver": (np.zeros((16, 2000, 3), np.uint8), ValueError, "aspect"),
    "path": ("frame.png", TypeError, "NumPy array"),
    "none": (None, TypeError, "NumPy array"),
}


def test_bad_frames_are_refused_and_the_session_goes_on(built):
    session = open_session(built, "llava_onevision")
    session.append_frame(make_frame(seed=1))
    for name, (frame, error, match) in BAD_FRAMES.items():
        with pytest.raises(error, match=match):
            session.append_frame(frame)
        assert session.frames_in_context == 1, name
    with pytest.raises(ValueError, match="stamp"):
        session.append_frame(make_frame(), stamp=float("nan"))
    # other PIL modes and camera-sized frames are fine
    gray = Image.fromarray(make_frame(seed=2)).convert("L")
    rgba = Image.fromarray(make_frame(seed=3)).convert("RGBA")
    for frame in (gray, rgba, make_frame(1080, 1920, seed=4)):
        assert session.append_frame(frame).visual_tokens > 0
    assert session.frames_in_context == 4
    assert len(session.ask(QUESTION, max_new_tokens=2).token_ids) >= 1
    session.close()
    with pytest.raises(RuntimeError, match="closed"):
        session.append_frame(make_frame())
    session.close()


@pytest.mark.parametrize("field,value", [
    ("device", "tpu"), ("device", 3), ("dtype", "int8"), ("selection", {"sparsity": 0.5}), ("selection", None),
    ("reader_threads", 0), ("max_frames", 0), ("max_new_tokens", 1.5), ("profile_quick", "yes"),
    ("frame_tokens", "tile"), ("frame_tokens", 0), ("decoding", "beam"),
])
def test_config_is_validated(field, value):
    with pytest.raises(ValueError, match=field):
        SessionConfig(**{field: value})


@pytest.mark.parametrize("field,value", [
    ("sparsity", 1.0), ("sparsity", -0.1), ("sparsity", float("nan")), ("sparsity", True), ("method", "random"),
    ("windows", {"start_kib": 8}),
])
def test_selection_settings_are_validated_where_they_are_built(field, value):
    with pytest.raises(ValueError, match=field):
        SelectionSettings(**{field: value})
    with pytest.raises(ValueError, match="start_kib"):
        SelectionSettings(windows=ChunkParams(start_kib=-1))


def test_update_is_validated_and_refusals_change_nothing(built):
    session = open_session(built, "smolvlm", sparsity=0.1, method="magnitude")
    for bad in ({"selection": {"sparsity": 0.3}}, {"selection": "default"}, {"max_frames": 0},
                {"selection": SelectionSettings(0.3), "max_frames": -1}):
        with pytest.raises(ValueError):
            session.update(**bad)
    assert session.config.selection == SelectionSettings(0.1, "magnitude") and session.config.max_frames == 8
    session.update(SelectionSettings(0.1, "magnitude", ChunkParams(start_kib=8, step_kib=8)))
    assert session.config.selection.windows.start_kib == 8
    session.update(SelectionSettings(0.1, "dense"))  # windows None: the per-matrix defaults
    s = session.append_frame(make_frame())
    assert session.config.selection.windows is None and s.rows_read == s.rows_total
    session.close()


def test_append_and_ask_never_overlap(built):
    session = open_session(built, "qwen2_5_vl")
    session.append_frame(make_frame(seed=1))
    errors, answers = [], []

    def frames():
        try:
            for seed in range(2, 5):
                session.append_frame(make_frame(seed=seed))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=frames)
    thread.start()
    for _ in range(3):
        answers.append(session.ask(QUESTION, max_new_tokens=2))
    thread.join()
    assert not errors and session.frames_in_context == 4 and len(answers) == 3
    session.close()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision(built, dtype):
    session = open_session(built, "smolvlm", dtype=dtype)
    assert next(session.model.parameters()).dtype == getattr(torch, dtype)
    seen = record_logits(session.model)
    session.append_frame(make_frame(seed=1))
    answer = session.ask(QUESTION, max_new_tokens=2)
    assert torch.isfinite(seen[-1]).all() and len(answer.token_ids) >= 1
    session.close()


def test_latency_table_comes_from_the_drive_profile_cache(built, monkeypatch, tmp_path):
    from nchunk_core.io import profile

    monkeypatch.setenv("NCHUNK_CACHE_DIR", str(tmp_path / "cache"))
    store = built[2]["smolvlm"]
    path = profile.cache_path(store, 2)
    LatencyTable.synthetic(setup_s=1e-4).save(path)
    messages = []
    session = Session.open(store, SessionConfig(reader_threads=2, selection=SelectionSettings(0.5)),
                           log=messages.append)
    assert any("from cache" in m for m in messages)
    assert session.append_frame(make_frame()).est_io_s > 0
    session.close()


# ---- bad stores ---------------------------------------------------------------------------------

@pytest.fixture
def store_copy(built, tmp_path):
    return shutil.copytree(built[2]["smolvlm"], tmp_path / "store")


def test_flipped_byte_is_caught_by_verify(store_copy, capsys):
    group = next(iter(Store.open(store_copy).groups.values()))
    with open(group.file, "r+b") as f:
        f.seek(group.offset + 100)
        byte = f.read(1)
        f.seek(group.offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    report = Store.open(store_copy).verify()
    assert not report.ok and group.name in str(report)
    assert cli.main(["verify", str(store_copy)]) == 1


@pytest.mark.parametrize("damage,error,match", [
    ("truncate-weights", StoreError, "weights-00000.bin"),
    ("truncate-resident", StoreError, "resident.safetensors"),
    ("drop-manifest", StoreError, "manifest.json"),
    ("drop-config", FileNotFoundError, "config.json"),
    ("drop-tokenizer", ValueError, "tokenizer"),
    ("other-arch-config", StoreError, "arch"),
    ("resized-config", StoreError, r"mlp\.gate_proj is \[96, 64\] in the config but \[128, 64\] in the store"),
])
def test_damaged_store_fails_clearly_at_open(built, store_copy, damage, error, match):
    what, _, name = damage.partition("-")
    target = {"weights": "weights-00000.bin", "resident": "resident.safetensors", "manifest": "manifest.json",
              "config": "config.json", "tokenizer": "tokenizer.json"}.get(name)
    if what == "truncate":
        path = store_copy / target
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif what == "drop":
        (store_copy / target).unlink()
    elif what == "other":
        shutil.copy(built[0]["qwen2_5_vl"] / "config.json", store_copy / "config.json")
    else:  # a config that does not describe the stored matrices
        config = json.loads((store_copy / "config.json").read_text())
        config["text_config"]["intermediate_size"] = 96
        (store_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(error, match=match):
        Session.open(store_copy, SessionConfig(), table=TABLE)


def test_missing_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Session.open(tmp_path / "nowhere", SessionConfig(), table=TABLE)
    with pytest.raises(ValueError, match="SessionConfig"):
        Session.open(tmp_path, {"sparsity": 0.5}, table=TABLE)


def test_tied_embeddings(built, tmp_path):
    """A checkpoint whose LM head is the embedding (Qwen2-0.5B, SmolVLM) stores it once and ties it."""

    ckpt = shutil.copytree(built[0]["qwen2_5_vl"], tmp_path / "tied")
    config = json.loads((ckpt / "config.json").read_text())
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = True
    (ckpt / "config.json").write_text(json.dumps(config))
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    store = convert(ckpt, tmp_path / "store", reorder=False, progress=False)
    assert "lm_head.weight" not in Store.open(store).resident_names()

    model, processor = load_tiny_vlm(ckpt)
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    session = Session.open(store, SessionConfig(), table=TABLE)
    assert session.model.lm_head.weight is session.model.model.language_model.embed_tokens.weight
    seen = record_logits(session.model)
    session.append_frame(make_frame(seed=1))
    adapter = adapter_for(model, processor)
    cache, pos = DynamicCache(), 0
    for chunk in (adapter.encode_text(adapter.prompt_prefix), adapter.encode_frame(make_frame(seed=1))):
        logits, pos = adapter.append(chunk, cache, pos)
    assert (seen[-1] - logits[0]).abs().max() <= 1e-4
    session.close()


def test_frame_tokens_update_applies_from_the_next_frame(built):
    """A new frame mode costs the next frame, not the frames in context; a question before it sees
    the frames as they were. A mode the model lacks is refused and changes nothing."""
    session = open_session(built, "smolvlm")  # the tiny checkpoint has no chat template: its processor's tiles
    first = session.append_frame(make_frame(seed=1))
    assert first.frame_mode == "tiles"
    for bad, match in (("video", "not a frame mode of smolvlm"), (64, "no pixel budget"), ("tile", "frame_tokens")):
        with pytest.raises(ValueError, match=match):
            session.update(frame_tokens=bad)
    session.update(frame_tokens="image", decoding="greedy")
    asked = session.ask(QUESTION, max_new_tokens=2)
    assert session.adapter.frame_mode == "tiles" and session.decoding.mode == "greedy"
    assert asked.context_tokens == first.context_tokens + asked.question_tokens
    second = session.append_frame(make_frame(seed=2))
    assert second.frame_mode == session.adapter.frame_mode == "image" and not second.rebuilt
    assert second.visual_tokens < first.visual_tokens
    assert session.frames_in_context == 2 and second.context_tokens == first.context_tokens + second.tokens
    session.close()


def test_a_frame_mode_with_other_prompt_pieces_rebuilds_the_context_in_it(built):
    """LLaVA-OneVision from video to image frames: the next frame rebuilds the context, the kept
    frames re-encoded as images, so it is the conversation an image-mode session would have."""
    seeds = (1, 2, 3)
    session = open_session(built, "llava_onevision-video")
    for seed in seeds[:2]:
        assert session.append_frame(make_frame(seed=seed)).frame_mode == "video"
    session.update(frame_tokens="image")
    last = session.append_frame(make_frame(seed=seeds[2]))
    assert last.rebuilt and last.frame_mode == "image" and session.frames_in_context == 3
    reference = open_session(built, "llava_onevision-video", frame_tokens="image")
    for seed in seeds:
        reference.append_frame(make_frame(seed=seed))
    assert session.context_tokens == reference.context_tokens
    assert session.ask(QUESTION).token_ids == reference.ask(QUESTION).token_ids
    session.close()
    reference.close()
