"""Next-token sampling from a logits vector.

Order of operations (as Hugging Face's logits processors apply them):
repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw.
Temperature 0 (or top_k 1) is greedy: argmax after the repetition penalty, no randomness.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np


@dataclass
class Sampler:
    """Picks the next token id from logits [vocab].

    temperature: 0 = greedy; otherwise logits are divided by it.
    top_k: keep the k most likely tokens (0 = all).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p.
    min_p: drop tokens whose probability is below min_p times the most likely one's.
    repetition_penalty: CTRL-style, for tokens already seen: positive logits divided by
        it, negative ones multiplied (1 = off).
    seed: seeds the np.random.Generator; the same seed and inputs give the same tokens.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not (self.repetition_penalty > 0 and np.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        self.rng = np.random.default_rng(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def reseed(self, seed: int | None) -> None:
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def penalize(self, logits: np.ndarray, previous: Iterable[int] = ()) -> np.ndarray:
        """Logits [vocab] float64 after the repetition penalty (a copy)."""
        out = np.array(logits, dtype=np.float64).reshape(-1)  # copy; [vocab]
        if np.isnan(out).any():
            raise ValueError("logits contain NaN")
        if self.repetition_penalty != 1.0:
            seen = np.unique(np.fromiter(previous, dtype=np.int64))
            if seen.size:
                if seen.min() < 0 or seen.max() >= out.shape[0]:
                    raise ValueError(f"previous token ids must be in [0, {out.shape[0]})")
                vals = out[seen]
                out[seen] = np.where(vals > 0, vals / self.repetition_penalty, vals * self.repetition_penalty)
        return out

    def probs(self, logits: np.ndarray, previous: Iterable[int] = ()) -> np.ndarray:
        """The distribution [vocab] that `sample` draws from (one-hot when greedy)."""
        z = self.penalize(logits, previous)
        if self.greedy:
            p = np.zeros_like(z)
            p[int(np.argmax(z))] = 1.0
            return p
        z = z / self.temperature
        v = z.shape[0]
        if self.top_k and self.top_k < v:
            order = self._top_order(z, self.top_k)  # the k most likely (ties: lower ids first)
            drop = np.ones(v, bool)
            drop[order[: self.top_k]] = False
            z[drop] = -np.inf
        else:
            order = None
        top = int(np.argmax(z))  # the first maximum: the same token a stable sort puts first
        z = z - z[top]  # the max is finite unless every logit is -inf
        if not np.isfinite(z[top]):
            raise ValueError("all logits are -inf")
        p = np.exp(z)
        p /= p.sum()
        if self.top_p < 1.0:
            # only the most likely tokens can be kept: sort a few hundred, not the vocabulary,
            # unless they do not reach top_p (a flat distribution)
            order = self._top_order(z, min(v, 512)) if order is None else order
            if order.size < v and np.cumsum(p[order])[-1] < self.top_p:
                order = self._top_order(z, v)
            sorted_p = p[order]
            # keep token j if the mass of the tokens before it is still below top_p: the
            # smallest prefix reaching top_p, and never less than the top token
            before = np.cumsum(sorted_p) - sorted_p
            keep = np.zeros(v, bool)
            keep[order[before < self.top_p]] = True
            p[~keep] = 0.0
        if self.min_p > 0.0:
            p[p < self.min_p * p.max()] = 0.0
        return p / p.sum()

    @staticmethod
    def _top_order(z: np.ndarray, k: int) -> np.ndarray:
        """Ids of at least the k largest z, most likely first, ties by lower id (what a
        stable argsort of -z begins with); ties at the k-th value are all included."""
        if k >= z.shape[0]:
            return np.argsort(-z, kind="stable")
        thr = np.partition(z, z.shape[0] - k)[z.shape[0] - k]  # the k-th largest value
        idx = np.flatnonzero(z >= thr)  # ascending ids
        return idx[np.argsort(-z[idx], kind="stable")]

    def sample(self, logits: np.ndarray, previous: Iterable[int] = ()) -> int:
        """One token id. `previous`: the ids generated or prompted so far (for the penalty)."""
        if self.greedy:
            if self.repetition_penalty == 1.0:  # no copy: argmax of the logits as they are
                z = np.asarray(logits).reshape(-1)  # [vocab]
                i = int(np.argmax(z))
                if np.isnan(z[i]):  # argmax stops at the first NaN
                    raise ValueError("logits contain NaN")
                return i
            return int(np.argmax(self.penalize(logits, previous)))
        p = self.probs(logits, previous)
        # inverse CDF with one uniform draw: one rng call per token keeps seeded runs stable
        cdf = np.cumsum(p)
        idx = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        idx = min(idx, p.shape[0] - 1)
        # searchsorted can land on a zero-probability id only through rounding at the very end
        while p[idx] == 0.0:
            idx -= 1
        return idx

    __call__ = sample
