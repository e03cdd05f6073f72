"""Latency table T[s] of a drive and the I/O cost estimator built on it.

T[s] is the steady-state time per contiguous chunk of s bytes when many such chunks are in flight
through the reader (the drive profiler measures it). The estimated cost of a selection is the sum of
T over its maximal runs. The same interpolation rule is implemented in C++ (csrc/select.cpp) for the
selection kernels; `estimate` here is the reference.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np


@dataclasses.dataclass
class LatencyTable:
    """T on a grid of `step_bytes`: latency_s[k] is the time per chunk of (k + 1) * step_bytes."""

    latency_s: np.ndarray  # [n] float64, non-decreasing
    step_bytes: int = 1024
    peak_bytes_per_s: float = 0.0  # throughput at and beyond the saturation size
    saturation_bytes: int = 0  # smallest size reaching 99 % of peak throughput
    meta: dict = dataclasses.field(default_factory=dict)  # drive, threads, date, ...

    def __post_init__(self):
        self.latency_s = np.ascontiguousarray(self.latency_s, dtype=np.float64)
        if self.latency_s.ndim != 1 or self.latency_s.size == 0:
            raise ValueError("latency table needs a non-empty 1-D array")
        if self.step_bytes <= 0:
            raise ValueError("step_bytes must be positive")
        if not np.all(np.isfinite(self.latency_s)) or np.any(self.latency_s <= 0):
            raise ValueError("latencies must be finite and positive")
        if not self.peak_bytes_per_s:
            self.peak_bytes_per_s = float(self.max_bytes / self.latency_s[-1])
        if not self.saturation_bytes:
            self.saturation_bytes = self.max_bytes

    @property
    def max_bytes(self) -> int:
        return int(self.latency_s.size * self.step_bytes)

    def estimate(self, run_bytes) -> np.ndarray:
        """Estimated seconds per run of the given byte sizes (any shape).

        Below one step the first entry is used; between grid points T is linear; beyond the table a
        chunk costs the last entry scaled by its size (the drive is at peak throughput there).
        """
        b = np.asarray(run_bytes, dtype=np.float64)
        n = self.latency_s.size
        x = b / self.step_bytes  # in grid units; entry k sits at x = k + 1
        grid = np.arange(1, n + 1, dtype=np.float64)
        inside = np.interp(np.clip(x, 1.0, float(n)), grid, self.latency_s)
        beyond = self.latency_s[-1] * x / n
        out = np.where(x > n, beyond, inside)
        return np.where(b > 0, out, 0.0)

    def estimate_runs(self, run_lengths_rows, row_bytes: int) -> float:
        """Estimated seconds to read maximal runs given in rows of `row_bytes` each."""
        lengths = np.asarray(run_lengths_rows, dtype=np.float64)
        return float(self.estimate(lengths * row_bytes).sum())

    # -- persistence -------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "step_bytes": self.step_bytes,
            "latency_s": self.latency_s.tolist(),
            "peak_bytes_per_s": self.peak_bytes_per_s,
            "saturation_bytes": self.saturation_bytes,
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, obj: dict) -> "LatencyTable":
        try:
            return cls(
                latency_s=np.asarray(obj["latency_s"], dtype=np.float64),
                step_bytes=int(obj["step_bytes"]),
                peak_bytes_per_s=float(obj["peak_bytes_per_s"]),
                saturation_bytes=int(obj["saturation_bytes"]),
                meta=dict(obj.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a latency table: {exc}") from exc

    def save(self, path) -> None:
        """Write the table as JSON to `path`, creating its folder."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path) -> "LatencyTable":
        return cls.from_json(json.loads(Path(path).read_text()))

    @classmethod
    def synthetic(cls, setup_s: float = 80e-6, peak_bytes_per_s: float = 1.0e9, max_kib: int = 256):
        """A simple affine model T(s) = setup + s / peak, for tests and examples without a drive."""
        sizes = np.arange(1, max_kib + 1) * 1024.0
        return cls(latency_s=setup_s + sizes / peak_bytes_per_s, step_bytes=1024,
                   meta={"synthetic": True})
