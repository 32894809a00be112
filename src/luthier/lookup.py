"""Prompt lookup decoding: speculative decoding whose drafts come from the text itself.

When the last few tokens occurred before (in the prompt or the output), the tokens that
followed them then are proposed as the next ones; one forward of [last token, drafts]
scores them all (the m > 1 LUT matmul), and they are checked in order by sampling each
row as usual: a draft is kept while the sampled token equals it. Since each token is
sampled from the model's own distribution at its position, the output is exactly what
plain decoding gives (greedy: the same tokens; sampling: the same distribution: a draft
is accepted with the model's probability of it, and a rejected row's sample is a draw
from the rest). Rejected drafts' KV is simply overwritten later.

It pays where the output repeats its input (editing or quoting a text or code,
extracting fields, summaries that copy phrases) and costs where drafts fail: a forward
of k + 1 rows is dearer than one row, so the draft length adapts (doubles after a fully
accepted draft, halves after a rejected one, and drafting pauses after repeated misses).
llama-cpp-python's `LlamaPromptLookupDecoding`, transformers' `prompt_lookup_num_tokens`
and llama.cpp's lookup decoding do the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PromptLookupDecoding:
    """Drafts of up to `num_pred_tokens` tokens from the most recent earlier occurrence of
    the last `max_ngram_size` (down to `min_ngram_size`) tokens. Pass it as
    `Llama(draft_model=...)` (llama-cpp-python's spelling) or `generate_stream(lookup=...)`."""

    num_pred_tokens: int = 10
    max_ngram_size: int = 3
    min_ngram_size: int = 3

    def __post_init__(self) -> None:
        if self.num_pred_tokens < 1 or not 1 <= self.min_ngram_size <= self.max_ngram_size:
            raise ValueError("num_pred_tokens >= 1 and 1 <= min_ngram_size <= max_ngram_size")


def find_draft(history: list[int], max_tokens: int, max_ngram: int, min_ngram: int) -> list[int]:
    """The tokens that followed the most recent earlier occurrence of history's last n
    tokens (n from max_ngram down to min_ngram), at most max_tokens of them; [] if none."""
    if max_tokens <= 0 or len(history) <= min_ngram:
        return []
    h = np.asarray(history, np.int64)  # [T]
    for n in range(min(max_ngram, len(h) - 1), min_ngram - 1, -1):
        pattern = h[-n:]
        windows = np.lib.stride_tricks.sliding_window_view(h[:-1], n)  # [T - n, n]: starts 0..T-n-1
        hits = np.flatnonzero((windows == pattern).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n  # the most recent occurrence's continuation
            return h[start : start + max_tokens].tolist()
    return []


class DraftPolicy:
    """How many tokens to draft next: doubles after a fully accepted draft (up to the
    limit), halves after a rejection, and after 3 misses in a row pauses for 8 tokens."""

    def __init__(self, spec: PromptLookupDecoding) -> None:
        self.spec = spec
        self.k = min(4, spec.num_pred_tokens)
        self.misses = 0
        self.pause = 0
        self.drafted = 0
        self.accepted = 0

    def draft(self, history: list[int], room: int) -> list[int]:
        if self.pause > 0:
            self.pause -= 1
            return []
        return find_draft(history, min(self.k, room), self.spec.max_ngram_size, self.spec.min_ngram_size)

    def update(self, proposed: int, accepted: int) -> None:
        self.drafted += proposed
        self.accepted += accepted
        if accepted == proposed:
            self.k = min(2 * self.k, self.spec.num_pred_tokens)
            self.misses = 0
        else:
            self.k = max(1, self.k // 2)
            self.misses = self.misses + 1 if accepted == 0 else 0
            if self.misses >= 3:
                self.pause, self.misses = 8, 0
