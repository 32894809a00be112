"""The one thread that owns the model (the native model is not thread-safe): it takes jobs
from a bounded queue. Generation jobs go to the BatchScheduler (server_batch.py), which
decodes all running requests together, one batched forward per step; other jobs
(CallJob) run between two steps. A model without KV slots (the numpy Transformer) runs
generation jobs one at a time instead.

Results go back to the HTTP event loop through `loop.call_soon_threadsafe`, so the loop
never waits on the model. A job is cancelled (its client went away) by setting its
event; the worker checks it between steps and frees its KV slot.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .generate import generate_stream
from .sample import Sampler
from .server_protocol import APIError, GenParams

SCORE_CHUNK = 128  # prompt tokens per full-logits forward when scoring (bounds memory)


@dataclass
class TokenInfo:
    """A token with its log-probability under the model's raw distribution (no
    temperature or penalties) and the `top` most likely alternatives (id, logprob).
    The first prompt token has no logprob (None)."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] | None


@dataclass
class Delta:
    """New output of prompt `index`: text and the tokens behind it (for logprobs).
    echo: the prompt itself. finish_reason and token counts come on the last one."""

    index: int
    text: str
    tokens: list[TokenInfo] = field(default_factory=list)
    echo: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class JobFailed:
    message: str


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64).reshape(-1)  # [vocab]
    m = z.max()
    return z - (m + np.log(np.exp(z - m).sum()))


def _token_info(lp: np.ndarray, token: int, top_n: int) -> TokenInfo:
    top: list[tuple[int, float]] = []
    if top_n > 0:
        idx = np.argpartition(-lp, top_n - 1)[:top_n]
        idx = idx[np.argsort(-lp[idx], kind="stable")]
        top = [(int(i), float(lp[i])) for i in idx]
    return TokenInfo(int(token), float(lp[token]), top)


class _SamplingHook:
    """Stands in for the Sampler that generate_stream calls: applies OpenAI's
    frequency/presence penalties (over generated tokens) and logit_bias before the
    Sampler, and records every sampled token's logprob when asked to."""

    def __init__(self, sampler: Sampler, p: GenParams, vocab: int):
        self.sampler, self.p = sampler, p
        self.adjust = bool(p.frequency_penalty or p.presence_penalty or p.logit_bias)
        self.counts = np.zeros(vocab, np.float64)  # [vocab] generated-token counts
        self.bias_ids = np.fromiter(p.logit_bias.keys(), np.int64, len(p.logit_bias))
        self.bias_vals = np.fromiter(p.logit_bias.values(), np.float64, len(p.logit_bias))
        self.infos: list[TokenInfo] = []

    @property
    def done(self) -> bool:
        """The request's grammar, if any, is complete (see grammar.GrammarSampler)."""
        return getattr(self.sampler, "done", False)

    def sample(self, logits: np.ndarray, previous) -> int:
        z = np.asarray(logits).reshape(-1)  # [vocab]
        lp = _log_softmax(z) if self.p.logprobs is not None else None
        if self.adjust:
            z = z.astype(np.float64)
            z -= self.p.frequency_penalty * self.counts + self.p.presence_penalty * (self.counts > 0)
            z[self.bias_ids] += self.bias_vals
        tok = int(self.sampler.sample(z, previous))
        self.counts[tok] += 1
        if lp is not None:
            self.infos.append(_token_info(lp, tok, self.p.logprobs))
        return tok

    def take(self) -> list[TokenInfo]:
        out, self.infos = self.infos, []
        return out


def make_hook(lm, p: GenParams, choice: int = 0) -> _SamplingHook:
    """The sampler of one choice of a request: its sampling parameters, then penalties,
    logit bias and logprobs (the hook), then its grammar (response_format & co.), which
    masks what the penalties left before the draw. With n > 1 and a seed, sample j of a
    prompt draws from seed + j (the first as a request with n = 1 would)."""
    seed = None if p.seed is None else (p.seed + choice % p.n) % (1 << 64)
    sampler = Sampler(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
                      repetition_penalty=p.repetition_penalty, seed=seed)
    if p.grammar is not None:
        from .grammar import GrammarSampler

        sampler = GrammarSampler(sampler, lm, p.grammar)
    return _SamplingHook(sampler, p, lm.tokenizer.vocab_size)


class Job:
    """Work for the model thread. `run` gets the LoadedModel; `cancelled` is set when
    nobody waits for the result any more."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def run(self, lm) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def abandon(self) -> None:
        """Called when the job will not run (server stopping)."""


class CallJob(Job):
    """Runs fn(lm) on the model thread; the result comes back through a Future."""

    def __init__(self, fn: Callable[[Any], Any]):
        super().__init__()
        self.fn, self.future = fn, concurrent.futures.Future()

    def run(self, lm) -> None:
        try:
            self.future.set_result(self.fn(lm))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            self.future.set_exception(e)

    def abandon(self) -> None:
        self.future.cancel()


class GenJob(Job):
    """Generation for one or more prompts (token ids), one after another. Events
    (Delta, JobFailed, and None at the end) go to `events`, an asyncio.Queue of `loop`."""

    def __init__(self, prompts: list[list[int]], params: GenParams, max_tokens: list[int],
                 echo_texts: list[str] | None, loop: asyncio.AbstractEventLoop):
        super().__init__()
        self.prompts, self.params, self.max_tokens = prompts, params, max_tokens
        self.echo_texts = echo_texts
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()

    def emit(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is gone
            self.cancelled.set()

    def abandon(self) -> None:
        self.emit(JobFailed("the server is shutting down"))
        self.emit(None)

    def run(self, lm) -> None:
        try:
            for i, ids in enumerate(self.prompts):
                if self.cancelled.is_set():
                    return
                self._one(lm, i, ids)
        except Exception as e:  # noqa: BLE001 - requests were checked; this is our failure
            self.emit(JobFailed(f"generation failed: {type(e).__name__}: {e}"))
        finally:
            self.emit(None)

    def _one(self, lm, index: int, ids: list[int]) -> None:
        p = self.params
        if p.echo:
            infos = score_prompt(lm, ids, p.logprobs, self.cancelled) if p.logprobs is not None else []
            if infos is None:
                return
            self.emit(Delta(index, self.echo_texts[index] if self.echo_texts else "", infos, echo=True))
        max_tokens = self.max_tokens[index]
        if max_tokens == 0:
            self.emit(Delta(index, "", finish_reason="length", prompt_tokens=len(ids)))
            return
        hook = make_hook(lm, p, index)
        eos = set(lm.tokenizer.eos_ids)
        gen = generate_stream(lm, ids, max_tokens, hook, stop=p.stop, ignore_eos=p.ignore_eos)
        try:
            for ch in gen:
                if self.cancelled.is_set():
                    return
                infos = hook.take()
                if ch.finish_reason:
                    # the end-of-sequence token ends the text and is not part of it
                    if infos and ch.token is None and infos[-1].token in eos and ch.finish_reason == "stop":
                        infos = infos[:-1]
                    st = ch.stats
                    self.emit(Delta(index, ch.text, infos, finish_reason=ch.finish_reason,
                                    prompt_tokens=st.prompt_tokens,
                                    completion_tokens=st.completion_tokens))
                elif ch.text or infos:
                    self.emit(Delta(index, ch.text, infos))
        finally:
            gen.close()


def score_prompt(lm, ids: list[int], top_n: int, cancelled: threading.Event) -> list[TokenInfo] | None:
    """Logprob of every prompt token given the ones before it (the first has none):
    a full forward keeping every position's logits, in chunks. None if cancelled."""
    model = lm.model
    cache = model.new_cache(len(ids))
    infos = [TokenInfo(int(ids[0]), None, None)]
    for s in range(0, len(ids), SCORE_CHUNK):
        if cancelled.is_set():
            return None
        part = np.asarray(ids[s : s + SCORE_CHUNK], np.int64)  # [m]
        logits = model.forward(part, cache, s, last_only=False)  # [m, vocab]
        for r in range(part.size):
            t = s + r + 1  # row r predicts token t
            if t >= len(ids):
                break
            infos.append(_token_info(_log_softmax(logits[r]), ids[t], top_n))
    return infos


class Worker:
    """The model's thread and its bounded queue. `max_queue` bounds the requests held
    at once (waiting plus running); past it `submit` raises a 503 APIError."""

    def __init__(self, lm, max_queue: int = 64, batch_tokens: int | None = None,
                 cache_tokens: int | None = None, lookup=None):
        from .server_batch import DEFAULT_BATCH_TOKENS, BatchScheduler

        self.lm, self.max_queue = lm, max_queue
        self._pending: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._n_done = 0
        self._n_cancelled = 0
        # batching needs a model with KV slots beyond slot 0 (NativeModel, n_seq > 1)
        self.sched = None
        if getattr(lm.model, "n_seq", 1) > 1 and hasattr(lm.model, "forward_batch"):
            self.sched = BatchScheduler(lm, batch_tokens or DEFAULT_BATCH_TOKENS, cache_tokens, lookup)

    @property
    def n_done(self) -> int:
        return self._n_done + (self.sched.n_done if self.sched else 0)

    @property
    def n_cancelled(self) -> int:
        return self._n_cancelled + (self.sched.n_cancelled if self.sched else 0)

    @property
    def held(self) -> int:
        """Requests waiting or running."""
        return len(self._pending) + (self._running is not None) + (self.sched.n_jobs if self.sched else 0)

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="luthier-model", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stopping = True
            dropped = list(self._pending)
            self._pending.clear()
            if self._running is not None:
                self._running.cancelled.set()
            self._cv.notify_all()
        for job in dropped:
            job.cancelled.set()
            job.abandon()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def busy(self) -> bool:
        return self._running is not None or bool(self.sched and self.sched.n_jobs)

    def check_capacity(self) -> None:
        """503 now if a job could not be queued (before a request spends work on it)."""
        if self._stopping or self._thread is None:
            raise APIError(503, "the server is not running", "server_error", code="unavailable")
        if self.held >= self.max_queue:
            raise APIError(503, f"the server is busy ({self.max_queue} requests held); retry later",
                           "server_error", code="queue_full", headers={"Retry-After": "1"})

    def submit(self, job: Job) -> None:
        with self._cv:
            self.check_capacity()
            self._pending.append(job)
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """The client is gone: drop the job if it waits, stop it if it runs."""
        if job.cancelled.is_set():
            return
        job.cancelled.set()
        with self._cv:
            if job not in self._pending:
                return  # running (the scheduler drops it at its next step) or done
            self._n_cancelled += 1  # before it leaves the queue: idle implies counted
            self._pending.remove(job)

    def call(self, fn: Callable[[Any], Any], timeout: float | None = None) -> Any:
        """fn(lm) on the model thread, waiting for its result (never from the event loop)."""
        job = CallJob(fn)
        self.submit(job)
        return job.future.result(timeout)

    def _loop(self) -> None:
        sched = self.sched
        while True:
            with self._cv:
                while not self._pending and not self._stopping and not (sched and sched.active):
                    self._cv.wait()
                if self._stopping:
                    if sched:
                        sched.fail_all("the server is shutting down")
                    return
                if sched and sched.active and not self._pending:
                    job = None
                else:
                    job = self._running = self._pending.popleft()
            if job is not None and sched is not None and isinstance(job, GenJob):
                with self._cv:  # the scheduler counts it from here on (see held)
                    sched.add(job)
                    self._running = None
                continue  # take every queued job before the next step
            if job is not None:
                self._run_one(job)
                continue
            try:
                sched.step()
            except Exception as e:  # noqa: BLE001 - our failure: fail the batch, keep serving
                sched.fail_all(f"generation failed: {type(e).__name__}: {e}")

    def _run_one(self, job: Job) -> None:
        try:
            if not job.cancelled.is_set():
                job.run(self.lm)
        finally:
            with self._cv:
                if job.cancelled.is_set():  # counted before the worker looks idle
                    self._n_cancelled += 1
                else:
                    self._n_done += 1
                self._running = None
