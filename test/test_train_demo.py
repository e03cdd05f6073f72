"""The built-in model's training pipeline: tokenizer, batches, shared-context forward, a short run."""
import json

import numpy as np
import torch

from nchunk_core.demo import batches, scenes, train as train_demo, training_aids
from nchunk_core.demo.train_settings import Settings
from nchunk_core.demo.model import VISUAL_TOKENS, build_tokenizer, build_untrained, prompt
from nchunk_core.runtime.adapters import SmolVLMAdapter
from nchunk_core.runtime.session import Session, SessionConfig


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
    enc = batches.Encoder(model, processor)
    rng = np.random.default_rng(0)
    items = []
    for i in range(2):
        scene = scenes.split_scene("train", i, 0)
        items.append((enc.pixels(scene), scenes.questions_for(scene, rng)))
    with torch.no_grad():
        pixels, owners, ids, labels, *_ = batches.collate(enc, items)
        hidden, visual, _ = train_demo.forward_hidden(model, enc, pixels, owners, ids)
        logits, targets = train_demo.labelled_logits(model, hidden, labels)
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


def test_early_answer_labels_sit_on_the_last_shape_word():
    """The early-answer aid: the answer's first word, at the question's last shape word only."""
    model, processor = build_untrained(seed=0)
    enc = batches.Encoder(model, processor)
    questions = [scenes.Question("colour", "what color is the circle?", "red"),
                 scenes.Question("position", "what is left of the blue square?", "green triangle"),
                 scenes.Question("count", "how many triangles are there?", "2"),
                 scenes.Question("presence", "is there a purple circle?", "no"),
                 scenes.describe_question(scenes.split_scene("train", 0))]
    _, _, ids, labels, early, subject = batches.collate(enc, [(torch.zeros(3, 96, 96), questions)])
    tok = processor.tokenizer
    for row, q in enumerate(questions[:4]):
        (where,) = (early[row] != -100).nonzero()[:, 0].tolist()
        assert tok.convert_ids_to_tokens(int(ids[row, where])) in {"circle", "square", "triangles"}
        assert tok.convert_ids_to_tokens(int(early[row, where])) == q.answer.split()[0]
        assert labels[row, where] == -100  # no answer loss inside the question
    assert (early[4] == -100).all()  # the description names no single shape
    shape = {sh: scenes.SHAPES.index(sh) + 1 for sh in scenes.SHAPES}
    colour = {c: k + 1 for k, c in enumerate(scenes.COLORS)}
    assert subject.tolist() == [[shape["circle"], 0, 0], [shape["square"], colour["green"], 0], [0, 0, 0],
                                [shape["circle"], 0, colour["purple"]], [0, 0, 0]]


def test_attention_hint_loss_is_small_only_when_the_heads_look_at_the_right_tokens():
    scene = scenes.Scene(0, 320, 240, "white", [scenes.Shape("circle", "red", (40, 30), 40),
                                                scenes.Shape("square", "blue", (280, 200), 40)])
    targets = training_aids.probe_targets(scene)[None]  # [1, 16, 4, 2]: circle in token 0, square in 15
    early = torch.full((1, 5), -100)
    early[0, 2] = 7  # the shape word sits at position 2
    colour = {c: k + 1 for k, c in enumerate(scenes.COLORS)}
    subject = torch.tensor([[scenes.SHAPES.index("square") + 1, colour["red"], colour["blue"]]])
    right = torch.zeros(1, 3, 5, 16)
    right[0, 0, 2, 15] = 1.0  # hint 0 on the square
    right[0, 1, 2, 0] = 1.0  # hint 1 on the red neighbour
    right[0, 2, 2, 15] = 1.0  # hint 2 on the blue shape
    wrong = right.flip(-1)  # the same mass on the other shape's token
    uniform = torch.full((1, 3, 5, 16), 1 / 16)
    loss = lambda seen, subject=subject: float(training_aids.attention_hint_loss(seen, early, subject, targets))
    assert loss(right) < 1e-4
    assert abs(loss(uniform) - 3 * np.log(16)) < 1e-3
    assert loss(wrong) > 10
    absent = subject.clone()
    absent[0, 2] = colour["green"]  # a colour the scene does not show: that hint drops out
    assert abs(loss(uniform, absent) - 2 * np.log(16)) < 1e-3


def test_probe_targets_name_area_column_and_neighbours():
    """Token t covers a quarter of the frame's width and height; column t % 4."""
    shapes = [scenes.Shape("circle", "red", (40, 30), 40),  # column 0, top token row
              scenes.Shape("triangle", "blue", (280, 200), 60)]  # column 3, bottom rows
    scene = scenes.Scene(0, 320, 240, "white", shapes)
    t = training_aids.probe_targets(scene)  # [16, 4, 2]
    red_circle = [list(scenes.COLORS).index("red") + 1, scenes.SHAPES.index("circle") + 1]
    blue_triangle = [list(scenes.COLORS).index("blue") + 1, scenes.SHAPES.index("triangle") + 1]
    assert t[0, 0].tolist() == red_circle and t[4, 0].tolist() == [0, 0]  # area: only the top token
    assert t[15, 0].tolist() == blue_triangle and t[3, 0].tolist() == [0, 0]
    assert all(t[k, 1].tolist() == red_circle for k in (0, 4, 8, 12))  # column: every row
    assert t[1, 1].tolist() == [0, 0] and t[1, 2].tolist() == red_circle and t[1, 3].tolist() == blue_triangle
    assert t[0, 2].tolist() == [0, 0] and t[0, 3].tolist() == blue_triangle  # nearest occupied column
    assert t[7, 2].tolist() == red_circle and t[7, 3].tolist() == [0, 0]


def test_short_training_run_learns_and_its_store_answers(tmp_path):
    """A few steps lower the loss; the checkpoint converts and its store answers through the Session."""
    s = Settings.scaled(seed=0, steps=20)
    s.images_per_step = 4
    logs = []
    train_demo.train(s, tmp_path / "ckpt", log=logs.append, eval_scenes=(8, 8))
    losses = [float(line.split("loss ")[1].split()[0]) for line in logs if line.startswith("step ")]
    assert len(losses) == 10 and losses[-1] < 0.9 * losses[0], logs  # a smoothed loss
    report = json.loads((tmp_path / "ckpt" / "training.json").read_text())
    assert report["settings"]["steps"] == 20 and 25 <= report["test"]["questions"] <= 32
    assert set(report["test"]) >= {"presence", "count", "position", "all"}
    from nchunk_core.convert.converter import convert

    frames = train_demo.calibration_frames(tmp_path / "calib", seed=0, count=4)
    store = convert(tmp_path / "ckpt", tmp_path / "store", calib=frames, progress=False, log=lambda m: None)
    scene = scenes.split_scenes("test", 1)[0]
    with Session.open(store, SessionConfig(max_frames=1, max_new_tokens=4)) as session:
        session.append_frame(scenes.render_scene(scene))
        answer = session.ask("is there a red square?")
    assert answer.token_ids[-1] in session.stop_ids or answer.tokens_generated == 4
    assert answer.text in set(build_tokenizer().get_vocab()) | {""} or " " in answer.text
    assert SmolVLMAdapter.prompt_prefix in prompt("q")
