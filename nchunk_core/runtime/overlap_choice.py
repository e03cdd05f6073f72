"""Reads behind compute on or off, chosen by measurement (`SessionConfig(overlap="auto")`).

On a machine with few cores, reading the next rows while multiplying can cost the matmul more than
it hides: the reader's threads (and their row checks) take turns on the cores the matmul's threads
use. Which way wins depends on the machine, its load, the sparsity and the cache, so `OverlapChoice`
measures it. The row stream (overlap.py) times every pass through the flash layers (a frame, a
question or one decoded token: from the first input's call to the end of the last call before that
input is called again) and tells it which mode the pass ran in. Passes are told apart by size
(tokens per call, in powers of two), as a frame and a decoded token differ in how much compute
there is to hide reads behind.

Per size: the first passes alternate on, off, on, off (`probes` of each); after that the mode with
the lower mean time over its last `probes` passes is used, and every `reprobe` passes the other mode
runs once, so that a change of load is noticed. What a pass computes never depends on the mode.
"""
from __future__ import annotations


class OverlapChoice:
    """Per pass size, the faster of overlap on and off (see the module docstring)."""

    def __init__(self, probes: int = 2, reprobe: int = 16):
        if probes < 1 or reprobe < 2:
            raise ValueError(f"probes must be >= 1 and reprobe >= 2, got {probes}, {reprobe}")
        self.probes, self.reprobe = probes, reprobe
        self._seconds: dict[tuple[int, bool], list[float]] = {}  # (size, overlap) -> last pass times
        self._passes: dict[int, int] = {}  # size -> passes chosen

    @staticmethod
    def size(tokens: int) -> int:
        """The size class of a pass of `tokens` tokens per call: 1 -> 0, 2 -> 1, 3-4 -> 2, 5-8 -> 3, ..."""
        return max(0, int(tokens) - 1).bit_length()

    def choose(self, tokens: int) -> bool:
        """Whether the pass about to start (`tokens` per call) reads behind compute."""
        size = self.size(tokens)
        n = self._passes[size] = self._passes.get(size, 0) + 1
        on, off = self._seconds.get((size, True), []), self._seconds.get((size, False), [])
        if len(on) < self.probes or len(off) < self.probes:
            return len(on) <= len(off)  # probing: on first, then alternate
        best = self.faster(tokens)
        return (not best) if n % self.reprobe == 0 else best

    def faster(self, tokens: int) -> bool | None:
        """The mode measured faster for passes of this size (None: not measured in both modes yet)."""
        size = self.size(tokens)
        on, off = self._seconds.get((size, True), []), self._seconds.get((size, False), [])
        if len(on) < self.probes or len(off) < self.probes:
            return None
        return sum(on) / len(on) <= sum(off) / len(off)

    def record(self, tokens: int, overlap: bool, seconds: float) -> None:
        """A pass of `tokens` per call ran in mode `overlap` and took `seconds`."""
        kept = self._seconds.setdefault((self.size(tokens), bool(overlap)), [])
        kept.append(float(seconds))
        del kept[:-self.probes]
