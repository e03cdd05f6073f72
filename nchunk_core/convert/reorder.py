"""Hot–cold reordering of input channels (Neuron Chunking, offline step).

On calibration inputs a channel is *active* when its importance is in the top half of that input's
channels. Channels are sorted by how often they were active, most often first, and the stored rows
are permuted in that order: channels that matter together end up next to each other on disk, so
chunk selection finds dense windows. At run time the activation vector is gathered with the same
permutation, which leaves every output unchanged.

Permutation convention (shared with the store): stored row j holds original input channel perm[j].
"""
from __future__ import annotations

import numpy as np

ACTIVE_FRACTION = 0.5


class ActivationCounter:
    """Accumulates how often each channel of one input is active across calibration inputs."""

    def __init__(self, channels: int, active_fraction: float = ACTIVE_FRACTION):
        if channels <= 0:
            raise ValueError("channels must be positive")
        if not 0.0 < active_fraction < 1.0:
            raise ValueError("active_fraction must be in (0, 1)")
        self.channels = channels
        self.active_fraction = active_fraction
        self.counts = np.zeros(channels, dtype=np.int64)  # [channels] times active
        self.importance_sum = np.zeros(channels, dtype=np.float64)  # [channels] tie-breaker
        self.samples = 0

    def add(self, importance) -> None:
        """importance: [channels] or [samples, channels] non-negative (mean |x| per input)."""
        v = np.atleast_2d(np.asarray(importance, dtype=np.float64))
        if v.shape[1] != self.channels:
            raise ValueError(f"expected {self.channels} channels, got {v.shape[1]}")
        k = max(1, int(round(self.active_fraction * self.channels)))
        top = np.argpartition(-v, k - 1, axis=1)[:, :k]  # [samples, k] active channels per sample
        np.add.at(self.counts, top.ravel(), 1)
        self.importance_sum += v.sum(axis=0)
        self.samples += v.shape[0]

    def permutation(self) -> np.ndarray:
        """[channels] int64: most frequently active first; ties by total importance, then index."""
        if self.samples == 0:
            raise ValueError("no calibration samples were added")
        order = np.lexsort((np.arange(self.channels), -self.importance_sum, -self.counts))
        return order.astype(np.int64)


def hot_cold_permutation(samples, active_fraction: float = ACTIVE_FRACTION) -> np.ndarray:
    """Permutation from a [samples, channels] array of calibration importance vectors."""
    samples = np.atleast_2d(np.asarray(samples))
    counter = ActivationCounter(samples.shape[1], active_fraction)
    counter.add(samples)
    return counter.permutation()


def inverse(perm: np.ndarray) -> np.ndarray:
    """inv such that inv[perm[j]] = j (stored position of each original channel)."""
    perm = np.asarray(perm, dtype=np.int64)
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size, dtype=np.int64)
    return inv
