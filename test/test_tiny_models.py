"""Tiny VLMs and frame appending: real transformers architectures, tokenizers built locally.

The key check: appending [frame 1][frame 2][question] chunk by chunk through a DynamicCache gives
the same last logits and the same greedy answer as one forward of the whole sequence, for every
supported architecture.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from nchunk_core.runtime.adapters import PROJECTIONS, adapter_for
from nchunk_core.runtime.decoding import greedy_decode
from nchunk_core.testing.tiny_models import ARCHS, build_tiny_vlm, load_tiny_vlm, make_frame

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is in the box?"
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def saved(tiny_checkpoints):
    """arch → directory of its saved tiny model (conftest.py: built once per test run)."""
    return {arch: tiny_checkpoints[arch] for arch in ARCHS}


@pytest.fixture(scope="module")
def loaded(saved):
    """arch → (model, processor, adapter), reloaded from disk."""
    out = {}
    for arch, path in saved.items():
        model, processor = load_tiny_vlm(path)
        out[arch] = (model, processor, adapter_for(model, processor))
    return out


# (arch, adapter options): every way of turning a frame into tokens.
CASES = [
    ("llava_onevision", {}),
    ("llava_onevision", {"frame_tokens": "video"}),
    ("qwen2_5_vl", {}),
    ("smolvlm", {}),
]
CASE_IDS = ["llava_onevision", "llava_onevision-video", "qwen2_5_vl", "smolvlm"]


def prompt_chunks(adapter, with_prefix):
    """[prefix text]? [frame 1] [frame 2] [question] as chunks."""
    chunks = [adapter.encode_text(adapter.prompt_prefix)] if with_prefix else []
    chunks += [adapter.encode_frame(make_frame(seed=1)), adapter.encode_frame(make_frame(seed=2))]
    chunks.append(adapter.encode_question(QUESTION))
    return chunks


def one_shot_inputs(arch, chunks):
    """Model inputs of the whole sequence in one call, built from the chunks' own tensors.

    Vision tensors of the frames are stacked as the model expects several images of one sample:
    on dim 1 for SmolVLM ([B, images, 3, H, W]), on dim 0 otherwise. LLaVA-OneVision gets no
    batch_num_images, so every image takes the single-image (anyres) path, as when appended; its
    video frames are the frames of one video ([1, frames, 3, H, W]).
    """
    ids = torch.cat([c.input_ids for c in chunks], dim=1)
    frames = [c.vision for c in chunks if c.vision]
    return ids, {k: torch.cat([f[k] for f in frames], dim=1 if arch == "smolvlm" or k == "pixel_values_videos" else 0)
                 for k in frames[0]}


@torch.no_grad()
def one_shot_logits(model, arch, ids, vision):
    extra = {}
    if arch == "qwen2_5_vl":  # lets the model compute mrope positions of the whole sequence itself
        extra["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
    return model(input_ids=ids, use_cache=False, **vision, **extra).logits[:, -1].float()


def one_shot_greedy(model, arch, ids, vision, n):
    """Greedy decoding with no cache at all: the whole sequence is re-run for every token."""
    tokens = []
    for _ in range(n):
        tokens.append(int(one_shot_logits(model, arch, ids, vision)[0].argmax()))
        ids = torch.cat([ids, torch.tensor([[tokens[-1]]])], dim=1)
    return tokens


def append_all(adapter, chunks):
    cache, pos, logits = DynamicCache(), 0, None
    for c in chunks:
        logits, pos = adapter.append(c, cache, pos)
    return logits, cache, pos


@pytest.mark.parametrize("with_prefix", [False, True], ids=["frames-first", "prefix-first"])
@pytest.mark.parametrize("arch,options", CASES, ids=CASE_IDS)
def test_appending_frames_matches_one_shot(loaded, arch, options, with_prefix):
    model, processor, _ = loaded[arch]
    adapter = adapter_for(model, processor, **options)
    chunks = prompt_chunks(adapter, with_prefix)
    ids, vision = one_shot_inputs(arch, chunks)

    ref = one_shot_logits(model, arch, ids, vision)
    logits, cache, pos = append_all(adapter, chunks)
    diff = (logits - ref).abs().max().item()
    assert diff <= 1e-4, f"{arch}: max |Δlogit| {diff:.2e}"
    assert cache.get_seq_length() == ids.shape[1]
    if arch == "qwen2_5_vl":  # mrope: a frame of h×w merged tokens uses only max(h, w) positions
        assert pos < ids.shape[1]
    else:
        assert pos == ids.shape[1]

    tokens, _ = greedy_decode(adapter, logits, cache, pos, NEW_TOKENS)
    assert tokens == one_shot_greedy(model, arch, ids, vision, NEW_TOKENS)


def test_qwen_needs_mrope_offsets(loaded):
    """Negative control: Qwen2.5-VL frames appended with 1-D positions (cache length) are wrong."""
    model, _, adapter = loaded["qwen2_5_vl"]
    chunks = prompt_chunks(adapter, with_prefix=True)
    ref = one_shot_logits(model, "qwen2_5_vl", *one_shot_inputs("qwen2_5_vl", chunks))
    cache = DynamicCache()
    with torch.no_grad():
        for c in chunks:
            out = model(input_ids=c.input_ids, cache=cache, use_cache=True, **c.vision)
    assert (out.logits[:, -1] - ref).abs().max().item() > 1e-3


EXPECTED_VISUAL_TOKENS = {  # for a 48×64 frame (see tiny_models for the geometry)
    "llava_onevision": 44,  # 16 base + 2 tiles unpadded to 4×6 + 4 row newlines
    "llava_onevision-video": 4,  # 4×4 patches pooled to 2×2 (one newline closes all frames, in the question)
    "qwen2_5_vl": 12,  # 6×8 patches merged 2×2
    "smolvlm": 20,  # 2×2 tiles + 1 global view, 4 tokens each
}


@pytest.mark.parametrize("arch,options", CASES, ids=CASE_IDS)
def test_frame_chunk_has_visual_tokens(loaded, arch, options, request):
    model, processor, _ = loaded[arch]
    adapter = adapter_for(model, processor, **options)
    chunk = adapter.encode_frame(make_frame())
    expected = EXPECTED_VISUAL_TOKENS[request.node.callspec.id]
    assert chunk.num_visual_tokens == expected
    placeholder = adapter.video_token_id if options else adapter.image_token_id
    assert int((chunk.input_ids == placeholder).sum()) == expected
    # A camera-sized frame costs the same: the processor resizes to the model's input.
    assert adapter.encode_frame(make_frame(480, 640)).num_visual_tokens == expected


@pytest.mark.parametrize(
    "bad,error",
    [
        (make_frame().astype("float32"), ValueError),
        (make_frame()[..., :2], ValueError),
        (make_frame()[0], ValueError),
        ("frame.png", TypeError),
    ],
    ids=["float", "two-channels", "2d", "path"],
)
def test_malformed_frames_are_rejected_clearly(loaded, bad, error):
    with pytest.raises(error, match="frame"):
        loaded["smolvlm"][2].encode_frame(bad)


@pytest.mark.parametrize("arch", ARCHS)
def test_projection_groups_name_the_decoder_linears(loaded, arch):
    model, _, adapter = loaded[arch]
    cfg = model.config.get_text_config()
    groups = adapter.projection_groups(model)
    assert len(groups) == len(adapter.decoder_layers(model)) == cfg.num_hidden_layers == 2
    for layer in groups:
        assert list(layer) == list(PROJECTIONS)
        mods = {g: [model.get_submodule(p) for p in paths] for g, paths in layer.items()}
        assert [len(m) for m in mods.values()] == [3, 1, 2, 1]
        for g, ms in mods.items():
            assert all(isinstance(m, torch.nn.Linear) for m in ms)
            assert len({m.in_features for m in ms}) == 1, f"{g}: projections must share an input"
        assert mods["attn_in"][0].in_features == cfg.hidden_size
        assert mods["mlp_out"][0].in_features == cfg.intermediate_size


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_round_trips_text_and_keeps_specials_whole(loaded, arch):
    model, processor, adapter = loaded[arch]
    tok = processor.tokenizer
    text = "Où est la boîte? 42 — ok"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    prompt = adapter.prompt_prefix + adapter.frame_prompt + adapter.question_prompt("hi")
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(adapter.image_token_id) == 1  # the placeholder is one token, not its bytes
    assert tok.decode(ids) == prompt
    assert max(ids) < len(tok) <= model.config.get_text_config().vocab_size


def test_build_is_deterministic(saved, tmp_path):
    again = build_tiny_vlm("smolvlm", tmp_path / "again", seed=0)
    other = build_tiny_vlm("smolvlm", tmp_path / "other", seed=1)
    a, b, c = (load_tiny_vlm(p)[0].state_dict() for p in (saved["smolvlm"], again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_reload_offline_with_auto_classes(saved):
    """A fresh process with HF_HUB_OFFLINE=1 reloads every saved model with the Auto classes."""
    code = (
        "import json, sys\n"
        "import nchunk_core.testing.tiny_models\n"
        "from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor\n"
        "out = {}\n"
        "for path in sys.argv[1:]:\n"
        "    cfg = AutoConfig.from_pretrained(path)\n"
        "    model = AutoModelForImageTextToText.from_pretrained(path)\n"
        "    proc = AutoProcessor.from_pretrained(path)\n"
        "    out[cfg.model_type] = [type(model).__name__, type(proc).__name__]\n"
        "print(json.dumps(out))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    res = subprocess.run(
        [sys.executable, "-c", code, *map(str, saved.values())], env=env, capture_output=True, text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {
        "llava_onevision": ["LlavaOnevisionForConditionalGeneration", "ImageOnlyLlavaOnevisionProcessor"],
        "qwen2_5_vl": ["Qwen2_5_VLForConditionalGeneration", "ImageOnlyQwen2_5_VLProcessor"],
        "smolvlm": ["SmolVLMForConditionalGeneration", "ImageOnlySmolVLMProcessor"],
    }
