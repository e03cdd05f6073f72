"""Settings of the built-in model's training run, and the frame and evaluation sizes it uses.

No torch here: `nchunk train-demo --help` shows these defaults without loading the trainer.
"""
from __future__ import annotations

import dataclasses

FRAME_W, FRAME_H = 320, 240  # the synthetic camera's default frame
VAL_SCENES, TEST_SCENES = 300, 500


@dataclasses.dataclass
class Settings:
    """One training run: seed, schedule, batch size and the weights of the training aids."""

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
