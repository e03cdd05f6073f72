"""Training aids of the built-in model: signals on positions and weights the runtime never reads.

- `SceneProbe`: linear heads on the visual tokens that name the shapes around each token
  (`probe_targets` gives what they should say); it is discarded after training.
- Attention hints (`HINTS`, `attention_hint_loss`): at a question's last shape word, chosen attention
  heads look at the visual tokens that show what the question is about.

The early answer (the answer's first word predicted at that shape word) is a label that `collate`
(batches.py) builds; train.py weighs all of them beside the answer loss.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nchunk_core.demo import scenes

# Class ids of the probe targets and the attention hints (0: none)
COLOUR_CLASS = {c: k + 1 for k, c in enumerate(scenes.COLORS)}
SHAPE_CLASS = {sh: k + 1 for k, sh in enumerate(scenes.SHAPES)}
# Attention hints (attention_hint_loss): at a question's last shape word, hint k's head looks at
# the visual tokens whose area shows the class in column k of collate's `subject`, a colour or a
# shape class (`field` 0 or 1 of the probe's area slot).
HINTS = (  # (layer, head, field)
    (0, 0, 1),  # the shape named (not in count questions)
    (1, 0, 0),  # position: the neighbour that the answer names
    (1, 1, 0),  # presence: the shape in the colour named, if the scene has that colour
)


class SceneProbe(nn.Module):
    """Training aid, not part of the model: every visual token names the shapes around it.

    Visual tokens are a 4 × 4 grid in row-major order (pixel shuffle of the 12 × 12 patch grid), each
    over a quarter of the frame's width and height, so token t lies in scene column t % 4. Linear
    heads on each token name the colour and shape in four slots (class 0: none): the shape drawn in
    the token's own area, the shape of its column, and the nearest shape to the left and to the
    right of that column: what colour, presence, count and position questions ask about. It gives
    the vision tower a direct signal, which it otherwise gets only through the language model.
    """

    GRID = 4
    SLOTS = 4  # token area, column, left neighbour, right neighbour

    def __init__(self, hidden: int):
        super().__init__()
        self.colour = nn.Linear(hidden, self.SLOTS * (len(scenes.COLORS) + 1))
        self.shape = nn.Linear(hidden, self.SLOTS * (len(scenes.SHAPES) + 1))

    def logits(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """visual [B, 16, hidden] → colour logits [B, 16, 4, 7] and shape logits [B, 16, 4, 4]."""
        b, t, _ = visual.shape
        return (self.colour(visual).reshape(b, t, self.SLOTS, -1),
                self.shape(visual).reshape(b, t, self.SLOTS, -1))

    def loss(self, visual: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """visual [B, 16, hidden], targets [B, 16, 4, 2] (probe_targets) → scalar."""
        colour, shape = self.logits(visual)
        return (F.cross_entropy(colour.flatten(0, 2), targets[..., 0].flatten())
                + F.cross_entropy(shape.flatten(0, 2), targets[..., 1].flatten())) / 2

    @torch.no_grad()
    def accuracy(self, visual: torch.Tensor, targets: torch.Tensor) -> list[float]:
        """Fraction of (token, slot) pairs with colour and shape both right, per slot [4]."""
        colour, shape = self.logits(visual)
        right = (colour.argmax(-1) == targets[..., 0]) & (shape.argmax(-1) == targets[..., 1])
        return right.float().mean((0, 1)).tolist()


def probe_targets(scene: scenes.Scene, min_share: float = 0.15) -> torch.Tensor:
    """[16 tokens, 4 slots, 2] long: (colour class, shape class) for each SceneProbe slot, 0 for none.

    A token's own area shows a shape when at least `min_share` of the shape's pixels lie in it (the
    shape with the most pixels there wins)."""
    grid = SceneProbe.GRID
    classes = [torch.tensor([COLOUR_CLASS[sh.color], SHAPE_CLASS[sh.shape]]) for sh in scene.shapes]
    where = [min(grid - 1, int(sh.center[0] * grid // scene.width)) for sh in scene.shapes]
    out = torch.zeros(grid * grid, SceneProbe.SLOTS, 2, dtype=torch.long)
    most = np.zeros(grid * grid)
    h, w = scene.height // grid * grid, scene.width // grid * grid
    for k, mask in enumerate(scenes.shape_masks(scene)):
        area = mask[:h, :w].reshape(grid, h // grid, grid, w // grid).sum((1, 3)).reshape(-1)  # [16]
        for t in np.nonzero((area >= min_share * max(1, mask.sum())) & (area > most))[0]:
            most[t] = area[t]
            out[t, 0] = classes[k]
    for t in range(grid * grid):
        column = t % grid
        left = [k for k, c in enumerate(where) if c < column]
        right = [k for k, c in enumerate(where) if c > column]
        if column in where:
            out[t, 1] = classes[where.index(column)]
        if left:
            out[t, 2] = classes[left[-1]]
        if right:
            out[t, 3] = classes[right[0]]
    return out


def attention_hint_loss(seen, early, subject, targets) -> torch.Tensor:
    """Training aid: at a question's shape word, the heads of `HINTS` look at the visual tokens that
    show what the question is about.

    seen [N, len(HINTS), T, 16]: those heads' attention of each question row on the visual tokens;
    early [N, T] marks the shape word (collate); subject [N, len(HINTS)] the class each hint looks
    for (0: none); targets [N, 16, 4, 2] the probe targets of each row's image. The loss is -log of
    the attention mass on the right tokens (from their area slot), summed over the hints; rows with
    nothing to look for, or whose scene shows none of it, are left out.
    """
    rows, where = (early != -100).nonzero(as_tuple=True)
    area = targets[rows, :, 0]  # [R, 16, 2]: colour and shape class shown in each token's area
    total = seen.sum() * 0.0
    for k, (_, _, field) in enumerate(HINTS):
        want = subject[rows, k, None]
        hits = (area[..., field] == want) & (want > 0)  # [R, 16]
        keep = hits.any(1)
        if keep.any():
            mass = (seen[rows, k, where] * hits).sum(1)[keep]
            total = total - torch.log(mass + 1e-6).mean()
    return total
