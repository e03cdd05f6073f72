"""The scene generator: layouts, rendering, questions and answers, and disjoint seeded splits."""
import numpy as np
import pytest

from nchunk_core.demo import scenes
from nchunk_core.demo.scenes import COLORS, COLUMNS, Question, Scene, Shape


def test_layout_one_shape_per_column_each_inside_one_cell():
    rng = np.random.default_rng(0)
    cell_w, cell_h = 320 / COLUMNS, 240 / scenes.ROWS
    rows = set()
    for _ in range(300):
        s = scenes.random_scene(rng, 320, 240)
        assert 1 <= len(s.shapes) <= COLUMNS
        assert len({sh.color for sh in s.shapes}) == len(s.shapes)
        columns = [int(sh.center[0] // cell_w) for sh in s.shapes]
        assert columns == sorted(set(columns))  # distinct columns, left to right
        for sh, column in zip(s.shapes, columns):
            row = int(sh.center[1] // cell_h)
            rows.add(row)
            half = sh.size / 2
            assert column * cell_w <= sh.center[0] - half and sh.center[0] + half <= (column + 1) * cell_w
            assert row * cell_h <= sh.center[1] - half and sh.center[1] + half <= (row + 1) * cell_h
    assert rows == set(range(scenes.ROWS))


def test_render_draws_each_shape_in_its_colour():
    scene = Scene(0, 320, 240, "white", [Shape("circle", "red", (40, 120), 60),
                                         Shape("square", "blue", (200, 60), 50),
                                         Shape("triangle", "green", (280, 180), 60)])
    img = scenes.render_scene(scene)
    assert img.shape == (240, 320, 3) and img.dtype == np.uint8
    assert tuple(img[120, 40]) == COLORS["red"]
    assert tuple(img[60, 200]) == COLORS["blue"]
    assert tuple(img[195, 280]) == COLORS["green"]  # near the triangle's base
    assert tuple(img[152, 255]) == scenes.BACKGROUNDS["white"]  # beside the apex: background
    assert tuple(img[93, 43 - 29]) == scenes.BACKGROUNDS["white"]  # outside the circle, inside its box


def test_answers_follow_the_scene():
    scene = Scene(0, 320, 240, "gray", [Shape("circle", "red", (40, 100), 50),
                                        Shape("circle", "blue", (120, 100), 50),
                                        Shape("triangle", "yellow", (280, 100), 50)])
    rng = np.random.default_rng(1)
    assert scenes.neighbour(scene, scene.shapes[1], "left") == "red circle"
    assert scenes.neighbour(scene, scene.shapes[1], "right") == "yellow triangle"
    assert scenes.neighbour(scene, scene.shapes[0], "left") == "nothing"
    assert scenes.describe_question(scene).answer == "red circle blue circle yellow triangle"
    for _ in range(50):
        q = scenes.colour_question(scene, rng)  # only the triangle is unique
        assert q == Question("colour", "what color is the triangle?", "yellow")
        c = scenes.count_question(scene, rng)
        assert c.answer == {"how many circles are there?": "2", "how many squares are there?": "0",
                            "how many triangles are there?": "1"}[c.text]
        p = scenes.presence_question(scene, rng)
        color, shape = p.text[len("is there a "):-1].split()
        present = any(s.color == color and s.shape == shape for s in scene.shapes)
        assert p.answer == ("yes" if present else "no")
    twins = Scene(0, 320, 240, "gray", [Shape("square", "red", (40, 100), 50),
                                        Shape("square", "blue", (120, 100), 50)])
    assert scenes.colour_question(twins, rng) is None
    assert [q.kind for q in scenes.questions_for(twins, rng)] == ["presence", "count", "position"]


def test_presence_is_balanced():
    rng = np.random.default_rng(2)
    answers = [scenes.presence_question(scenes.random_scene(rng), rng).answer for _ in range(2000)]
    assert 0.45 < answers.count("yes") / len(answers) < 0.55


def test_splits_are_seeded_and_disjoint():
    test = scenes.split_scenes("test", 400, seed=0)
    again = scenes.split_scenes("test", 400, seed=0)
    assert [s.key for s in test] == [s.key for s in again]
    assert [s.key for s in scenes.split_scenes("test", 50, seed=1)] != [s.key for s in test[:50]]
    val = scenes.split_scenes("val", 300, 0, exclude={s.key for s in test})
    held = {s.key for s in test} | {s.key for s in val}
    assert len(held) == 700  # no repeats within or across the held-out splits
    train = [scenes.split_scene("train", i, 0) for i in range(3000)]
    assert not held & {s.key for s in train}
    # A layout put into the exclusion set is skipped: the split moves on to the next scene.
    first = scenes.split_scene("val", 0, 0)
    shifted = scenes.split_scenes("val", 2, 0, exclude={first.key})
    assert first.key not in {s.key for s in shifted}


def test_question_sets_cover_every_kind_and_round_trip_json():
    pairs = scenes.question_set(scenes.split_scenes("test", 100), 0, "test")
    kinds = {q.kind for _, questions in pairs for q in questions}
    assert kinds == set(scenes.KINDS)
    scene = pairs[0][0]
    assert Scene.from_dict(scene.to_dict()).key == scene.key


@pytest.mark.parametrize("size", [(96, 64), (640, 480), (32, 16)])
def test_any_frame_size_renders(size):
    w, h = size
    s = scenes.random_scene(np.random.default_rng(3), w, h)
    assert scenes.render_scene(s).shape == (h, w, 3)
