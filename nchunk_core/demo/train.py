"""Train the built-in demo model from scratch and convert it to the shipped store.

    nchunk train-demo                      # the shipped model: seed 0, default schedule
    nchunk train-demo --steps 300 --out /tmp/try --no-convert   # a quick look

Data (scenes.py): an endless stream of training scenes, rendered at the camera's 320×240 and put
through the model's own processor, so the model sees exactly what the runtime feeds it. Every scene
gives one question of each kind, another colour, presence and position question, and "what shapes are
there?" answered with every shape left to right. Validation and test scenes are drawn from their
own seeds, and the training stream skips their layouts. Scenes hold at most two shapes for the
first `curriculum_steps`, three for as many again, then up to four.

Two phases:

1. Vision (`pretrain_vision`): the vision tower and connector alone learn, from a linear probe on
   the visual tokens (SceneProbe, not saved), to name the shape in each token's area, in its
   column and in the nearest columns on either side.
2. Joint: the answer loss, plus three training aids that act on positions and weights the runtime
   never reads: the probe; the early answer (the answer's first word predicted already at the
   question's last shape word, "circle" in "what color is the circle?"); and the attention hints
   (at that word, attention heads look at the visual tokens that answer: `HINTS`).
   Without them the language model sits near the answer priors for thousands of steps: finding
   "the circle" among the visual tokens and then carrying its colour to the answer are two steps
   that each learn only once the other works. The aids give each step its own signal.

Batches: the vision tower runs once per image; its visual tokens are copied into every question
sequence of that image, which holds the same ids as the runtime's conversation (prefix, frame
chunk, question chunk; demo_model.prompt) followed by the answer and <end_of_utterance>. The answer
loss is the cross-entropy of the answer tokens and the end token. Greedy decoding gives the right
answer exactly when every one of those tokens is the argmax, which is how accuracy is counted.

Schedule: AdamW, linear warm-up then cosine decay; a background thread renders the next batches.
Output: the Hugging Face checkpoint (model, tokenizer, processor, generation config) in `--out`,
`training.json` with the settings, the time and the accuracy per kind on the validation and test
sets, training_curve.png, and unless --no-convert the store (calibrated on training scenes) in
`--store`. With the defaults this takes about TRAIN_MINUTES minutes on two CPU cores (README).
"""
from __future__ import annotations

import dataclasses
import json
import math
import queue
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from nchunk_core.demo import scenes
from nchunk_core.demo.model import build_untrained, shipped_store
from nchunk_core.runtime.adapters import SmolVLMAdapter

FRAME_W, FRAME_H = 320, 240  # the synthetic camera's default frame
VAL_SCENES, TEST_SCENES = 300, 500
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


@dataclasses.dataclass
class Settings:
    seed: int = 0
    steps: int = 6000
    images_per_step: int = 16
    lr: float = 2e-3
    warmup: int = 150
    weight_decay: float = 0.01
    curriculum_steps: int = 1000  # scenes hold ≤ 2 shapes before this step, ≤ 3 until twice it
    eval_every: int = 500
    probe_weight: float = 0.5  # weight of the SceneProbe loss beside the answer loss
    early_weight: float = 0.5  # weight of the early-answer loss (collate) beside the answer loss
    hint_weight: float = 0.5  # weight of the attention hints (attention_hint_loss)
    vision_steps: int = 500  # phase 1: vision tower and connector trained on the SceneProbe alone
    vision_scenes: int = 2400  # phase 1 draws its batches from this many rendered training scenes

    @classmethod
    def scaled(cls, seed: int = 0, steps: int | None = None) -> "Settings":
        """Defaults, with warm-up, curriculum and evaluation shortened for a run of fewer steps."""
        d = cls()
        steps = d.steps if steps is None else steps
        return cls(seed=seed, steps=steps, warmup=min(d.warmup, steps // 10),
                   curriculum_steps=min(d.curriculum_steps, steps // 6), eval_every=min(d.eval_every, steps),
                   vision_steps=min(d.vision_steps, steps // 3), vision_scenes=min(d.vision_scenes, 4 * steps))


class Encoder:
    """Turns (scene, question, answer) into the runtime's token ids and pixels."""

    def __init__(self, model, processor):
        self.adapter = SmolVLMAdapter(model, processor)
        self.tok = processor.tokenizer
        frame = self.adapter.encode_frame(np.zeros((FRAME_H, FRAME_W, 3), np.uint8))
        prefix = self.adapter.encode_text(SmolVLMAdapter.prompt_prefix).input_ids[0]
        self.context = torch.cat([prefix, frame.input_ids[0]])  # [C] prefix + frame chunk
        where = (self.context == self.adapter.image_token_id).nonzero()[:, 0]
        self.image_slice = slice(int(where[0]), int(where[-1]) + 1)
        self.eos = self.tok.convert_tokens_to_ids("<end_of_utterance>")
        # shape word ids → SHAPE_CLASS; a question's last one is where the aids act (collate)
        self.shape_of = {self.tok.convert_tokens_to_ids(w): SHAPE_CLASS[sh] for sh in scenes.SHAPES
                         for w in (sh, scenes.PLURALS[sh])}
        self._cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def pixels(self, scene: scenes.Scene) -> torch.Tensor:
        """[3, S, S] float32: the scene rendered and preprocessed like a camera frame."""
        chunk = self.adapter.encode_frame(scenes.render_scene(scene))
        return chunk.vision["pixel_values"][0, 0]

    def sequence(self, q: scenes.Question) -> tuple[list[int], int, int | None]:
        """Token ids after the context (question chunk, answer, end), how many are targets, and the
        index of the question's last shape word (None for the description, which names none)."""
        question = self.ids(self.adapter.question_prompt(q.text))
        answer = self.ids(q.answer) + [self.eos]
        objects = [i for i, t in enumerate(question) if t in self.shape_of]
        return question + answer, len(answer), objects[-1] if objects and q.kind in scenes.KINDS else None


def collate(encoder: Encoder, items: list[tuple[torch.Tensor, list[scenes.Question]]]):
    """→ pixels [B, 3, S, S], owner image [N], question-part ids [N, T], labels [N, T], early [N, T],
    subject [N, 3].

    Row r is the part of question r after the shared context (prefix + frame chunk): question chunk,
    answer, end token, right-padded. labels[r, t] is the token that position t must predict (-100:
    no loss). early[r, t] is the answer's first token at the question's last shape word ("circle" in
    "what color is the circle?"), -100 elsewhere: the early-answer training aid (see train).
    subject[r] is what the attention hints look for (HINTS), 0 for none: [r, 0] the SHAPE_CLASS of
    that word (not for count questions, where all of the attention on the shape would hide how many
    there are), [r, 1] the COLOUR_CLASS of the shape that a position question's answer names,
    [r, 2] the COLOUR_CLASS that a presence question names.
    """
    pixels = torch.stack([p for p, _ in items])
    owners = [i for i, (_, qs) in enumerate(items) for _ in qs]
    questions = [q for _, qs in items for q in qs]
    seqs = [encoder.sequence(q) for q in questions]
    width = max(len(row) for row, *_ in seqs)
    ids = torch.full((len(seqs), width), encoder.tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    early = torch.full_like(labels, -100)
    subject = torch.zeros(len(seqs), len(HINTS), dtype=torch.long)
    for r, ((row, n_target, obj), q) in enumerate(zip(seqs, questions)):
        ids[r, : len(row)] = torch.tensor(row)
        labels[r, len(row) - n_target - 1 : len(row) - 1] = torch.tensor(row[-n_target:])
        if obj is not None:
            early[r, obj] = row[-n_target]
            if q.kind != "count":  # a count is read from how much of the attention the shape takes
                subject[r, 0] = encoder.shape_of[row[obj]]
        if q.kind == "position" and q.answer != "nothing":
            subject[r, 1] = COLOUR_CLASS[q.answer.split()[0]]
        if q.kind == "presence":  # "is there a red square?"
            subject[r, 2] = COLOUR_CLASS[q.text.split()[-2]]
    return pixels, torch.tensor(owners), ids, labels, early, subject


def forward_hidden(model, encoder: Encoder, pixels, owners, ids, attention: bool = False):
    """Last hidden states [N, T, hidden] of the question rows, the visual tokens [B, 16, hidden] and,
    with `attention`, the attention of the question rows on the visual tokens in the heads of
    `HINTS` [N, len(HINTS), T, 16] (the model must run with eager attention for that).

    The vision tower and the shared context run once per image; each question then runs on a copy
    of its image's KV cache (the runtime's order of work: frame appended, then the question).
    """
    inner = model.model
    text = inner.text_model
    embed = text.get_input_embeddings()
    vision = inner.vision_model(pixel_values=pixels).last_hidden_state  # [B, 144, 96]
    visual = inner.connector(vision)  # [B, 16, hidden]
    context = embed(encoder.context)[None].repeat(len(pixels), 1, 1)  # [B, C, hidden]
    context[:, encoder.image_slice] = visual.to(context.dtype)
    cache = DynamicCache()
    text(inputs_embeds=context, cache=cache, use_cache=True)
    cache.reorder_cache(owners)  # [B, …] → [N, …]: one copy per question
    c, t = len(encoder.context), ids.shape[1]
    positions = torch.arange(c, c + t)[None].expand(len(ids), -1)  # [N, T]
    out = text(inputs_embeds=embed(ids), position_ids=positions, cache=cache, use_cache=True,
               output_attentions=attention)
    seen = (torch.stack([out.attentions[layer][:, head, :, encoder.image_slice] for layer, head, _ in HINTS], 1)
            if attention else None)  # [N, len(HINTS), T, 16]
    return out.last_hidden_state, visual, seen  # [N, T, hidden]


def labelled_logits(model, hidden, labels):
    """Logits [M, V] at the M positions where labels [N, T] is not -100, and those labels [M]."""
    mask = labels != -100
    return model.lm_head(hidden[mask]), labels[mask]


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


def scene_questions(scene: scenes.Scene, rng: np.random.Generator) -> list[scenes.Question]:
    """Training questions of a scene: one of each kind it allows, another colour, presence and
    position question (the kinds that need the model to bind a colour to one shape, which it
    learns last), and the description (every shape named in order)."""
    more = [scenes.colour_question(scene, rng), scenes.presence_question(scene, rng),
            scenes.position_question(scene, rng), scenes.describe_question(scene)]
    return scenes.questions_for(scene, rng) + [q for q in more if q is not None]


class Batches:
    """Training batches rendered by a background thread (the step's arithmetic runs meanwhile)."""

    def __init__(self, encoder: Encoder, s: Settings, held_out: set):
        self.encoder, self.s, self.held_out = encoder, s, held_out
        self.queue: queue.Queue = queue.Queue(maxsize=3)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="batches")
        self._thread.start()

    def _max_shapes(self, step: int) -> int:
        c = self.s.curriculum_steps
        return 2 if step < c else 3 if step < 2 * c else scenes.COLUMNS

    def _run(self) -> None:
        rng = np.random.default_rng([self.s.seed, 7])
        index = 0
        for step in range(self.s.steps):
            try:
                items, columns = [], []
                while len(items) < self.s.images_per_step:
                    scene = scenes.split_scene("train", index, self.s.seed, FRAME_W, FRAME_H,
                                               self._max_shapes(step))
                    index += 1
                    if scene.key in self.held_out:
                        continue
                    items.append((self.encoder.pixels(scene), scene_questions(scene, rng)))
                    columns.append(probe_targets(scene))
                batch = collate(self.encoder, items), torch.stack(columns)
            except BaseException as e:  # handed to the training loop, which raises it
                batch = e
            while not self._stop.is_set():
                try:
                    self.queue.put(batch, timeout=0.5)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set():
                return

    def __iter__(self):
        for _ in range(self.s.steps):
            batch = self.queue.get()
            if isinstance(batch, BaseException):
                raise RuntimeError("rendering a training batch failed") from batch
            yield batch

    def close(self) -> None:
        self._stop.set()


def encode_set(encoder: Encoder, question_set: list[tuple[scenes.Scene, list[scenes.Question]]]):
    """A question set (scenes.question_set) as [(pixels [3, S, S], questions of that scene)]."""
    return [(encoder.pixels(scene), questions) for scene, questions in question_set]


@torch.no_grad()
def evaluate(model, encoder: Encoder, items, scenes_per_batch: int = 64) -> dict[str, float]:
    """Exact-match accuracy per question kind, overall ("all"), and the number of questions."""
    model.eval()
    right = {k: 0 for k in scenes.KINDS}
    total = {k: 0 for k in scenes.KINDS}
    for start in range(0, len(items), scenes_per_batch):
        part = items[start : start + scenes_per_batch]
        pixels, owners, ids, labels, *_ = collate(encoder, part)
        hidden, *_ = forward_hidden(model, encoder, pixels, owners, ids)
        logits, targets = labelled_logits(model, hidden, labels)
        rows = (labels != -100).nonzero()[:, 0]  # the question row of every target
        wrong = torch.zeros(len(ids), dtype=torch.long).index_add_(0, rows, (logits.argmax(-1) != targets).long())
        for q, bad in zip([q for _, qs in part for q in qs], wrong.tolist()):
            total[q.kind] += 1
            right[q.kind] += bad == 0
    model.train()
    acc = {k: right[k] / total[k] for k in scenes.KINDS if total[k]}
    acc["all"] = sum(right.values()) / max(1, sum(total.values()))
    acc["questions"] = sum(total.values())
    return acc


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


def lr_at(step: int, s: Settings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    t = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def held_out_sets(encoder: Encoder, seed: int, val_scenes: int, test_scenes: int):
    """Encoded validation and test sets, and every held-out layout (training skips them)."""
    test = scenes.split_scenes("test", test_scenes, seed, FRAME_W, FRAME_H)
    val = scenes.split_scenes("val", val_scenes, seed, FRAME_W, FRAME_H, {s.key for s in test})
    keys = {s.key for s in test} | {s.key for s in val}
    return (encode_set(encoder, scenes.question_set(val, seed, "val")),
            encode_set(encoder, scenes.question_set(test, seed, "test")), keys)


def pretrain_vision(model, probe: SceneProbe, encoder: Encoder, s: Settings, held_out: set, log) -> list[float]:
    """Phase 1: the vision tower and connector learn to see from the SceneProbe alone.

    Each shape lies inside one token's area (scenes.py), so naming the shape in a token's area is
    a local task: a few hundred steps of the probe alone, at a quarter of a joint step's cost, and
    the language model starts on visual tokens that already name colour and shape.
    Batches come from a fixed pool of `vision_scenes` rendered training scenes (rendering costs more
    than the step); up to 256 more scenes measure the probe. Returns the probe accuracy per slot.
    """
    pool, targets, index = [], [], 0
    while len(pool) < s.vision_scenes + min(256, s.vision_scenes):
        scene = scenes.split_scene("train", 20_000_000 + index, s.seed, FRAME_W, FRAME_H)
        index += 1
        if scene.key not in held_out:
            pool.append(encoder.pixels(scene))
            targets.append(probe_targets(scene))
    pixels, targets = torch.stack(pool), torch.stack(targets)  # [P, 3, S, S], [P, 16, 4, 2]
    see = lambda x: model.model.connector(model.model.vision_model(pixel_values=x).last_hidden_state)
    params = [*model.model.vision_model.parameters(), *model.model.connector.parameters(), *probe.parameters()]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    pick = torch.Generator().manual_seed(s.seed)
    accuracy = [0.0] * SceneProbe.SLOTS
    for step in range(s.vision_steps):
        batch = torch.randint(0, s.vision_scenes, (s.images_per_step,), generator=pick)
        loss = probe.loss(see(pixels[batch]), targets[batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % max(1, s.vision_steps // 8) == 0 or step + 1 == s.vision_steps:
            with torch.no_grad():
                accuracy = probe.accuracy(see(pixels[s.vision_scenes:]), targets[s.vision_scenes:])
            log(f"vision {step + 1}/{s.vision_steps}  probe loss {loss.item():.3f}  accuracy (area, column, "
                f"left, right) {' '.join(f'{a:.3f}' for a in accuracy)}")
    return accuracy


def fmt(acc: dict) -> str:
    return " ".join(f"{k} {acc[k]:.3f}" for k in (*scenes.KINDS, "all") if k in acc)


def train(s: Settings, out: Path, log=print, eval_scenes: tuple[int, int] = (VAL_SCENES, TEST_SCENES)):
    """Train, save the checkpoint to `out`, return (model, processor, report dict).

    `eval_scenes`: sizes of the validation and test sets (the defaults are the published figures).
    """
    torch.manual_seed(s.seed)
    model, processor = build_untrained(s.seed)
    model.train()
    encoder = Encoder(model, processor)
    t0 = time.perf_counter()
    val, test, held_out = held_out_sets(encoder, s.seed, *eval_scenes)
    log(f"held out: {sum(len(q) for _, q in val)} validation and {sum(len(q) for _, q in test)} test questions "
        f"({eval_scenes[0]} and {eval_scenes[1]} scenes); "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    probe = SceneProbe(model.config.text_config.hidden_size)
    vision_accuracy = pretrain_vision(model, probe, encoder, s, held_out, log)
    attention = model.config._attn_implementation
    model.set_attn_implementation("eager")  # the attention hint reads attention weights
    named = [*model.named_parameters(), *probe.named_parameters(prefix="probe")]
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.98))
    batches = Batches(encoder, s, held_out)
    history, running = [], None
    try:
        for step, batch in enumerate(batches):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, s)
            (pixels, owners, ids, labels, early, subject), targets = batch
            hidden, visual, seen = forward_hidden(model, encoder, pixels, owners, ids, attention=True)
            answer_loss = F.cross_entropy(*labelled_logits(model, hidden, labels))
            early_loss = F.cross_entropy(*labelled_logits(model, hidden, early))
            hint_loss = attention_hint_loss(seen, early, subject, targets[owners])
            probe_loss = probe.loss(visual, targets)
            opt.zero_grad(set_to_none=True)
            (answer_loss + s.early_weight * early_loss + s.hint_weight * hint_loss
             + s.probe_weight * probe_loss).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            now = np.array([answer_loss.item(), early_loss.item(), hint_loss.item(), probe_loss.item()])
            running = now if running is None else 0.98 * running + 0.02 * now
            if (step + 1) % min(50, max(1, s.steps // 10)) == 0:
                log(f"step {step + 1}/{s.steps}  loss {running[0]:.4f}  early {running[1]:.4f}  "
                    f"hint {running[2]:.4f}  probe {running[3]:.4f}  lr {lr_at(step, s):.2e}  "
                    f"{time.perf_counter() - t0:.0f} s")
            if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
                acc = evaluate(model, encoder, val)
                history.append({"step": step + 1, "s": round(time.perf_counter() - t0, 1), **acc})
                log(f"  validation: {fmt(acc)}")
    finally:
        batches.close()
    train_s = time.perf_counter() - t0
    model.set_attn_implementation(attention)
    test_acc = evaluate(model, encoder, test)
    log(f"test ({test_acc['questions']} questions): {fmt(test_acc)}")
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = encoder.eos
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    report = {"settings": dataclasses.asdict(s), "train_s": round(train_s, 1),
              "torch_threads": torch.get_num_threads(), "test": test_acc, "validation": history,
              "val_scenes": eval_scenes[0], "test_scenes": eval_scenes[1],
              "vision_probe_accuracy": dict(zip(("area", "column", "left", "right"), vision_accuracy))}
    (out / "training.json").write_text(json.dumps(report, indent=1))
    log(f"learning curve: {plot_history(report, out / 'training_curve.png')}")
    return model, processor, report


def plot_history(report: dict, path: Path) -> Path:
    """Validation accuracy per question kind against training step, with the test figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = report["validation"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for kind in (*scenes.KINDS, "all"):
        ax.plot([h["step"] for h in history], [h[kind] for h in history], "o-", ms=3,
                lw=2.5 if kind == "all" else 1.2, label=f"{kind} (test {report['test'][kind]:.2f})")
    ax.set(xlabel="training step", ylabel="validation accuracy (exact match)", ylim=(0, 1.02),
           title=f"Built-in model, seed {report['settings']['seed']}: {report['train_s'] / 60:.0f} min on "
                 f"{report['torch_threads']} CPU threads")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def calibration_frames(directory: Path, seed: int, count: int = 32) -> Path:
    """`count` training scenes as PNG files (the converter's calibration input)."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        scene = scenes.split_scene("train", 10_000_000 + i, seed, FRAME_W, FRAME_H)
        Image.fromarray(scenes.render_scene(scene)).save(directory / f"{i:02d}.png")
    return directory


def train_and_convert(s: Settings, out: Path, store: Path | None = None, convert_store: bool = True,
                      log=print) -> int:
    """Train (checkpoint in `out`), then convert into `store` (default: the shipped store's place)."""
    import shutil
    import tempfile

    from nchunk_core.convert.converter import convert

    train(s, out, log)
    if convert_store:
        store = store or shipped_store()
        with tempfile.TemporaryDirectory(prefix="nchunk-calib-") as tmp:
            convert(out, store, calib=calibration_frames(Path(tmp), s.seed), overwrite=True)
        shutil.copy2(out / "training.json", store / "training.json")
        log(f"store: {store}")
    return 0
