"""`luthier.Llama`: the Python API, shaped like llama-cpp-python's `Llama`.

    from luthier import Llama
    llm = Llama(bits=2, group_size=64, n_threads=2)          # default model, or model_path=
    out = llm("Once upon a time", max_tokens=32)              # OpenAI-shaped completion dict
    for chunk in llm.create_chat_completion([{"role": "user", "content": "Hi"}], stream=True):
        print(chunk["choices"][0]["delta"].get("content", ""), end="")
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Iterator, Sequence

from . import embed as embed_mod
from .engine import QuantConfig, load_model, parse_bits
from .generate import GenerationChunk, PromptCache, generate_stream
from .grammar import GrammarSampler, from_request
from .lookup import PromptLookupDecoding
from .sample import Sampler
from .tools import ToolStream, check_tool_calls
from .tools import encode as encode_tools
from .tools import from_request as tool_spec
from .tools import parse as parse_tools


def _usage(stats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}


class Llama:
    """A quantized model ready to generate. Arguments follow llama-cpp-python where they
    overlap (model_path, n_ctx, n_threads, seed, verbose); bits / group_size / head_bits /
    embd_bits (8 or 16; default 16 with a float head, else 8) / mode choose luthier's quantization of the linear layers.
    bits "auto" (default): a GGUF's own quantized codes where it has them ("source"), else 4.
    The KV of the last generation is kept (as llama-cpp-python does): a prompt that starts
    like the previous prompt + completion (the next turn of a chat) feeds only the new
    tokens; usage.prompt_tokens_details.cached_tokens says how many were reused.
    `reset()` drops it. draft_model=PromptLookupDecoding(num_pred_tokens=10): speculative
    decoding with drafts from the text (llama-cpp-python's LlamaPromptLookupDecoding)."""

    def __init__(self, model_path: str | None = None, *, bits: int | str = "auto", group_size: int = 128,
                 head_bits: int | str = 8, embd_bits: int | None = None, mode: str = "fast",
                 n_ctx: int | None = None,
                 n_threads: int | None = None, seed: int | None = None, verbose: bool = False,
                 draft_model: PromptLookupDecoding | None = None):
        cfg = QuantConfig(bits=parse_bits(bits), group_size=group_size, head_bits=parse_bits(head_bits),
                          embd_bits=embd_bits, mode=mode)
        self._lm = load_model(model_path, cfg, n_threads, n_ctx)
        self.model_path = self._lm.path
        self.seed = seed
        self.verbose = verbose
        self._prompt_cache = PromptCache()
        self.draft_model = draft_model  # speculative drafts from the text (lookup.py), as llama-cpp-python's

    def reset(self) -> None:
        """Forget the kept KV cache: the next prompt is fed from its first token."""
        self._prompt_cache.clear()

    # -- tokens ---------------------------------------------------------------------------
    def tokenize(self, text: bytes | str, add_bos: bool = True, special: bool = False) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        tok = self._lm.tokenizer
        return tok.encode(text, add_bos=add_bos and tok.add_bos, special=special)

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        return self._lm.tokenizer.decode_bytes(list(tokens))

    def n_ctx(self) -> int:
        return int(self._lm.extra["ctx"])

    def n_vocab(self) -> int:
        return int(self._lm.model.vocab_size)

    @property
    def stats(self):
        """Statistics of the last generation (tok/s, GB/s of weights)."""
        return getattr(self, "_last_stats", None)

    # -- embeddings ---------------------------------------------------------------------
    def embed(self, input: str | list[str], normalize: bool = True, truncate: bool = True,
              pooling: str = "mean") -> list[float] | list[list[float]]:
        """llama-cpp-python's embed: one vector per text (embed.py: the final hidden states,
        mean-pooled, L2-normalized unless normalize=False), a list of them for a list."""
        out = [v.tolist() for v, _ in self._embed_texts(input, truncate, pooling, normalize)]
        return out[0] if isinstance(input, str) else out

    def create_embedding(self, input: str | list[str], model: str | None = None) -> dict:
        """OpenAI's embeddings response for one text or a list of them."""
        done = self._embed_texts(input, truncate=False)
        data = [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, (v, _) in enumerate(done)]
        n = sum(k for _, k in done)
        return {"object": "list", "data": data, "model": model or self.model_path,
                "usage": {"prompt_tokens": n, "total_tokens": n}}

    def _embed_texts(self, input: str | list[str], truncate: bool, pooling: str = "mean",
                     normalize: bool = True) -> list[tuple]:
        """(vector, tokens) of each text (embed.py)."""
        out = []
        for text in [input] if isinstance(input, str) else list(input):
            ids = embed_mod.fit_context(self.tokenize(text, add_bos=True), self.n_ctx(), truncate)
            out.append((embed_mod.embed_ids(self._lm, ids, pooling, normalize), len(ids)))
        return out

    # -- generation ---------------------------------------------------------------------
    def _sampler(self, temperature, top_p, top_k, min_p, repeat_penalty, seed, constraint: str | None = None):
        """The sampler, behind a grammar mask when `constraint` (an llguidance grammar) is given."""
        s = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                    repetition_penalty=repeat_penalty, seed=self.seed if seed is None else seed)
        return s if constraint is None else GrammarSampler(s, self._lm, constraint)

    def _stream(self, ids, max_tokens, stop, sampler) -> Iterator[GenerationChunk]:
        if isinstance(stop, str):
            stop = [stop]
        max_tokens = self.n_ctx() - len(ids) if max_tokens is None or max_tokens <= 0 else max_tokens
        for ch in generate_stream(self._lm, ids, max_tokens, sampler, stop=stop or [],
                                  prompt_cache=self._prompt_cache, lookup=self.draft_model):
            if ch.stats is not None:
                self._last_stats = ch.stats
            yield ch

    def create_completion(self, prompt: str, suffix: None = None, max_tokens: int | None = 16,
                          temperature: float = 0.8, top_p: float = 0.95, min_p: float = 0.05,
                          echo: bool = False, stop: str | list[str] | None = None,
                          repeat_penalty: float = 1.0, top_k: int = 40, seed: int | None = None,
                          stream: bool = False, grammar: str | None = None) -> dict | Iterator[dict]:
        """llama-cpp-python's create_completion; grammar: a GBNF grammar the text must match."""
        if suffix is not None:
            raise ValueError("suffix is not supported")
        ids = self.tokenize(prompt, add_bos=True, special=True)
        sampler = self._sampler(temperature, top_p, top_k, min_p, repeat_penalty, seed,
                                from_request({"grammar": grammar}))
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        model = self.model_path

        def chunk(text, finish):
            return {"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

        if stream:
            def gen() -> Iterator[dict]:
                if echo:
                    yield chunk(prompt, None)
                for ch in self._stream(ids, max_tokens, stop, sampler):
                    if ch.text or ch.finish_reason:
                        yield chunk(ch.text, ch.finish_reason)
            return gen()
        parts, finish = [], "length"
        for ch in self._stream(ids, max_tokens, stop, sampler):
            parts.append(ch.text)
            finish = ch.finish_reason or finish
        out = chunk((prompt if echo else "") + "".join(parts), finish)
        out["usage"] = _usage(self._last_stats)
        return out

    __call__ = create_completion

    def create_chat_completion(self, messages: list[dict[str, Any]], temperature: float = 0.2,
                               top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05,
                               stop: str | list[str] | None = None, seed: int | None = None,
                               max_tokens: int | None = None, repeat_penalty: float = 1.0,
                               stream: bool = False, response_format: dict | None = None,
                               grammar: str | None = None, tools: list[dict] | None = None,
                               tool_choice: str | dict | None = None,
                               parallel_tool_calls: bool = True) -> dict | Iterator[dict]:
        """llama-cpp-python's create_chat_completion. response_format: OpenAI's
        {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}
        (or llama-cpp-python's {"type": "json_object", "schema": ...}); grammar: GBNF.
        tools / tool_choice / parallel_tool_calls: OpenAI's function calling (tools.py);
        calls come back as message.tool_calls with finish_reason "tool_calls"."""
        spec = tool_spec({"tools": tools, "tool_choice": tool_choice, "parallel_tool_calls": parallel_tool_calls})
        messages = [dict(m, tool_calls=check_tool_calls(m["tool_calls"], "tool_calls"))
                    if isinstance(m, dict) and m.get("tool_calls") else m for m in messages]
        ids = encode_tools(self._lm.tokenizer, messages, spec)
        # structured output (grammar.py): raises ValueError on a constraint it cannot compile
        constraint = from_request({"response_format": response_format, "grammar": grammar})
        if spec is not None:
            constraint = spec.constraint(constraint)
        sampler = self._sampler(temperature, top_p, top_k, min_p, repeat_penalty, seed, constraint)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        model = self.model_path

        def chunk(delta, finish):
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if stream:
            def gen() -> Iterator[dict]:
                yield chunk({"role": "assistant"}, None)
                held = ToolStream(spec)  # tool calls as they are written, or whole at the end
                for ch in self._stream(ids, max_tokens, stop, sampler):
                    for delta in held.deltas(ch.text):
                        yield chunk(delta, None)
                    if ch.finish_reason:
                        deltas, finish = held.final_deltas(ch.finish_reason)
                        for delta in deltas:
                            yield chunk(delta, None)
                        yield chunk({}, finish)
            return gen()
        parts, finish = [], "length"
        for ch in self._stream(ids, max_tokens, stop, sampler):
            parts.append(ch.text)
            finish = ch.finish_reason or finish
        content, calls = parse_tools("".join(parts), spec)
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"], finish = calls, "tool_calls"
        return {"id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": _usage(self._last_stats)}
