"""Hot–cold reordering: frequently active channels first; the permutation is a bijection."""
import numpy as np
import pytest

from nchunk_core.convert.reorder import ActivationCounter, hot_cold_permutation, inverse


def test_always_active_channels_come_first():
    rng = np.random.default_rng(0)
    samples = rng.random((50, 64))
    hot = np.array([5, 17, 40, 63])
    samples[:, hot] += 10.0  # always in the top half
    perm = hot_cold_permutation(samples)
    assert sorted(perm[:4].tolist()) == hot.tolist()
    assert sorted(perm.tolist()) == list(range(64))


def test_counts_follow_top_half_rule():
    c = ActivationCounter(4)
    c.add([[4, 3, 2, 1], [4, 1, 3, 2]])
    assert c.counts.tolist() == [2, 1, 1, 0]
    assert c.permutation()[0] == 0 and c.permutation()[-1] == 3


def test_inverse():
    perm = np.array([2, 0, 3, 1])
    inv = inverse(perm)
    assert (inv[perm] == np.arange(4)).all()


def test_errors():
    with pytest.raises(ValueError):
        ActivationCounter(3).permutation()
    with pytest.raises(ValueError, match="expected 3 channels"):
        ActivationCounter(3).add(np.ones(4))
