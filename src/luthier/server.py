"""`luthier serve`: an OpenAI-compatible HTTP server (Starlette on uvicorn).

Endpoints (each also without the /v1 prefix, as llama.cpp's server answers):

    GET  /health                 {"status": "ok", "model", "busy", "queued", "max_queue"} (no key needed)
    GET  /metrics                Prometheus text: requests, prompt/generated/cached tokens, queue, KV kept
    GET  /v1/models              the served model; its id is the file name without .gguf
    POST /v1/completions         prompt: string | [string] | [token id] | [[token id]]
    POST /v1/chat/completions    messages through the model's (sandboxed) chat template
    POST /v1/embeddings          input: string | [string] | [token id] | [[token id]]; embed.py's
                                 vectors (final hidden states mean-pooled, L2-normalized), float or base64
    POST /tokenize               {"content": str, "add_special": bool} or {"messages": [...]}
                                 -> {"tokens", "count", "max_model_len"}
    POST /detokenize             {"tokens": [int]} -> {"content": str}
    /api/generate, /api/chat, /api/embed, /api/tags, /api/show, /api/ps, /api/version
                                 Ollama's API (server_ollama.py), on the same worker

Decisions where the OpenAI API leaves room:

- model: the served id or "default"; a request without one gets the served model;
  any other name is 404 model_not_found.
- max_tokens (or max_completion_tokens): 0..ctx, else 400; a budget past the end of the
  context is cut there (finish_reason "length"). Defaults: 16 for completions (as OpenAI),
  the rest of the context for chat.
- temperature 0..2 (default 1, as OpenAI; below 1e-5 it is greedy), top_p (0, 1], top_k >= 0 (-1 = off), min_p
  [0, 1], repetition_penalty (0, 10] (CTRL-style, prompt and output tokens),
  frequency_penalty / presence_penalty [-2, 2] applied as OpenAI defines them (on
  generated tokens' counts, before the other samplers), logit_bias {id: -100..100}.
- logprobs (completions: int 0..20; chat: logprobs + top_logprobs 0..20) are of the
  model's raw distribution (log-softmax of the logits, before temperature and penalties).
  echo + logprobs scores the prompt with one full forward keeping every position's
  logits (what lm-eval's local-completions needs, with max_tokens 0 or 1); the first
  prompt token has logprob null.
- ignore_eos (as vLLM and llama-server): the end-of-sequence token does not stop it.
- Structured output (grammar.py, through llguidance): response_format {"type":
  "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}} (OpenAI),
  "json_schema" and "grammar" (GBNF; llama-server), "guided_json", "guided_regex",
  "guided_choice", "guided_grammar" (Lark; vLLM): one per request; the output then matches
  it (JSON written as json.dumps does) and ends ("stop") when complete. A constraint that
  cannot compile is a 400 naming its field.
- usage.prompt_tokens_details.cached_tokens: prompt tokens served from prompt caching
  (--cache-tokens; see server_batch.py).
- n (1..16, at most 64 choices per request): choice i * n + j is sample j of prompt i; with
  a seed, sample j draws from seed + j (sample 0 is the n = 1 answer); the samples of one
  prompt share its prefill (prompt caching). best_of must be 1 or n; suffix and the
  deprecated functions/function_call are 400; unknown fields are ignored.
- Tool calling (tools.py; chat only): tools, tool_choice ("auto" by default, "none",
  "required", {"type": "function", "function": {"name"}}), parallel_tool_calls. Calls are
  read from the model's Hermes-style <tool_call> blocks into message.tool_calls (ids
  "call_..."; finish_reason "tool_calls"); blocks that do not parse stay content. A
  streamed answer's calls come whole, one tool_calls delta each, when its choice ends.
  "required" / a named function constrain the output by grammar and exclude
  response_format & co.
- JSON schemas (response_format, json_schema, guided_json, tools' parameters) are read as
  llama.cpp reads them: an object schema that lists properties and says nothing of
  additionalProperties allows no others.
- Security: loopback by default; --api-key checks `Authorization: Bearer KEY` (constant
  time) on everything but /health; bodies over 1 MiB get 413; NaN/Infinity and lone
  surrogates are invalid JSON; every error is {"error": {"message", "type", "param",
  "code"}}, 4xx for client input.

One thread owns the model and takes requests from a bounded queue (full: 503 with
Retry-After); the HTTP loop never waits on it. Up to --parallel requests decode together
(continuous batching, server_batch.py: one batched forward per step, new requests join
between steps, prompts are fed in chunks of --batch-tokens); the others wait in the
queue. KV memory is bounded by --parallel x --ctx tokens; a finished request's KV stays in
its idle slot for prompt caching while idle slots hold at most --cache-tokens tokens, the
rest (and a disconnected request's) goes back to the OS. --lookup N adds prompt lookup
drafts (lookup.py) as extra rows while a single sequence decodes (up to 7 drafts).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading

DEFAULT_MAX_QUEUE = 64
DEFAULT_PARALLEL = 8


def make_app(lm, model_id: str | None = None, api_key: str | None = None,
             max_queue: int = DEFAULT_MAX_QUEUE, **kw):
    """The ASGI app serving a LoadedModel (see server_app.make_app)."""
    from .server_app import make_app as _make_app

    return _make_app(lm, model_id=model_id, api_key=api_key, max_queue=max_queue, **kw)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _uvicorn_server(app, log_level: str):
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5,
                            h11_max_incomplete_event_size=64 * 1024)
    return uvicorn.Server(config)


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(lm, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          on_ready=None, **app_kw) -> None:
    """Serve until interrupted (Ctrl-C). on_ready(url) is called once listening."""
    sock = _bind(host, port)
    server = _uvicorn_server(make_app(lm, **app_kw), log_level)
    if on_ready is not None:
        on_ready(_url(sock))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


class BackgroundServer:
    """The server in a thread of this process, on an ephemeral loopback port by default:
    for tests, benchmarks and notebooks.

        with BackgroundServer(lm, api_key="k") as s:
            openai.OpenAI(base_url=s.url + "/v1", api_key="k")
    """

    def __init__(self, lm, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", **app_kw):
        self.app = make_app(lm, **app_kw)
        self.server_state = self.app.state.server
        self._sock = _bind(host, port)
        self.url = _url(self._sock)
        self._server = _uvicorn_server(self.app, log_level)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="luthier-http", daemon=True)

    @property
    def worker(self):
        return self.server_state.worker

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread.start()
        self._server_started(timeout)
        return self

    def _server_started(self, timeout: float) -> None:
        import time

        t0 = time.monotonic()
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def stop(self, timeout: float = 30.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------- command line


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    from .cli import _common

    s = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server: luthier serve [MODEL]")
    s.add_argument("model", nargs="?")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (0: any free one)")
    s.add_argument("--api-key", default=os.environ.get("LUTHIER_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' (default: $LUTHIER_API_KEY; none: open)")
    s.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="requests held at once, waiting or running; more get 503")
    s.add_argument("--parallel", "-np", type=int, default=DEFAULT_PARALLEL,
                   help="requests decoded together, each with its own --ctx of KV cache "
                        f"(default {DEFAULT_PARALLEL})")
    s.add_argument("--batch-tokens", type=int, default=None,
                   help="rows per batched forward: decode tokens plus prompt chunks (default 256)")
    s.add_argument("--cache-tokens", type=int, default=None,
                   help="prompt caching: tokens of KV that finished requests leave in idle slots, "
                        "so that a prompt starting the same way (the next turn of a chat) feeds "
                        "only the rest (default: --ctx; 0: off)")
    s.add_argument("--lookup", type=int, default=0, metavar="N",
                   help="prompt lookup decoding: draft up to N tokens of each sequence from its own text, "
                        "checked in the forward while it is the only one decoding (same outputs; faster where "
                        "answers repeat their input; default 0: off)")
    s.add_argument("--model-id", default=None, help="the model's id in the API (default: the file name)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _common(s)
    s.set_defaults(fn=cmd_serve)
    return s


def cmd_serve(a) -> int:
    from .cli import _load, _lookup

    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print("luthier serve needs starlette and uvicorn: pip install starlette uvicorn", file=sys.stderr)
        return 1
    if a.max_queue < 1:
        raise ValueError(f"--max-queue must be >= 1, got {a.max_queue}")
    if a.parallel < 1:
        raise ValueError(f"--parallel must be >= 1, got {a.parallel}")
    if a.batch_tokens is not None and a.batch_tokens < 1:
        raise ValueError(f"--batch-tokens must be >= 1, got {a.batch_tokens}")
    if a.cache_tokens is not None and a.cache_tokens < 0:
        raise ValueError(f"--cache-tokens must be >= 0, got {a.cache_tokens}")
    if a.lookup < 0:
        raise ValueError(f"--lookup must be >= 0, got {a.lookup}")
    if not 0 <= a.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {a.port}")
    if a.host not in ("127.0.0.1", "localhost", "::1") and not a.api_key:
        print(f"luthier: warning: listening on {a.host} without --api-key: anyone who can reach "
              "this address can use the model", file=sys.stderr)
    lm = _load(a, n_seq=a.parallel + 1)  # slot 0 stays for scoring and single calls

    def ready(url: str) -> None:
        print(f"luthier: serving {os.path.basename(lm.path)} (bits {lm.quant.bits}, ctx {lm.extra.get('ctx')}, "
              f"{a.parallel} parallel, {lm.n_threads} threads) at {url}/v1", file=sys.stderr, flush=True)
        print(f"luthier: also Ollama's API under {url}/api and a chat page at {url}/", file=sys.stderr, flush=True)

    try:
        serve(lm, a.host, a.port, log_level=a.log_level, on_ready=ready, model_id=a.model_id,
              api_key=a.api_key, max_queue=a.max_queue, batch_tokens=a.batch_tokens,
              cache_tokens=a.cache_tokens, lookup=_lookup(a))
    except KeyboardInterrupt:  # uvicorn shuts down gracefully, then re-raises the signal
        pass
    print("luthier: server stopped", file=sys.stderr)
    return 0
