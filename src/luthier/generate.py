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
    cached_tokens: int = 0  # prompt tokens whose KV a PromptCache already held (not fed)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    weight_bytes_per_token: int = 0
    draft_tokens: int = 0  # prompt lookup decoding: tokens proposed, and of them accepted
    accepted_tokens: int = 0

    @property
    def prefill_tps(self) -> float:
        fed = self.prompt_tokens - self.cached_tokens
        return fed / self.prefill_seconds if self.prefill_seconds else 0.0

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


class TokenStream:
    """The per-sequence half of generation: sampling, stop tokens and strings, streaming
    detokenization, statistics. It is fed one row of logits at a time and never runs the
    model, so one driver can run one sequence (generate_stream) or many in a batch (the
    server's scheduler) with the very same stopping and text rules."""

    def __init__(self, lm, prompt_ids: Sequence[int], max_tokens: int = 256, sampler=None,
                 stop: Sequence[str] | None = None, stop_ids: Sequence[int] | None = None,
                 ctx: int | None = None, ignore_eos: bool = False):
        from .sample import Sampler

        self.sampler = sampler or Sampler(temperature=0.0)
        self.ids = [int(t) for t in prompt_ids]
        if not self.ids:
            raise ValueError("the prompt has no tokens")
        cap = lm.extra.get("ctx") or 1 << 62
        self.n_ctx = min(ctx or lm.extra.get("ctx") or lm.args.max_seq_len, cap)
        if len(self.ids) >= self.n_ctx:
            raise ValueError(f"the prompt has {len(self.ids)} tokens; the context holds {self.n_ctx}")
        self.max_tokens = max(0, min(int(max_tokens), self.n_ctx - len(self.ids)))
        self.stop_set = (set() if ignore_eos else set(lm.tokenizer.eos_ids)) | set(stop_ids or ())
        self.stats = GenerationStats(prompt_tokens=len(self.ids),
                                     weight_bytes_per_token=lm.weight_bytes_per_token)
        self.detok = lm.tokenizer.stream()
        self.matcher = StopMatcher(list(stop or []))
        self.history = list(self.ids)
        self.done = False
        self.last_token: int | None = None
        self._t_decode: float | None = None

    def finish(self, reason: str) -> GenerationChunk:
        """The last chunk: text held back so far, the finish reason and the statistics."""
        self.done = True
        if self._t_decode is not None:
            self.stats.decode_seconds = time.perf_counter() - self._t_decode
        tail = "" if self.matcher.done else self.matcher.push(self.detok.flush()) + self.matcher.flush()
        return GenerationChunk(None, tail, reason, self.stats)

    def step(self, logits: np.ndarray) -> list[GenerationChunk]:
        """Sample the next token from logits [vocab]; the chunks it yields (the last one
        carries finish_reason when the sequence ends; then `done` is set)."""
        if self.done:
            raise RuntimeError("the sequence has finished")
        if self._t_decode is None:  # the first token comes from the prefill's logits
            self._t_decode = time.perf_counter()
        tok = int(self.sampler.sample(logits, self.history))
        self.stats.completion_tokens += 1
        self.history.append(tok)
        self.last_token = tok
        if tok in self.stop_set:
            return [self.finish("stop")]
        text = self.matcher.push(self.detok.feed(tok))
        if self.matcher.done:
            out = [GenerationChunk(tok, text)] if text else []
            return out + [self.finish("stop")]
        out = [GenerationChunk(tok, text)]
        if getattr(self.sampler, "done", False):  # a grammar's output is complete
            return out + [self.finish("stop")]
        if self.stats.completion_tokens >= self.max_tokens:
            out.append(self.finish("length"))
        return out

    def draft(self, policy, free: int) -> list[int]:
        """Prompt lookup drafts (lookup.DraftPolicy) to feed after the last token, which
        has `free` cache positions from its own on: d drafts yield up to d + 1 tokens, so
        they may outrun neither the token budget nor the cache."""
        return policy.draft(self.history, min(self.max_tokens - self.stats.completion_tokens, free) - 1)

    def step_rows(self, rows: np.ndarray, drafts: list[int], policy=None) -> tuple[list[GenerationChunk], int]:
        """Sample the rows of one forward of [last token, drafts] ([1 + d, vocab]; row i
        follows token i) in order, as `step` would one by one: a draft stands while the
        sample equals it; if all stand, the last row gives one more token. Returns the
        chunks and how many drafts stood (prompt lookup decoding, lookup.py); the KV of
        the rest is stale. policy: the lookup.DraftPolicy to tell."""
        out: list[GenerationChunk] = []
        kept = 0
        for i, d in enumerate(drafts):
            out += self.step(rows[i])
            if self.done or self.last_token != d:
                break
            kept += 1
        if drafts and policy is not None:
            policy.update(len(drafts), kept)
            self.stats.draft_tokens, self.stats.accepted_tokens = policy.drafted, policy.accepted
        if kept == len(drafts) and not self.done:
            out += self.step(rows[len(drafts)])
        return out, kept


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the longest common prefix of a and b, at most `limit` (binary search on
    slice equality: C-speed compares instead of a Python loop per token)."""
    lo, hi = 0, min(len(a), len(b), limit)
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class PromptCache:
    """The KV cache of the last sequence one caller generated, kept for the next call:
    a prompt that starts with the same tokens (the next turn of a chat, a fixed system
    prompt) feeds only the tokens after the common prefix, as llama-cpp-python's `Llama`
    and llama-server's slots do. One sequence at a time: a stream started while another
    one of the same PromptCache is still running takes the cache over, and the older
    stream fails at its next step instead of reading KV that is no longer its own."""

    def __init__(self) -> None:
        self.cache = None
        self.ids: list[int] = []  # tokens whose K/V are in `cache`, positions 0..len-1
        self.epoch = 0  # bumped by every take(): a stream holds the cache while it matches

    def take(self, model, ids: Sequence[int], capacity: int) -> tuple[object, int]:
        """(cache, n): the cache to run `ids` in, of at least `capacity` positions, and how
        many leading tokens of ids it holds already. At least the last prompt token is
        always fed: its logits start the generation."""
        self.epoch += 1
        cache, n = self.cache, 0
        if cache is not None and cache.max_seq_len >= capacity and _still_valid(model, cache):
            n = common_prefix(self.ids, list(ids), min(len(ids) - 1, cache.length))
        else:
            self.cache = cache = model.new_cache(capacity)
        self.ids = list(ids[:n])
        return cache, n

    def clear(self) -> None:
        self.cache, self.ids = None, []
        self.epoch += 1


def _still_valid(model, cache) -> bool:
    """False when the model handed the cache's KV slot to another cache since (native)."""
    owns = getattr(model, "owns", None)
    return owns is None or owns(cache)


def generate_stream(
    lm,
    prompt_ids: Sequence[int],
    max_tokens: int = 256,
    sampler=None,
    stop: Sequence[str] | None = None,
    stop_ids: Sequence[int] | None = None,
    ctx: int | None = None,
    prefill_chunk: int = 256,
    ignore_eos: bool = False,
    prompt_cache: PromptCache | None = None,
    lookup=None,
) -> Iterator[GenerationChunk]:
    """Yield GenerationChunks for a prompt; the last one carries finish_reason and stats.
    With a PromptCache, the prompt's prefix that the cache holds is not fed again, and the
    cache keeps this sequence's KV for the next call. lookup: a lookup.PromptLookupDecoding
    (speculative decoding with drafts from the text; the same output, fewer forwards)."""
    st = TokenStream(lm, prompt_ids, max_tokens, sampler, stop, stop_ids, ctx, ignore_eos)
    model, ids = lm.model, st.ids
    need = min(st.n_ctx, len(ids) + st.max_tokens + 1)
    if prompt_cache is None:
        pc = PromptCache()
        cache, start = pc.take(model, ids, need)
    else:
        pc = prompt_cache
        # room for the whole context, so that the next turn of a conversation still fits:
        # a KV page costs memory only once written (native slots; numpy's large arrays)
        cache, start = pc.take(model, ids, st.n_ctx)
    epoch = pc.epoch
    st.stats.cached_tokens = start

    def feed(tokens: list[int], pos: int, last_only: bool) -> np.ndarray:
        if pc.epoch != epoch:
            raise RuntimeError("another generation took over this model's prompt cache; "
                               "run one stream at a time")
        del pc.ids[pos:]  # what stays valid if the forward fails midway
        out = model.forward(np.asarray(tokens, np.int64), cache, pos, last_only=last_only)
        pc.ids.extend(tokens)
        return out

    t0 = time.perf_counter()
    logits = None
    for s in range(start, len(ids), prefill_chunk):  # chunks bound the activation memory
        logits = feed(ids[s : s + prefill_chunk], s, True)
    st.stats.prefill_seconds = time.perf_counter() - t0
    if st.max_tokens == 0:
        yield st.finish("length")
        return
    pos = len(ids)
    policy = None
    if lookup is not None:
        from .lookup import DraftPolicy

        policy = DraftPolicy(lookup)
    yield from st.step(logits[-1])
    while not st.done:
        # st.last_token is sampled, not fed yet: it goes to position pos, drafts after it
        drafts = st.draft(policy, cache.max_seq_len - pos) if policy is not None else []
        rows = feed([st.last_token] + drafts, pos, False)  # [1 + d, vocab]: row i follows token i
        chunks, kept = st.step_rows(rows, drafts, policy)
        yield from chunks
        pos += 1 + kept
        if kept < len(drafts):
            del pc.ids[pos:]  # the rejected drafts' KV is stale: not part of the cached sequence


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
