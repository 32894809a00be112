"""Generation: prefill + decode loop yielding results; never prints (cli/server format)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    weight_bytes_per_token: int = 0

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        # the first completion token comes from the prefill's logits
        n = max(self.completion_tokens - 1, 0)
        return n / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def decode_gbps(self) -> float:
        return self.decode_tps * self.weight_bytes_per_token / 1e9


@dataclass
class GenerationChunk:
    """One step of a stream: the new token, the text it completes (may be ''), and a
    finish reason on the last chunk ("stop" or "length")."""

    token: int | None
    text: str
    finish_reason: str | None = None
    stats: GenerationStats | None = None


@dataclass
class StopMatcher:
    """Holds back text that could be the start of a stop string, so none is ever emitted."""

    stops: Sequence[str]
    pending: str = ""
    done: bool = False

    def push(self, text: str) -> str:
        self.pending += text
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0:
                out, self.pending, self.done = self.pending[:i], "", True
                return out
        keep = 0
        for s in self.stops:  # longest suffix of pending that is a prefix of a stop
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def generate_stream(
    lm,
    prompt_ids: Sequence[int],
    max_tokens: int = 256,
    sampler=None,
    stop: Sequence[str] | None = None,
    stop_ids: Sequence[int] | None = None,
    ctx: int | None = None,
    prefill_chunk: int = 256,
) -> Iterator[GenerationChunk]:
    """Yield GenerationChunks for a prompt; the last one carries finish_reason and stats."""
    from .sample import Sampler

    model = lm.model
    sampler = sampler or Sampler(temperature=0.0)
    ids = [int(t) for t in prompt_ids]
    if not ids:
        raise ValueError("the prompt has no tokens")
    n_ctx = min(ctx or lm.extra.get("ctx") or lm.args.max_seq_len, lm.extra.get("ctx") or 1 << 62)
    if len(ids) >= n_ctx:
        raise ValueError(f"the prompt has {len(ids)} tokens; the context holds {n_ctx}")
    max_tokens = max(0, min(int(max_tokens), n_ctx - len(ids)))
    stop_set = set(lm.tokenizer.eos_ids) | set(stop_ids or ())
    cache = model.new_cache(min(n_ctx, len(ids) + max_tokens + 1))
    stats = GenerationStats(prompt_tokens=len(ids), weight_bytes_per_token=lm.weight_bytes_per_token)
    detok = lm.tokenizer.stream()
    matcher = StopMatcher(list(stop or []))

    t0 = time.perf_counter()
    logits = None
    for s in range(0, len(ids), prefill_chunk):  # chunks bound the activation memory
        chunk = np.asarray(ids[s : s + prefill_chunk], np.int64)
        logits = model.forward(chunk, cache, s, last_only=True)
    stats.prefill_seconds = time.perf_counter() - t0
    if max_tokens == 0:
        yield GenerationChunk(None, "", "length", stats)
        return
    history = list(ids)
    pos = len(ids)
    t1 = time.perf_counter()
    finish = "length"
    while True:
        tok = int(sampler.sample(logits[-1], history))
        stats.completion_tokens += 1
        history.append(tok)
        if tok in stop_set:
            finish = "stop"
            break
        text = matcher.push(detok.feed(tok))
        if matcher.done:
            finish = "stop"
            if text:
                yield GenerationChunk(tok, text)
            break
        yield GenerationChunk(tok, text)
        if stats.completion_tokens >= max_tokens:
            break
        logits = model.forward(np.asarray([tok], np.int64), cache, pos)
        pos += 1
    stats.decode_seconds = time.perf_counter() - t1
    tail = "" if matcher.done else matcher.push(detok.flush()) + matcher.flush()
    yield GenerationChunk(None, tail, finish, stats)


@dataclass
class GenerationResult:
    text: str
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    stats: GenerationStats = field(default_factory=GenerationStats)


def generate(lm, prompt_ids: Sequence[int], **kw) -> GenerationResult:
    """The whole completion at once."""
    res = GenerationResult("")
    parts = []
    for ch in generate_stream(lm, prompt_ids, **kw):
        parts.append(ch.text)
        if ch.token is not None:
            res.tokens.append(ch.token)
        if ch.finish_reason:
            res.finish_reason = ch.finish_reason
            res.stats = ch.stats or res.stats
    res.text = "".join(parts)
    return res
