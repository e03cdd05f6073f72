"""Synthetic frame-averaged importance vectors with a heavy tail and persistent hot channels.

Model, per input of `channels` channels and per frame f:

    v_i(f) = base_i · exp(frame_sigma · z_{f,i}),   base_i = exp(channel_sigma · g_i) · (outlier_scale if i ∈ O)

g and z are standard normal; `base` is fixed per input (persistent hot channels: the same channels
matter in most frames), z varies per frame, and a small set O of outlier channels (the massive
activations seen in LLMs and VLMs) is scaled up. With the defaults the coefficient of variation of
v over channels is about 2 — inside the range the paper measured for VLMs (about 1 to 4.5); `cv`
reports it for any setting. Hot channels are scattered at random positions, as in a real checkpoint,
so contiguity must come from hot–cold reordering, not from the generator.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ImportanceModel:
    channel_sigma: float = 1.2  # spread of the persistent per-channel scale (log space)
    frame_sigma: float = 0.5  # frame-to-frame variation of a channel (log space)
    outlier_fraction: float = 0.002
    outlier_scale: float = 20.0

    def base(self, channels: int, seed: int) -> np.ndarray:
        """[channels] persistent scale of each channel of one input."""
        rng = np.random.default_rng(seed)
        base = np.exp(self.channel_sigma * rng.standard_normal(channels))
        outliers = rng.choice(channels, max(1, int(self.outlier_fraction * channels)), replace=False)
        base[outliers] *= self.outlier_scale
        return base

    def frames(self, base: np.ndarray, count: int, seed: int) -> np.ndarray:
        """[count, channels] float32 importance vectors of `count` frames."""
        rng = np.random.default_rng(seed)
        noise = np.exp(self.frame_sigma * rng.standard_normal((count, base.size)))
        return (base[None, :] * noise).astype(np.float32)


def cv(v: np.ndarray) -> np.ndarray:
    """Coefficient of variation over channels (last axis)."""
    v = np.asarray(v, dtype=np.float64)
    return v.std(axis=-1) / v.mean(axis=-1)
