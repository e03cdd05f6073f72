"""Checkpoints as published: their layouts convert, their chat templates, frame layouts and
generation settings are followed, and at sparsity 0 the answers are transformers' own.

The checkpoints are small replicas of the published layouts (nchunk_core/testing/published.py):
published configs, tensor names, shards, tokenizer ids, chat templates, generation and processor
configs, with a tiny random backbone. References are the real transformers model and the real
processor classes loaded from the same directory.
"""
import json
import shutil
import warnings

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoProcessor, Idefics3Processor

from nchunk_core.convert.converter import convert
from nchunk_core.io.latency import LatencyTable
from nchunk_core.runtime.adapters import adapter_for
from nchunk_core.runtime.prompts import render
from nchunk_core.runtime.session import Session, SessionConfig
from nchunk_core.testing.published import LAYOUTS, PUBLISHED, build_published, load_reference
from nchunk_core.testing.tiny_models import make_frame

QUESTION = "What is in the box?"
NEW_TOKENS = 4
CAMERA = (480, 640)  # a VGA camera frame
SMALL = (96, 128)  # frames of the end-to-end tests (what a frame becomes does not depend on it much)

# (layout, frame_tokens) -> visual tokens of one 640×480 frame, as the published processors make them
VISUAL_TOKENS = {
    ("idefics3", "image"): 64, ("idefics3", "tiles"): 832,
    ("smolvlm", "image"): 64, ("smolvlm", "tiles"): 832,
    ("llava_onevision", "video"): 196, ("llava_onevision", "image"): 730, ("llava_onevision", "tiles"): 2929,
    ("qwen2_5_vl", "image"): 391, ("qwen2_5_vl", 256): 234,  # 13 × 18 merged patches: the largest grid within 256
}
MODES = sorted(VISUAL_TOKENS, key=str)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """layout -> checkpoint directory."""
    root = tmp_path_factory.mktemp("published")
    return {layout: build_published(layout, root / layout, seed=0) for layout in LAYOUTS}


@pytest.fixture(scope="module")
def references(published):
    """layout -> (transformers model, processor) loaded from the checkpoint."""
    return {layout: load_reference(path) for layout, path in published.items()}


@pytest.fixture(scope="module")
def stores(published, tmp_path_factory):
    """layout -> (store converted with calibration on two frames, conversion log)."""
    root = tmp_path_factory.mktemp("stores")
    frames = root / "frames"
    frames.mkdir()
    for i in range(2):
        Image.fromarray(make_frame(*SMALL, seed=10 + i)).save(frames / f"{i}.png")
    out = {}
    for layout, path in published.items():
        log = []
        out[layout] = (convert(path, root / layout, frames, progress=False, log=log.append), log)
    return out


def frame(seed, hw=SMALL):
    return Image.fromarray(make_frame(*hw, seed=seed))


def images_of_one_turn(adapter, images):
    """The images argument of the real processor for frames in `adapter`'s mode: LLaVA-OneVision's
    image mode is several images of one sample (nested), its tiles mode lone images (flat)."""
    return [images] if adapter.arch == "llava_onevision" and adapter.frame_mode == "image" else images


# ---------------------------------------------------------------- the layouts themselves


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_is_as_published(published, layout):
    path, spec = published[layout], PUBLISHED[layout]
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == layout and config["architectures"] == spec.config["architectures"]
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(set(weight_map.values())) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    names = set(weight_map)
    for file in set(weight_map.values()):
        with safe_open(str(path / file), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    expected = {
        "idefics3": ["model.text_model.layers.0.self_attn.q_proj.weight", "model.vision_model.post_layernorm.weight",
                     "model.connector.modality_projection.proj.weight", "lm_head.weight"],
        "llava_onevision": ["language_model.model.layers.0.self_attn.q_proj.weight", "image_newline",
                            "vision_tower.vision_model.embeddings.patch_embedding.weight",
                            "multi_modal_projector.linear_1.weight"],
        "qwen2_5_vl": ["model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight",
                       "visual.patch_embed.proj.weight"],
    }
    expected["smolvlm"] = expected["idefics3"]
    assert set(expected[layout]) <= names
    if config.get("tie_word_embeddings"):  # the tied LM head is not in the files
        assert not any("lm_head" in n for n in names)
    if layout == "qwen2_5_vl":  # flat config: the text model's fields at the top
        assert "text_config" not in config and config["rope_scaling"]["type"] == "mrope"
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation == spec.generation
    assert json.loads((path / "chat_template.json").read_text())["chat_template"] == spec.chat_template
    _, processor = load_reference(path)
    tok = processor.tokenizer
    assert all(tok.convert_tokens_to_ids(t) == i for t, i in spec.specials.items())
    eos = generation["eos_token_id"]
    assert tok.eos_token_id in (eos if isinstance(eos, list) else [eos])
    pre = json.loads((path / "preprocessor_config.json").read_text())
    assert type(processor.image_processor).__name__.startswith(pre["image_processor_type"])


def test_idefics3_loads_with_the_real_processor(published):
    """SmolVLM v1: AutoProcessor gives the real Idefics3Processor (no torchvision needed)."""
    processor = AutoProcessor.from_pretrained(str(published["idefics3"]), local_files_only=True)
    assert type(processor) is Idefics3Processor
    assert processor.image_seq_len == 64 and processor.chat_template == PUBLISHED["idefics3"].chat_template


# ---------------------------------------------------------------- what a frame costs


@pytest.mark.parametrize("layout,frame_tokens", MODES, ids=[f"{a}-{b}" for a, b in MODES])
def test_visual_tokens_per_frame_are_the_processors(references, layout, frame_tokens):
    model, processor = references[layout]
    adapter = adapter_for(model, processor, frame_tokens=frame_tokens)
    image = frame(1, CAMERA)
    chunk = adapter.encode_frame(image)
    # what the real processor makes of the same frame, for a turn with two frames
    two = render(processor.tokenizer, processor.chat_template, [{"type": "image"}] * 2, QUESTION)
    if adapter.frame_mode == "video":  # one video of two frames: 2 × per frame + the closing newline
        n = processor._get_num_multimodal_tokens(video_sizes=[(2, *CAMERA)])["num_video_tokens"][0]
        real = (n - 1) / 2
    else:
        ids = processor(text=[two], images=images_of_one_turn(adapter, [image, image]), return_tensors="pt",
                        **adapter.processor_options())["input_ids"]
        real = int((ids == adapter.image_token_id).sum()) / 2
    assert chunk.num_visual_tokens == real == VISUAL_TOKENS[layout, frame_tokens]
    placeholder = adapter.video_token_id if adapter.frame_mode == "video" else adapter.image_token_id
    assert int((chunk.input_ids == placeholder).sum()) == chunk.num_visual_tokens


@pytest.mark.parametrize("layout,expected", [("idefics3", "image"), ("smolvlm", "image"),
                                             ("llava_onevision", "video"), ("qwen2_5_vl", "image")])
def test_auto_is_the_cheapest_trained_mode(references, layout, expected):
    model, processor = references[layout]
    assert adapter_for(model, processor).frame_mode == expected
    with pytest.raises(ValueError, match="frame_tokens"):
        adapter_for(model, processor, frame_tokens="video" if layout != "llava_onevision" else 100)


# ---------------------------------------------------------------- prompts from the chat template


@pytest.mark.parametrize("layout,frame_tokens", MODES, ids=[f"{a}-{b}" for a, b in MODES])
def test_conversation_is_what_the_template_and_processor_make(references, layout, frame_tokens):
    """Prefix, two frames and the question, appended chunk by chunk, are token for token the
    checkpoint's chat template for that conversation, expanded by the real processor."""
    model, processor = references[layout]
    adapter = adapter_for(model, processor, frame_tokens=frame_tokens)
    assert adapter.prompt.source == "chat template"
    f1, f2 = frame(1), frame(2)
    chunks = [adapter.encode_text(adapter.prompt_prefix), adapter.encode_frame(f1), adapter.encode_frame(f2),
              adapter.encode_question(QUESTION)]
    ours = torch.cat([c.input_ids for c in chunks], dim=1)
    tok = processor.tokenizer
    if adapter.frame_mode == "video":
        text = render(tok, processor.chat_template, [{"type": "video"}], QUESTION)
        n = processor._get_num_multimodal_tokens(video_sizes=[(2, *SMALL)])["num_video_tokens"][0]
        text = text.replace(processor.video_token, processor.video_token * n)
        expected = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        text = render(tok, processor.chat_template, [{"type": "image"}] * 2, QUESTION)
        expected = processor(text=[text], images=images_of_one_turn(adapter, [f1, f2]), return_tensors="pt",
                             **adapter.processor_options())["input_ids"]
    assert torch.equal(ours, expected)


# ---------------------------------------------------------------- answers as transformers gives them

# (layout, frame_tokens) of the end-to-end cases: every layout in its default mode, and the model's
# own multi-image path of LLaVA-OneVision
ANSWER_CASES = [(layout, "auto") for layout in LAYOUTS] + [("llava_onevision", "image")]


def transformers_inputs(adapter, processor, frames, question=QUESTION):
    """The whole conversation as one transformers input: the chat template and the real processor
    (a video's pixels are the frames' base views, as the video processor makes them)."""
    tok = processor.tokenizer
    if adapter.frame_mode == "video":
        text = render(tok, processor.chat_template, [{"type": "video"}], question)
        n = processor._get_num_multimodal_tokens(video_sizes=[(len(frames), *SMALL)])["num_video_tokens"][0]
        ids = tok(text.replace(processor.video_token, processor.video_token * n), add_special_tokens=False,
                  return_tensors="pt")["input_ids"]
        pixels = torch.cat([adapter.encode_frame(f).vision["pixel_values_videos"] for f in frames], dim=1)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixels}
    text = render(tok, processor.chat_template, [{"type": "image"}] * len(frames), question)
    return dict(processor(text=[text], images=images_of_one_turn(adapter, frames), return_tensors="pt",
                          **adapter.processor_options()))


@torch.no_grad()
def transformers_answer(model, inputs, **settings):
    """(greedy tokens, raw logits of each step [V]) of generate() with the checkpoint's generation
    config, greedy; `settings` override it."""
    out = model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS, output_logits=True,
                         return_dict_in_generate=True, **settings)
    return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), [s[0].float() for s in out.logits]


def session_answer(store, frame_tokens="auto", **cfg):
    """(answer, frame stats, logits of the question and of each generated token, warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = Session.open(store, SessionConfig(max_new_tokens=NEW_TOKENS, frame_tokens=frame_tokens, **cfg),
                               table=LatencyTable.synthetic())
        seen = []
        session.model.lm_head.register_forward_hook(lambda m, a, out: seen.append(out[0, -1].float().clone()))
        stats = [session.append_frame(frame(s)) for s in (1, 2)]
        answer = session.ask(QUESTION)
        session.close()
    return answer, stats, seen[3:], [str(w.message) for w in caught]  # seen[:3]: prefix and frames


@pytest.mark.parametrize("layout,frame_tokens", ANSWER_CASES, ids=[f"{a}-{b}" for a, b in ANSWER_CASES])
def test_sparsity_zero_answers_as_transformers(references, stores, layout, frame_tokens):
    model, processor = references[layout]
    adapter = adapter_for(model, processor, frame_tokens=frame_tokens)
    answer, stats, logits, caught = session_answer(stores[layout][0], frame_tokens)
    tokens, ref_logits = transformers_answer(model, transformers_inputs(adapter, processor, [frame(1), frame(2)]))

    assert answer.token_ids == tokens
    assert len(logits) == len(ref_logits) == len(tokens)
    diff = max((a - b).abs().max().item() for a, b in zip(logits, ref_logits))
    print(f"{layout} ({adapter.frame_mode}): max |Δlogit| {diff:.2e} over {len(tokens)} tokens")
    assert diff <= 1e-4
    assert [s.visual_tokens for s in stats] == [adapter.encode_frame(frame(1)).num_visual_tokens] * 2
    assert not [m for m in caught if "deprecated" in m or "past_key_values" in m], caught


def test_conversion_estimates_calibration_time_first(stores):
    for layout, (_, log) in stores.items():
        estimate = next(i for i, m in enumerate(log) if m.startswith("calibrating on 2 frame(s): the first"))
        assert "for the other 1" in log[estimate]
        assert estimate < next(i for i, m in enumerate(log) if m.startswith("store written"))


# layout -> the frame mode auto calibrates in (a published checkpoint has a chat template: the cheapest)
CALIBRATED = {"idefics3": "image", "smolvlm": "image", "llava_onevision": "video", "qwen2_5_vl": "image"}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_store_records_its_calibration_frame_mode(stores, layout, capsys):
    """The manifest says which frame mode calibrated the row order; opening the store logs it, and a
    session in another mode logs a note (a store without the field opens with no note)."""
    from nchunk_core import cli
    from nchunk_core.store import Store

    store = stores[layout][0]
    calibration = Store.open(store).model_info["calibration"]
    assert (calibration["frame_mode"], calibration["frame_tokens"]) == (CALIBRATED[layout], "auto")
    assert calibration["visual_tokens"] == adapter_for_store(store).encode_frame(frame(10)).num_visual_tokens
    assert cli.main(["verify", str(store)]) == 0
    assert f"frame mode {CALIBRATED[layout]} ({calibration['visual_tokens']} visual tokens" in capsys.readouterr().out

    def logged(**cfg):
        log = []
        Session.open(store, SessionConfig(**cfg), log=log.append, table=LatencyTable.synthetic()).close()
        return log

    same = logged()
    assert any(f"frame mode {CALIBRATED[layout]}" in m for m in same) and not any("note:" in m for m in same)
    other = "tiles" if layout != "qwen2_5_vl" else 64
    notes = [m for m in logged(frame_tokens=other) if m.startswith("note:")]
    assert len(notes) == 1 and f"calibrated in {CALIBRATED[layout]}" in notes[0], notes


def adapter_for_store(store):
    """The adapter a session on `store` encodes frames with (auto)."""
    with Session.open(store, SessionConfig(), table=LatencyTable.synthetic()) as session:
        return session.adapter


def test_a_store_without_the_calibration_frame_mode_opens_quietly(stores, tmp_path):
    store = shutil.copytree(stores["smolvlm"][0], tmp_path / "older")
    manifest = json.loads((store / "manifest.json").read_text())
    for key in ("frame_mode", "token_budget", "visual_tokens"):
        del manifest["model"]["calibration"][key]
    (store / "manifest.json").write_text(json.dumps(manifest))
    log = []
    Session.open(store, SessionConfig(frame_tokens="tiles"), log=log.append, table=LatencyTable.synthetic()).close()
    assert not any(m.startswith("note:") for m in log)
    assert any("frame_tokens 'auto' (frame mode not recorded" in m for m in log), log


PENALTY = 0.5


def test_decoding_follows_the_generation_config(references, stores, tmp_path):
    """A repetition penalty that changes this random model's answer (below 1 it favours the tokens
    already in the context, which the model's random preferences rarely pick): the session follows
    generate() with it by default, and plain greedy with decoding="greedy"."""
    layout = "qwen2_5_vl"
    store = shutil.copytree(stores[layout][0], tmp_path / "store")
    generation = json.loads((store / "generation_config.json").read_text())
    generation["repetition_penalty"] = PENALTY
    (store / "generation_config.json").write_text(json.dumps(generation))
    model, processor = references[layout]
    inputs = transformers_inputs(adapter_for(model, processor), processor, [frame(1), frame(2)])

    penalised, _, _, _ = session_answer(store)
    greedy, _, _, _ = session_answer(store, decoding="greedy")
    assert penalised.token_ids == transformers_answer(model, inputs, repetition_penalty=PENALTY)[0]
    assert greedy.token_ids == transformers_answer(model, inputs, repetition_penalty=1.0)[0]
    assert penalised.token_ids != greedy.token_ids
    # the same, changed on an open session: from the next question, the frames left as they were
    with Session.open(store, SessionConfig(max_new_tokens=NEW_TOKENS), table=LatencyTable.synthetic()) as session:
        for seed in (1, 2):
            session.append_frame(frame(seed))
        assert session.ask(QUESTION).token_ids == penalised.token_ids
        session.update(decoding="greedy")
        assert session.ask(QUESTION).token_ids == greedy.token_ids
        session.update(decoding="checkpoint")
        assert session.ask(QUESTION).token_ids == penalised.token_ids


# ---------------------------------------------------------------- checkpoints without a template


def test_without_a_chat_template_the_builtin_prompt_and_layout_are_used(tmp_path):
    from nchunk_core.testing.tiny_models import build_tiny_vlm, load_tiny_vlm

    model, processor = load_tiny_vlm(build_tiny_vlm("llava_onevision", tmp_path / "tiny"))
    adapter = adapter_for(model, processor)
    assert adapter.prompt.source == "built-in" and "no chat template" in adapter.describe()
    assert adapter.prompt_prefix == type(adapter).prompt_prefix
    assert adapter.frame_mode == "tiles"  # the processor's own layout, as such a model was trained


def test_a_template_that_cannot_be_cut_is_refused(references):
    from nchunk_core.runtime.prompts import TemplateError, cut_images

    tok = references["qwen2_5_vl"][1].tokenizer
    question_first = ("{{ messages[0]['content'][-1]['text'] }}{% for c in messages[0]['content'] %}"
                      "{% if c['type'] == 'image' %}<|image_pad|>{% endif %}{% endfor %}")
    with pytest.raises(TemplateError, match="before the question"):
        cut_images(tok, question_first, {"type": "image"})
