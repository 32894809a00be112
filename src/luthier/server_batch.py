"""Continuous batching: the server's requests decode together through one model.

Every running sequence holds a KV slot of the native model (slots 1..n_seq-1; slot 0 stays
for the single-sequence interface that CallJobs and prompt scoring use). Each `step` runs
ONE forward over a batch of rows:

    [the next token of every decoding sequence] + [prompt chunks of prefilling sequences]

so the weights are read once for all of them (the m > 1 LUT matmul), and a long prompt is
fed in chunks of at most `batch_tokens` rows per step, so it never stalls the others for
long. New sequences join between steps as slots free up; finished and cancelled ones leave
and their KV pages go back to the OS (NativeModel.release).

Prompt caching (llama-server's cache_prompt, vLLM's prefix caching): a finished sequence's
slot keeps its KV while the idle slots together hold at most `cache_tokens` tokens (least
recently used ones are released first). A new prompt starts from the longest prefix it
shares with an idle slot's kept tokens or a running sequence's (taking the idle slot over,
or copying the prefix's KV into its own slot) and feeds only the rest: the next turn of a
chat resends the whole conversation, and requests that share a long system prompt compute
it once (a prompt stays queued while a running sequence still prefills a prefix that would
give it WAIT_FOR_PREFIX more tokens, then copies it).

Every row's arithmetic is independent of the rest of its batch (tables, lookups, attention
and the head are per row), so a greedy request gives the same tokens alone or under load.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import numpy as np

from .generate import GenerationChunk, TokenStream, common_prefix

DEFAULT_BATCH_TOKENS = 256  # rows per forward: decode tokens first, prompt chunks after
# prompt lookup drafts (--lookup) only while one sequence decodes, at most this many rows
# with its drafts. Extra rows are not free even then (SmolLM2, 2 threads: 1 / 2 / 4 / 8
# rows 5.9 / 8.1 / 12 / 23 ms), and with several sequences every draft row costs about as
# much as a sure token of another sequence: 4 clients copying a text fell from 280 to
# 187 tok/s with drafts, while 1 client rose from 93 to 123 tok/s.
LOOKUP_ROWS = 8
WAIT_FOR_PREFIX = 16  # a prompt waits for a prefilling one that will give it this many more tokens


def _put_all(items) -> None:
    """On the event loop: each (job, event) into its job's queue, in order."""
    for job, item in items:
        job.events.put_nowait(item)


@dataclass
class _Seq:
    """One prompt of a GenJob while it runs."""

    job: object  # server_worker.GenJob
    index: int
    stream: TokenStream
    hook: object  # server_worker._SamplingHook
    eos: set
    slot: int = -1
    fed: int = 0  # tokens in the slot's cache
    t_admit: float = field(default_factory=time.perf_counter)
    policy: object = None  # lookup.DraftPolicy under --lookup
    drafts: list = field(default_factory=list)  # this step's drafted tokens

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.stream.ids)


class BatchScheduler:
    """Runs the GenJobs handed to `add` together, one `step` at a time, on the thread that
    owns the model. `n_jobs`: jobs not finished yet (waiting or running)."""

    def __init__(self, lm, batch_tokens: int = DEFAULT_BATCH_TOKENS, cache_tokens: int | None = None,
                 lookup=None):
        self.lm = lm
        self.lookup = lookup  # lookup.PromptLookupDecoding: drafts from each sequence's text
        self.model = lm.model
        self.batch_tokens = max(1, int(batch_tokens))
        # KV kept in idle slots for prompt caching: one context's worth unless told
        self.cache_tokens = int(self.model.ctx if cache_tokens is None else cache_tokens)
        self.free_slots = collections.deque(range(1, self.model.n_seq))  # least recently used first
        self.kept: dict[int, list[int]] = {}  # idle slot -> the tokens its KV holds
        self.n_cached_tokens = 0  # prompt tokens served from kept KV so far
        self.n_prompt_tokens = 0  # prompt and generated tokens of finished sequences
        self.n_generated_tokens = 0
        self.n_draft_tokens = 0  # lookup drafts of finished sequences, and those accepted
        self.n_accepted_tokens = 0
        self.waiting: collections.deque[_Seq] = collections.deque()
        self.running: list[_Seq] = []
        self._left: dict[object, int] = {}  # job -> sequences not finished
        self.n_done = 0
        self.n_cancelled = 0
        self.steps = 0
        self.max_rows = 0  # the largest batch so far (rows of one forward)
        self.max_decode = 0  # the most decode rows (sequences) in one forward so far
        self._logits = np.empty((0, self.model.vocab_size), np.float32)
        self._outbox: list = []  # (job, event) of this step, delivered together

    @property
    def n_jobs(self) -> int:
        return len(self._left)

    @property
    def active(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, job) -> None:
        """Queue every prompt of a GenJob; a prompt that cannot run fails the whole job."""
        from .server_worker import JobFailed, make_hook

        p = job.params
        seqs = []
        try:
            for i, ids in enumerate(job.prompts):
                hook = make_hook(self.lm, p, i)
                st = TokenStream(self.lm, ids, job.max_tokens[i], hook, stop=p.stop, ignore_eos=p.ignore_eos)
                seqs.append(_Seq(job, i, st, hook, set(self.lm.tokenizer.eos_ids)))
                if self.lookup is not None:
                    from .lookup import DraftPolicy

                    seqs[-1].policy = DraftPolicy(self.lookup)
        except Exception as e:  # noqa: BLE001 - requests were checked; report, do not crash
            job.emit(JobFailed(f"generation failed: {type(e).__name__}: {e}"))
            job.emit(None)
            self.n_done += 1
            return
        self._left[job] = len(seqs)
        self.waiting.extend(seqs)

    def fail_all(self, message: str) -> None:
        from .server_worker import JobFailed

        for job in list(self._left):
            job.emit(JobFailed(message))
            job.emit(None)
        for s in self.running:
            self._free(s.slot)
        self.running.clear()
        self.waiting.clear()
        self._left.clear()

    # -- one step ---------------------------------------------------------------------------

    def step(self) -> None:
        try:
            self._step()
        finally:
            self._deliver()

    def _step(self) -> None:
        self._drop_cancelled()
        self._admit()
        if not self.running:
            return
        tokens, slots, positions, out_rows, plan = [], [], [], [], []  # plan: (seq, first out row, rows)
        decode = [s for s in self.running if not s.prefilling]
        spare = LOOKUP_ROWS - 1 if len(decode) == 1 else 0  # draft rows this step may add
        for s in decode:  # decode rows first: the next token, then any drafts after it
            s.drafts = []
            if s.policy is not None and spare > 0:
                s.drafts = s.stream.draft(s.policy, min(self.model.ctx - s.fed, spare + 1))
                spare -= len(s.drafts)
            n = 1 + len(s.drafts)
            tokens.extend([s.stream.last_token] + s.drafts)
            slots.extend([s.slot] * n)
            positions.extend(range(s.fed, s.fed + n))
            plan.append((s, len(out_rows), n))
            out_rows.extend(range(len(tokens) - n, len(tokens)))
        self.max_decode = max(self.max_decode, len(decode))
        budget = self.batch_tokens - len(tokens)
        for s in self.running:  # then prompt chunks, oldest first, while the budget lasts
            if not s.prefilling or budget <= 0:
                continue
            ids = s.stream.ids
            n = min(budget, len(ids) - s.fed)
            tokens.extend(ids[s.fed : s.fed + n])
            slots.extend([s.slot] * n)
            positions.extend(range(s.fed, s.fed + n))
            budget -= n
            if s.fed + n == len(ids):  # the prompt's last row gives the first token
                plan.append((s, len(out_rows), 1))
                out_rows.append(len(tokens) - 1)
        if not tokens:
            return
        r = len(out_rows)
        if self._logits.shape[0] < r:  # grown, never shrunk: no fresh pages every step
            self._logits = np.empty((max(r, 2 * self._logits.shape[0]), self.model.vocab_size), np.float32)
        logits = self.model.forward_batch(tokens, slots, positions, out_rows,
                                          out=self._logits[:r])  # [r, vocab]
        self.steps += 1
        self.max_rows = max(self.max_rows, len(tokens))
        # every row is now cached: advance each sequence past the rows it fed
        fed = collections.Counter(slots)
        for s in self.running:
            s.fed += fed.get(s.slot, 0)
        now = time.perf_counter()
        for s, r0, n in plan:
            if s.stream.stats.prefill_seconds == 0.0:
                s.stream.stats.prefill_seconds = now - s.t_admit
            self._sample(s, logits[r0 : r0 + n])
            if s.stream.done:
                self._finish(s)

    def _sample(self, s: _Seq, rows: np.ndarray) -> None:
        """Sample a sequence's rows [1 + drafts, vocab] (TokenStream.step_rows); a rejected
        draft's KV, and what followed it, is stale: the slot's cached length goes back."""
        chunks, kept = s.stream.step_rows(rows, s.drafts, s.policy)
        for ch in chunks:
            self._emit(s, ch)
        s.fed -= len(s.drafts) - kept

    def _admit(self) -> None:
        from .server_worker import Delta, score_prompt

        held = []  # prompts that wait for a prefix being computed (see _should_wait)
        while self.waiting and self.free_slots:
            s = self.waiting.popleft()
            p, job = s.job.params, s.job
            ids = s.stream.ids
            src, n = self._best_prefix(ids)
            if self._should_wait(ids, n):
                held.append(s)
                continue
            if p.echo:  # prompt logprobs: one full forward in the scoring slot (0)
                infos = score_prompt(self.lm, ids, p.logprobs, job.cancelled) if p.logprobs is not None else []
                if infos is None:
                    continue  # cancelled while scoring; _drop_cancelled settles the job
                job.emit(Delta(s.index, job.echo_texts[s.index] if job.echo_texts else "", infos, echo=True))
            if s.stream.max_tokens == 0:  # nothing to generate: no slot, no prefill
                self._emit(s, s.stream.finish("length"))
                self._seq_done(s)
                continue
            s.slot, s.fed = self._take_slot(src, n)
            s.stream.stats.cached_tokens = s.fed
            self.n_cached_tokens += s.fed
            s.t_admit = time.perf_counter()
            self.running.append(s)
        self.waiting.extendleft(reversed(held))

    def _best_prefix(self, ids: list[int]) -> tuple[int | None, int]:
        """(slot, n): the idle slot or running sequence whose KV holds the longest prefix
        of the prompt `ids`, and its length (at most all but the last token: its logits
        are needed); (None, 0) when none shares any."""
        src, n = None, 0
        for slot, toks in self._prefix_sources():
            k = common_prefix(toks, ids, len(ids) - 1)
            if k > n:
                src, n = slot, k
        return src, n

    def _should_wait(self, ids: list[int], have: int) -> bool:
        """Whether a prompt should stay queued for now because a running sequence is still
        prefilling a prefix they share (requests that arrive together with one system
        prompt) longer than the `have` tokens available now: once it is computed, this
        prompt copies it instead of computing it again."""
        if self.cache_tokens <= 0:
            return False
        limit = len(ids) - 1
        return any(s.prefilling and common_prefix(s.stream.ids, ids, limit) >= have + WAIT_FOR_PREFIX
                   for s in self.running)

    def _take_slot(self, src: int | None, n: int) -> tuple[int, int]:
        """(slot, n): a free slot for a prompt whose first n tokens slot `src` holds
        (_best_prefix), and how many of them the returned slot holds. An idle source is
        taken over when the prompt reuses most of what it keeps (or no empty slot is
        left); otherwise the prefix's KV is copied into an empty (or the least recently
        used) slot, which leaves the source's cache as it is."""
        empty = next((sl for sl in self.free_slots if sl not in self.kept), None)
        if src in self.kept and (2 * n >= len(self.kept[src]) or empty is None):
            slot = src  # positions from n on are overwritten as the prompt is fed
        else:
            slot = empty if empty is not None else next(
                (sl for sl in self.free_slots if sl != src), self.free_slots[0])
            if slot != src:
                self.model.release(slot)
                if n:
                    self.model.copy_prefix(src, slot, n)
        self.kept.pop(slot, None)
        self.free_slots.remove(slot)
        return slot, n

    def _prefix_sources(self):
        """(slot, tokens whose KV it holds) of every idle slot with kept KV and every
        running sequence (its prompt so far, then what it generated); none with prompt
        caching off (cache_tokens 0)."""
        if self.cache_tokens <= 0:
            return
        yield from self.kept.items()
        for s in self.running:
            yield s.slot, s.stream.history[: s.fed]

    def _free(self, slot: int, tokens: list[int] | None = None) -> None:
        """Slot back to the free list (most recently used last); keeps `tokens`' KV when
        prompt caching has room for them, evicting the least recently used kept slots."""
        self.free_slots.append(slot)
        if tokens and len(tokens) <= self.cache_tokens:
            self.kept[slot] = tokens
            total = sum(len(t) for t in self.kept.values())
            for old in list(self.free_slots):
                if total <= self.cache_tokens:
                    break
                if old in self.kept:
                    total -= len(self.kept.pop(old))
                    self.model.release(old)
        else:
            self.model.release(slot)

    def _emit(self, s: _Seq, ch: GenerationChunk) -> None:
        from .server_worker import Delta

        infos = s.hook.take()
        if ch.finish_reason:
            # the end-of-sequence token ends the text and is not part of it
            if infos and ch.token is None and infos[-1].token in s.eos and ch.finish_reason == "stop":
                infos = infos[:-1]
            st = ch.stats
            self.n_prompt_tokens += st.prompt_tokens
            self.n_generated_tokens += st.completion_tokens
            self.n_draft_tokens += st.draft_tokens
            self.n_accepted_tokens += st.accepted_tokens
            self._post(s.job, Delta(s.index, ch.text, infos, finish_reason=ch.finish_reason,
                                    prompt_tokens=st.prompt_tokens, completion_tokens=st.completion_tokens,
                                    cached_tokens=st.cached_tokens))
        elif ch.text or infos:
            self._post(s.job, Delta(s.index, ch.text, infos))

    def _post(self, job, item) -> None:
        """Queue an event for the job's event loop; `_deliver` hands a step's events over
        in one call per loop (one wake-up of the HTTP thread, not one per token)."""
        self._outbox.append((job, item))

    def _deliver(self) -> None:
        if not self._outbox:
            return
        by_loop: dict = {}
        for job, item in self._outbox:
            by_loop.setdefault(job.loop, []).append((job, item))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the event loop is closed: the server is gone
                for job, _ in items:
                    job.cancelled.set()

    def _finish(self, s: _Seq) -> None:
        self.running.remove(s)
        # the KV holds the prompt and every generated token but the last (never fed)
        self._free(s.slot, s.stream.history[: s.fed])
        self._seq_done(s)

    def metrics(self) -> dict[str, tuple[str, str, float]]:
        """name -> (type, help, value) for /metrics (read from the HTTP thread: only
        counters and sizes, each read at once)."""
        kept = list(self.kept.values())
        return {
            "prompt_tokens_total": ("counter", "prompt tokens of finished sequences", self.n_prompt_tokens),
            "prompt_tokens_cached_total": ("counter", "prompt tokens served from prompt caching",
                                           self.n_cached_tokens),
            "generation_tokens_total": ("counter", "tokens generated by finished sequences",
                                        self.n_generated_tokens),
            "decode_steps_total": ("counter", "batched forwards run", self.steps),
            "draft_tokens_total": ("counter", "prompt lookup drafts checked (--lookup)", self.n_draft_tokens),
            "draft_tokens_accepted_total": ("counter", "prompt lookup drafts accepted", self.n_accepted_tokens),
            "sequences_running": ("gauge", "sequences holding a KV slot", len(self.running)),
            "sequences_waiting": ("gauge", "sequences waiting for a KV slot", len(self.waiting)),
            "kv_kept_tokens": ("gauge", "tokens of KV idle slots keep for prompt caching",
                               sum(len(t) for t in kept)),
            "batch_rows_max": ("gauge", "the most rows one forward has taken", self.max_rows),
        }

    def drop_kept(self) -> None:
        """Release every idle slot's kept KV (prompt caching's memory back to the OS)."""
        for slot in list(self.kept):
            del self.kept[slot]
            self.model.release(slot)

    def _seq_done(self, s: _Seq) -> None:
        left = self._left.get(s.job)
        if left is None:
            return
        if left <= 1:
            # count before the job leaves `_left`: a reader that sees the worker idle
            # (no jobs) must also see the count
            self.n_done += 1
            del self._left[s.job]
            self._post(s.job, None)
        else:
            self._left[s.job] = left - 1

    def _drop_cancelled(self) -> None:
        gone = [j for j in self._left if j.cancelled.is_set()]
        if not gone:
            return
        for s in [s for s in self.running if s.job.cancelled.is_set()]:
            self.running.remove(s)
            self._free(s.slot)
        self.waiting = collections.deque(s for s in self.waiting if not s.job.cancelled.is_set())
        for j in gone:
            self.n_cancelled += 1  # before the job leaves `_left` (see _seq_done)
            del self._left[j]
            j.emit(None)
