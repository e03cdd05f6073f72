"""Train the built-in demo model from scratch and convert it to the shipped store.

    nchunk train-demo                      # the shipped model: seed 0, default schedule
    nchunk train-demo --steps 300 --out /tmp/try --no-convert   # a quick look

Data (scenes.py): an endless stream of training scenes, rendered at the camera's 320×240 and put
through the model's own processor, so the model sees exactly what the runtime feeds it. Every scene
gives one question of each kind, another count and position question, and "what shapes are
there?" answered with every shape left to right. Validation and test scenes are drawn from their
own seeds, and the training stream skips their layouts. Scenes hold at most two shapes for the
first `curriculum_steps`, three for as many again, then up to four. A linear probe on the visual
tokens (ColumnProbe, not saved) names each column's colour and shape: a direct signal for the
vision tower.

Batches: the vision tower runs once per image; its visual tokens are copied into every question
sequence of that image, which holds the same ids as the runtime's conversation (prefix, frame
chunk, question chunk; demo_model.prompt) followed by the answer and <end_of_utterance>. The loss is
the cross-entropy of the answer tokens and the end token. Greedy decoding gives the right answer
exactly when every one of those tokens is the argmax, which is how accuracy is counted.

Schedule: AdamW, linear warm-up then cosine decay; a background thread renders the next batches.
Output: the Hugging Face checkpoint (model, tokenizer, processor, generation config) in `--out`,
`training.json` with the settings, the time and the accuracy per kind on the validation and test
sets, training_curve.png, and unless --no-convert the store (calibrated on training scenes) in
`--store`. With the defaults this takes about 44 minutes on two CPU cores (README).
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

from . import scenes
from .demo_model import build_untrained, shipped_store
from .frame_append import SmolVLMAdapter

FRAME_W, FRAME_H = 320, 240  # the synthetic camera's default frame
VAL_SCENES, TEST_SCENES = 300, 500


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
    probe_weight: float = 0.5  # weight of the ColumnProbe loss beside the answer loss

    @classmethod
    def scaled(cls, seed: int = 0, steps: int | None = None) -> "Settings":
        """Defaults, with warm-up, curriculum and evaluation shortened for a run of fewer steps."""
        d = cls()
        steps = d.steps if steps is None else steps
        return cls(seed=seed, steps=steps, warmup=min(d.warmup, steps // 10),
                   curriculum_steps=min(d.curriculum_steps, steps // 6), eval_every=min(d.eval_every, steps))


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
        self._cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def pixels(self, scene: scenes.Scene) -> torch.Tensor:
        """[3, S, S] float32: the scene rendered and preprocessed like a camera frame."""
        chunk = self.adapter.encode_frame(scenes.render_scene(scene))
        return chunk.vision["pixel_values"][0, 0]

    def sequence(self, q: scenes.Question) -> tuple[list[int], int]:
        """Token ids after the context (question chunk, answer, end) and how many are targets."""
        question = self.ids(self.adapter.question_prompt(q.text))
        answer = self.ids(q.answer) + [self.eos]
        return question + answer, len(answer)


def collate(encoder: Encoder, items: list[tuple[torch.Tensor, list[scenes.Question]]]):
    """→ pixels [B, 3, S, S], owner image [N], question-part ids [N, T], labels [N, T] (-100: no loss).

    Row r is the part of question r after the shared context (prefix + frame chunk): question chunk,
    answer, end token, right-padded. labels[r, t] is the token that position t must predict.
    """
    pixels = torch.stack([p for p, _ in items])
    owners, seqs = [], []
    for i, (_, questions) in enumerate(items):
        for q in questions:
            owners.append(i)
            seqs.append(encoder.sequence(q))
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), width), encoder.tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for r, (row, n_target) in enumerate(seqs):
        ids[r, : len(row)] = torch.tensor(row)
        labels[r, len(row) - n_target - 1 : len(row) - 1] = torch.tensor(row[-n_target:])
    return pixels, torch.tensor(owners), ids, labels


def forward_logits(model, encoder: Encoder, pixels, owners, ids, labels):
    """Logits [M, V] at the M labelled positions, their targets [M], and the visual tokens [B, 16, hidden].

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
    text(inputs_embeds=context, past_key_values=cache, use_cache=True)
    cache.reorder_cache(owners)  # [B, …] → [N, …]: one copy per question
    c, t = len(encoder.context), ids.shape[1]
    positions = torch.arange(c, c + t)[None].expand(len(ids), -1)  # [N, T]
    hidden = text(inputs_embeds=embed(ids), position_ids=positions, past_key_values=cache,
                  use_cache=True).last_hidden_state  # [N, T, hidden]
    mask = labels != -100
    return model.lm_head(hidden[mask]), labels[mask], visual


class ColumnProbe(nn.Module):
    """Training aid, not part of the model: names each column's colour and shape from its visual tokens.

    Visual tokens are a 4 × 4 grid in row-major order (pixel shuffle of the 12 × 12 patch grid), and
    a token column is a scene column. This linear probe on each column's mean token gives the vision
    tower a direct per-column signal, which it otherwise gets only through the language model.
    """

    GRID = 4

    def __init__(self, hidden: int):
        super().__init__()
        self.colour = nn.Linear(hidden, len(scenes.COLORS) + 1)  # class 0: empty column
        self.shape = nn.Linear(hidden, len(scenes.SHAPES) + 1)

    def loss(self, visual: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """visual [B, 16, hidden], targets [B, 4, 2] (colour, shape class per column) → scalar."""
        b, _, h = visual.shape
        columns = visual.reshape(b, self.GRID, self.GRID, h).mean(1)  # [B, 4 columns, hidden]
        return (F.cross_entropy(self.colour(columns).flatten(0, 1), targets[..., 0].flatten())
                + F.cross_entropy(self.shape(columns).flatten(0, 1), targets[..., 1].flatten())) / 2


def column_targets(scene: scenes.Scene) -> torch.Tensor:
    """[4, 2] long: (colour class, shape class) per column, 0 where the column is empty."""
    out = torch.zeros(scenes.COLUMNS, 2, dtype=torch.long)
    colours, shapes = list(scenes.COLORS), list(scenes.SHAPES)
    for sh in scene.shapes:
        column = min(scenes.COLUMNS - 1, int(sh.center[0] * scenes.COLUMNS // scene.width))
        out[column] = torch.tensor([colours.index(sh.color) + 1, shapes.index(sh.shape) + 1])
    return out


def scene_questions(scene: scenes.Scene, rng: np.random.Generator) -> list[scenes.Question]:
    """Training questions of a scene: one of each kind it allows, another count and position, and
    the description (every shape named in order: the densest supervision for the vision tower)."""
    return scenes.questions_for(scene, rng) + [scenes.count_question(scene, rng),
                                               scenes.position_question(scene, rng),
                                               scenes.describe_question(scene)]


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
            items, columns = [], []
            while len(items) < self.s.images_per_step:
                scene = scenes.split_scene("train", index, self.s.seed, FRAME_W, FRAME_H, self._max_shapes(step))
                index += 1
                if scene.key in self.held_out:
                    continue
                items.append((self.encoder.pixels(scene), scene_questions(scene, rng)))
                columns.append(column_targets(scene))
            batch = collate(self.encoder, items), torch.stack(columns)
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
            yield self.queue.get()

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
        pixels, owners, ids, labels = collate(encoder, part)
        logits, targets, _ = forward_logits(model, encoder, pixels, owners, ids, labels)
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
    probe = ColumnProbe(model.config.text_config.hidden_size)
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
            questions, columns = batch
            logits, targets, visual = forward_logits(model, encoder, *questions)
            answer_loss, probe_loss = F.cross_entropy(logits, targets), probe.loss(visual, columns)
            opt.zero_grad(set_to_none=True)
            (answer_loss + s.probe_weight * probe_loss).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            now = np.array([answer_loss.item(), probe_loss.item()])
            running = now if running is None else 0.98 * running + 0.02 * now
            if (step + 1) % min(50, max(1, s.steps // 10)) == 0:
                log(f"step {step + 1}/{s.steps}  loss {running[0]:.4f}  probe {running[1]:.4f}  "
                    f"lr {lr_at(step, s):.2e}  {time.perf_counter() - t0:.0f} s")
            if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
                acc = evaluate(model, encoder, val)
                history.append({"step": step + 1, "s": round(time.perf_counter() - t0, 1), **acc})
                log(f"  validation: {fmt(acc)}")
    finally:
        batches.close()
    train_s = time.perf_counter() - t0
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
              "val_scenes": eval_scenes[0], "test_scenes": eval_scenes[1]}
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

    from .convert import convert

    train(s, out, log)
    if convert_store:
        store = store or shipped_store()
        with tempfile.TemporaryDirectory(prefix="nchunk-calib-") as tmp:
            convert(out, store, calib=calibration_frames(Path(tmp), s.seed), overwrite=True)
        shutil.copy2(out / "training.json", store / "training.json")
        log(f"store: {store}")
    return 0
