"""Train the built-in demo model from scratch and convert it to the shipped store.

    nchunk train-demo                      # the shipped model: seed 0, default schedule
    nchunk train-demo --steps 300 --out /tmp/try --no-convert   # a quick look

Data (batches.py): an endless stream of training scenes (scenes.py) turned into the runtime's token
ids and pixels; settings in train_settings.py.

Two phases:

1. Vision (`pretrain_vision`): the vision tower and connector alone learn, from a linear probe on
   the visual tokens (SceneProbe, not saved), to name the shape in each token's area, in its
   column and in the nearest columns on either side.
2. Joint: the answer loss, plus three training aids that act on positions and weights the runtime
   never reads: the probe; the early answer (the answer's first word predicted already at the
   question's last shape word, "circle" in "what color is the circle?"); and the attention hints
   (at that word, attention heads look at the visual tokens that answer: `HINTS`); training_aids.py.
   Without them the language model sits near the answer priors for thousands of steps: finding
   "the circle" among the visual tokens and then carrying its colour to the answer are two steps
   that each learn only once the other works. The aids give each step its own signal.

Forward (`forward_hidden`): the vision tower runs once per image; its visual tokens go into the
shared context, and every question of that image runs on a copy of the context's KV cache. The answer
loss is the cross-entropy of the answer tokens and the end token. Greedy decoding gives the right
answer exactly when every one of those tokens is the argmax, which is how accuracy is counted.

Schedule: AdamW, linear warm-up then cosine decay.
Output: the Hugging Face checkpoint (model, tokenizer, processor, generation config) in `--out`,
`training.json` with the settings, the time and the accuracy per kind on the validation and test
sets, training_curve.png, and unless --no-convert the store (calibrated on training scenes) in
`--store`. With the defaults this takes about TRAIN_MINUTES minutes on two CPU cores (README).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from nchunk_core.demo import scenes
from nchunk_core.demo.batches import Batches, Encoder, collate, held_out_sets
from nchunk_core.demo.model import RECOMMENDED, build_untrained, shipped_store
from nchunk_core.demo.train_settings import FRAME_H, FRAME_W, TEST_SCENES, VAL_SCENES, Settings
from nchunk_core.demo.training_aids import HINTS, SceneProbe, attention_hint_loss, probe_targets


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


def lr_at(step: int, s: Settings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    t = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


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


def calibrate_allocation(store: Path | None = None, seed: int = 0, frames: int = 16, log=print) -> int:
    """Measure the sparsity allocation of the built-in model's store (default: the shipped one) on
    `frames` training scenes (never the validation or test split) and write it into the store."""
    from nchunk_core.convert.sensitivity import calibrate_allocation as calibrate

    images = [scenes.render_scene(scenes.split_scene("train", 10_000_000 + i, seed, FRAME_W, FRAME_H))
              for i in range(frames)]
    calibrate(store or shipped_store(), images, source=f"{frames} training scenes (seed {seed})", log=log)
    return 0


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
            convert(out, store, calib=calibration_frames(Path(tmp), s.seed), overwrite=True,
                    recommended=RECOMMENDED)
        shutil.copy2(out / "training.json", store / "training.json")
        log(f"store: {store}")
    return 0
