"""The built-in model's training pipeline: tokenizer, batches, shared-context forward, a short run."""
import json

import numpy as np
import torch

from nchunk_core import scenes, train_demo
from nchunk_core.demo_model import VISUAL_TOKENS, build_tokenizer, build_untrained, prompt
from nchunk_core.frame_append import SmolVLMAdapter
from nchunk_core.session import Session, SessionConfig


def test_tokenizer_is_word_level_and_lower_case():
    tok = build_tokenizer()
    ids = tok("What colour is the Circle?", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["what", "colour", "is", "the", "circle", "?"]
    assert tok.decode(tok("red circle", add_special_tokens=False)["input_ids"]) == "red circle"
    assert tok.convert_ids_to_tokens(tok("zebra", add_special_tokens=False)["input_ids"]) == ["[UNK]"]
    for word in ["color", "yes", "nothing", "4", "triangles", *scenes.COLORS]:
        assert tok.convert_tokens_to_ids(word) != tok.unk_token_id, word


def test_training_forward_matches_a_whole_sequence_forward():
    """Shared context + per-question cache copies give the logits of the plain model forward."""
    torch.manual_seed(0)
    model, processor = build_untrained(seed=3)
    model.eval()
    enc = train_demo.Encoder(model, processor)
    rng = np.random.default_rng(0)
    items = []
    for i in range(2):
        scene = scenes.split_scene("train", i, 0)
        items.append((enc.pixels(scene), scenes.questions_for(scene, rng)))
    with torch.no_grad():
        logits, targets, visual = train_demo.forward_logits(model, enc, *train_demo.collate(enc, items))
        expected, want = [], []
        for (pixels, questions), scene in zip(items, [scenes.split_scene("train", i, 0) for i in range(2)]):
            frame = scenes.render_scene(scene)
            for q in questions:
                out = processor(images=[frame], text=[prompt(q.text, q.answer)], return_tensors="pt")
                ids = out["input_ids"]
                assert int((ids == model.config.image_token_id).sum()) == VISUAL_TOKENS
                full = model(input_ids=ids, pixel_values=out["pixel_values"],
                             pixel_attention_mask=out["pixel_attention_mask"]).logits[0]
                n = len(enc.ids(q.answer)) + 1  # answer tokens and the end token
                expected.append(full[-n - 1 : -1])
                want.append(ids[0, -n:])
    assert torch.equal(targets, torch.cat(want))
    assert visual.shape == (2, VISUAL_TOKENS, model.config.text_config.hidden_size)
    assert torch.allclose(logits, torch.cat(expected), atol=1e-4), (logits - torch.cat(expected)).abs().max()


def test_short_training_run_learns_and_its_store_answers(tmp_path):
    """A few steps lower the loss; the checkpoint converts and its store answers through the Session."""
    s = train_demo.Settings.scaled(seed=0, steps=20)
    s.images_per_step = 4
    logs = []
    train_demo.train(s, tmp_path / "ckpt", log=logs.append, eval_scenes=(8, 8))
    losses = [float(line.split("loss ")[1].split()[0]) for line in logs if line.startswith("step ")]
    assert len(losses) == 10 and losses[-1] < 0.9 * losses[0], logs  # a smoothed loss
    report = json.loads((tmp_path / "ckpt" / "training.json").read_text())
    assert report["settings"]["steps"] == 20 and 25 <= report["test"]["questions"] <= 32
    assert set(report["test"]) >= {"presence", "count", "position", "all"}
    from nchunk_core.convert import convert

    frames = train_demo.calibration_frames(tmp_path / "calib", seed=0, count=4)
    store = convert(tmp_path / "ckpt", tmp_path / "store", calib=frames, progress=False, log=lambda m: None)
    scene = scenes.split_scenes("test", 1)[0]
    with Session.open(store, SessionConfig(max_frames=1, max_new_tokens=4)) as session:
        session.append_frame(scenes.render_scene(scene))
        answer = session.ask("is there a red square?")
    assert answer.token_ids[-1] in session.stop_ids or answer.tokens_generated == 4
    assert answer.text in set(build_tokenizer().get_vocab()) | {""} or " " in answer.text
    assert SmolVLMAdapter.prompt_prefix in prompt("q")
