"""Scenes of coloured shapes, questions about them with their answers, and seeded dataset splits.

One generator serves the built-in model's training and test sets (demo_model.py, train_demo.py),
the synthetic camera (nchunk_ros/tools/synthetic_camera.py) and the accuracy benchmark, so the camera
shows exactly the kind of scene the model learned.

A scene is a plain background with one to four shapes (circle, square, triangle) in distinct
colours. The frame is split into `COLUMNS` × `ROWS` equal cells and each shape sits in its own
column, inside one cell of it (random row, size and offset), so "left of" and "right of" always
have one answer: the shape in the nearest occupied column on that side, or "nothing". The cells
are the built-in model's visual tokens (a 4 × 4 grid over the frame), so each shape is seen whole
by one token: a tiny vision tower learns to name them in a few hundred steps that way, against
more than two thousand when a shape can straddle tokens (docs/design.md, "Built-in model").

Questions (lower case, as the model's word-level tokenizer sees them) and answers:

    colour    "what color is the circle?"          -> "red"          (asked only of a unique shape)
    presence  "is there a red square?"             -> "yes" | "no"   (half of them "yes")
    count     "how many triangles are there?"      -> "0" … "4"
    position  "what is left of the blue circle?"   -> "green square" | "nothing"
    describe  "what shapes are there?"             -> "red circle green square"   (training aid; not
                                                      among KINDS, the kinds that are tested)

Splits: scene `i` of split `s` is drawn from `np.random.default_rng([seed, SPLIT_IDS[s], i])`.
Every split also drops any scene whose layout (`Scene.key`) occurs in a split listed before it in
`SPLIT_ORDER` (test, then validation, then training), so no scene of the test set is ever trained
or validated on; `test/test_scenes.py` checks it.
"""
from __future__ import annotations

import dataclasses
import json
import numpy as np

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 50, 170),
    "orange": (245, 140, 20),
}
BACKGROUNDS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
COLUMNS = 4  # a scene has at most one shape per column
ROWS = 4  # ... drawn inside one of this many cells of its column
KINDS = ("colour", "presence", "count", "position")
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
SPLIT_ORDER = ("test", "val", "train")  # a split never holds a layout of the splits before it
SIZE_RANGE = (0.6, 0.9)  # shape size as a fraction of min(cell width, cell height)


@dataclasses.dataclass(frozen=True)
class Shape:
    shape: str  # one of SHAPES
    color: str  # a key of COLORS
    center: tuple[int, int]  # (x, y) px
    size: int  # circle diameter, square side, triangle base and height (px)

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclasses.dataclass
class Scene:
    index: int
    width: int
    height: int
    background: str
    shapes: list[Shape]  # left to right (one per occupied column)

    @property
    def key(self) -> tuple:
        """The layout, independent of frame index: equal keys render equal frames."""
        return (self.width, self.height, self.background,
                tuple((s.shape, s.color, s.center, s.size) for s in self.shapes))

    def description(self) -> str:
        things = [f"{'an' if s.color[0] in 'aeiou' else 'a'} {s.name}" for s in self.shapes]
        listed = things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]
        return f"{listed} on a {self.background} background, left to right"

    def to_dict(self) -> dict:
        return {"scene": self.index, "width": self.width, "height": self.height,
                "background": self.background,
                "shapes": [dataclasses.asdict(s) | {"center": list(s.center)} for s in self.shapes],
                "description": self.description()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        shapes = [Shape(s["shape"], s["color"], tuple(s["center"]), int(s["size"])) for s in d["shapes"]]
        return cls(int(d.get("scene", 0)), int(d["width"]), int(d["height"]), d["background"], shapes)


@dataclasses.dataclass(frozen=True)
class Question:
    kind: str  # one of KINDS
    text: str
    answer: str


# ---------------------------------------------------------------- drawing


def random_scene(rng: np.random.Generator, width: int = 320, height: int = 240, index: int = 0,
                 max_shapes: int = COLUMNS) -> Scene:
    """One to `max_shapes` (≤ COLUMNS) shapes of distinct colours, one per random column, each
    inside a random cell (one of ROWS) of its column."""
    max_shapes = max(1, min(max_shapes, COLUMNS))
    count = int(rng.integers(1, max_shapes + 1))
    columns = np.sort(rng.choice(COLUMNS, size=count, replace=False))
    colors = rng.choice(list(COLORS), size=count, replace=False)
    col_w, row_h = width / COLUMNS, height / ROWS
    shapes = []
    for column, color in zip(columns, colors):
        size = max(4, int(min(col_w, row_h) * rng.uniform(*SIZE_RANGE)))
        slack_x = max(0.0, (col_w - size) / 2 - 1)
        slack_y = max(0.0, (row_h - size) / 2 - 1)
        row = int(rng.integers(ROWS))
        cx = int(round((column + 0.5) * col_w + rng.uniform(-slack_x, slack_x)))
        cy = int(round((row + 0.5) * row_h + rng.uniform(-slack_y, slack_y)))
        shapes.append(Shape(str(rng.choice(SHAPES)), str(color), (cx, cy), size))
    return Scene(index, width, height, str(rng.choice(list(BACKGROUNDS))), shapes)


def shape_masks(scene: Scene) -> list[np.ndarray]:
    """Where each shape is drawn, in scene order: bool [H, W] per shape (a later shape covers an
    earlier one where they meet, as in render_scene)."""
    y, x = np.mgrid[0:scene.height, 0:scene.width]
    masks = []
    for s in scene.shapes:
        cx, cy, half = s.center[0], s.center[1], s.size / 2.0
        if s.shape == "circle":
            mask = (x - cx) ** 2 + (y - cy) ** 2 <= half ** 2
        elif s.shape == "square":
            mask = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
        else:  # triangle, apex up: inside when below the apex and within the widening sides
            top, bottom = cy - half, cy + half
            rel = (y - top) / max(s.size, 1)  # 0 at the apex, 1 at the base
            mask = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= rel * half)
        masks.append(mask)
    return masks


def render_scene(scene: Scene) -> np.ndarray:
    """The scene as uint8 [H, W, 3] RGB."""
    img = np.empty((scene.height, scene.width, 3), np.uint8)
    img[:] = BACKGROUNDS[scene.background]
    for s, mask in zip(scene.shapes, shape_masks(scene)):
        img[mask] = COLORS[s.color]
    return img


# ---------------------------------------------------------------- questions


def neighbour(scene: Scene, target: Shape, side: str) -> str:
    """The shape next to `target` on `side` ("left"/"right") as "colour shape", or "nothing"."""
    i = scene.shapes.index(target)
    j = i - 1 if side == "left" else i + 1
    return scene.shapes[j].name if 0 <= j < len(scene.shapes) else "nothing"


def colour_question(scene: Scene, rng: np.random.Generator) -> Question | None:
    unique = [s for s in scene.shapes if sum(o.shape == s.shape for o in scene.shapes) == 1]
    if not unique:
        return None
    s = unique[int(rng.integers(len(unique)))]
    return Question("colour", f"what color is the {s.shape}?", s.color)


def presence_question(scene: Scene, rng: np.random.Generator) -> Question:
    present = {(s.color, s.shape) for s in scene.shapes}
    if rng.random() < 0.5:
        color, shape = sorted(present)[int(rng.integers(len(present)))]
    else:  # absent; half of them differ from a present shape in colour or shape only
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        near = [(c, s) for c, s in absent
                if any(c == pc or s == ps for pc, ps in present)]
        pool = near if near and rng.random() < 0.5 else absent
        color, shape = pool[int(rng.integers(len(pool)))]
    return Question("presence", f"is there a {color} {shape}?", "yes" if (color, shape) in present else "no")


def count_question(scene: Scene, rng: np.random.Generator) -> Question:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    n = sum(s.shape == shape for s in scene.shapes)
    return Question("count", f"how many {PLURALS[shape]} are there?", str(n))


def describe_question(scene: Scene) -> Question:
    """Every shape, left to right (a training aid: each answer word needs one column's shape)."""
    return Question("describe", "what shapes are there?", " ".join(s.name for s in scene.shapes))


def position_question(scene: Scene, rng: np.random.Generator) -> Question:
    target = scene.shapes[int(rng.integers(len(scene.shapes)))]
    side = "left" if rng.random() < 0.5 else "right"
    return Question("position", f"what is {side} of the {target.name}?", neighbour(scene, target, side))


MAKERS = {"colour": colour_question, "presence": presence_question, "count": count_question,
          "position": position_question}


def questions_for(scene: Scene, rng: np.random.Generator) -> list[Question]:
    """One question of each kind that the scene allows (colour needs a shape that occurs once)."""
    out = [MAKERS[kind](scene, rng) for kind in KINDS]
    return [q for q in out if q is not None]


# ---------------------------------------------------------------- splits


def split_scene(split: str, index: int, seed: int = 0, width: int = 320, height: int = 240,
                max_shapes: int = COLUMNS) -> Scene:
    """Scene `index` of `split`, before the overlap filter of `split_scenes`."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    return random_scene(rng, width, height, index, max_shapes)


def split_scenes(split: str, count: int, seed: int = 0, width: int = 320, height: int = 240,
                 exclude: set | None = None) -> list[Scene]:
    """The first `count` scenes of `split` whose layouts are not in `exclude` (nor repeated)."""
    seen = set(exclude or ())
    out, index = [], 0
    while len(out) < count:
        scene = split_scene(split, index, seed, width, height)
        index += 1
        if scene.key not in seen:
            seen.add(scene.key)
            out.append(scene)
    return out


def question_set(scenes: list[Scene], seed: int, split: str) -> list[tuple[Scene, list[Question]]]:
    """Every scene with one question of each kind it allows, drawn with a seeded generator."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], 1_000_003])
    return [(scene, questions_for(scene, rng)) for scene in scenes]

