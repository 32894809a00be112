"""Sampler: greedy, determinism, and that each filter removes what it should."""

from __future__ import annotations

import numpy as np
import pytest

from luthier.sample import Sampler

N_DRAWS = 4000


def _logits(seed: int = 0, vocab: int = 50) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 2.0, vocab).astype(np.float32)


def _counts(s: Sampler, logits: np.ndarray, n: int = N_DRAWS) -> np.ndarray:
    return np.bincount([s.sample(logits) for _ in range(n)], minlength=logits.shape[0])


def test_greedy_is_argmax() -> None:
    for seed in range(5):
        z = _logits(seed)
        assert Sampler(temperature=0.0).sample(z) == int(np.argmax(z))
        assert Sampler(temperature=0.7, top_k=1, seed=seed).sample(z) == int(np.argmax(z))
        p = Sampler(temperature=0.0).probs(z)
        assert p[np.argmax(z)] == 1.0 and p.sum() == 1.0


def test_seed_determinism() -> None:
    z = _logits(1)
    s1, s2, s3 = Sampler(seed=42), Sampler(seed=42), Sampler(seed=43)
    r1 = [s1.sample(z) for _ in range(50)]
    r2 = [s2.sample(z) for _ in range(50)]
    r3 = [s3.sample(z) for _ in range(50)]
    assert r1 == r2 and r1 != r3
    s1.reseed(42)
    assert [s1.sample(z) for _ in range(50)] == r1


def test_plain_sampling_follows_softmax() -> None:
    z = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    freq = _counts(Sampler(seed=0), z) / N_DRAWS
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_temperature_sharpens_and_flattens() -> None:
    z = np.log(np.array([0.6, 0.3, 0.1]))
    cold = Sampler(temperature=0.25).probs(z)
    hot = Sampler(temperature=4.0).probs(z)
    assert cold[0] > 0.9 and hot[0] < 0.45 and hot[2] > 0.2


def test_top_k() -> None:
    z = _logits(2)
    top = set(np.argsort(-z)[:5].tolist())
    seen = set(np.nonzero(_counts(Sampler(top_k=5, seed=0), z))[0].tolist())
    assert seen <= top and len(seen) == 5


def test_top_p_excludes_the_tail() -> None:
    p = np.array([0.45, 0.25, 0.15, 0.1, 0.05])
    s = Sampler(top_p=0.8, seed=0)
    # 0.45 + 0.25 = 0.70 < 0.8, + 0.15 = 0.85 >= 0.8: keep the first three
    np.testing.assert_allclose(s.probs(np.log(p)), np.array([0.45, 0.25, 0.15, 0, 0]) / 0.85)
    counts = _counts(s, np.log(p))
    assert counts[3:].sum() == 0 and counts[2] > 0.1 * N_DRAWS
    # a tiny top_p still keeps the most likely token
    assert Sampler(top_p=0.01, seed=0).sample(np.log(p)) == 0


def test_min_p_excludes_unlikely_tokens() -> None:
    p = np.array([0.5, 0.3, 0.12, 0.05, 0.03])
    s = Sampler(min_p=0.2, seed=0)  # threshold 0.2 * 0.5 = 0.1
    counts = _counts(s, np.log(p))
    assert counts[3:].sum() == 0 and min(counts[:3]) > 0
    np.testing.assert_allclose(s.probs(np.log(p)), np.array([0.5, 0.3, 0.12, 0, 0]) / 0.92)


def test_repetition_penalty_lowers_repeated_tokens() -> None:
    z = np.array([3.0, 2.9, -1.0, -1.2])
    s = Sampler(temperature=0.0, repetition_penalty=1.3)
    assert s.sample(z) == 0
    assert s.sample(z, previous=[0, 0]) == 1  # 3.0 / 1.3 < 2.9
    pen = s.penalize(z, previous=[0, 2])
    np.testing.assert_allclose(pen, [3.0 / 1.3, 2.9, -1.3, -1.2])
    sampled = Sampler(repetition_penalty=2.0, seed=0)
    before = Sampler(seed=0).probs(z)[0]
    assert sampled.probs(z, previous=[0])[0] < before


def test_filters_compose_and_never_return_excluded() -> None:
    z = _logits(3, vocab=200)
    s = Sampler(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, seed=7)
    p = s.probs(z)
    assert p.sum() == pytest.approx(1.0) and (p > 0).sum() <= 40
    allowed = set(np.nonzero(p)[0].tolist())
    assert all(s.sample(z) in allowed for _ in range(500))


def test_invalid_parameters() -> None:
    for kwargs in ({"temperature": -1.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"min_p": -0.1},
                   {"repetition_penalty": 0.0}):
        with pytest.raises(ValueError):
            Sampler(**kwargs)
    with pytest.raises(ValueError, match="NaN"):
        Sampler().sample(np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="previous"):
        Sampler(repetition_penalty=1.2).sample(np.zeros(3), previous=[5])
