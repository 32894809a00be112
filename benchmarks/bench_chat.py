"""Multi-turn chat through the OpenAI API: time to first token per turn, with and without
prompt caching, luthier serve next to llama.cpp's llama-server.

A chat client resends the whole conversation every turn, so without prompt caching each
turn prefills everything said so far. One client holds one conversation: a system prompt,
then --turns user messages, each answer (greedy, at most --max-tokens) appended to the
history as the model wrote it. Per turn we record the prompt tokens, the prompt tokens the
server reports as cached (usage.prompt_tokens_details.cached_tokens, where it reports
them) and TTFT (request sent -> first content chunk). Engines, all on the same model:

    luthier            luthier serve (prompt caching on: the default)
    luthier nocache    luthier serve --cache-tokens 0
    llama-server       llama-server (cache_prompt, its default), from --llama-server
    llama nocache      the same server, requests with "cache_prompt": false

    python benchmarks/bench_chat.py --llama-server PATH/llama-server --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import httpx
import numpy as np

from bench_server import add_engine_args, free_port, llama_model, served, source_model

SYSTEM = ("You are a patient tutor. You answer questions about science and history in plain "
          "words, with one short example each time, and you never use more than three sentences. "
          "When a question is unclear, you say what you assume before you answer it.")
QUESTIONS = ["Why is the sky blue?", "And why are sunsets red?", "What is a photon?",
             "Who first measured the speed of light?", "How did they do it?",
             "Why can nothing go faster than light?", "What is a light year?",
             "How far is the nearest star?", "Could we ever travel there?", "Summarize our talk."]


def turn(url: str, messages: list[dict], max_tokens: int, extra: dict) -> dict:
    body = {"model": "default", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, **extra}
    t0 = time.perf_counter()
    ttft, text, usage = None, [], None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            c = json.loads(line[6:])
            if c.get("usage"):
                usage = c["usage"]
            for ch in c.get("choices") or []:
                piece = (ch.get("delta") or {}).get("content")
                if piece:
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    text.append(piece)
    u = usage or {}
    return {"ttft_ms": (ttft if ttft is not None else float("nan")) * 1e3, "text": "".join(text),
            "prompt_tokens": u.get("prompt_tokens"),
            "cached_tokens": (u.get("prompt_tokens_details") or {}).get("cached_tokens")}


def conversation(url: str, turns: int, max_tokens: int, extra: dict) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}]
    rows = []
    for i in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]})
        r = turn(url, messages, max_tokens, extra)
        messages.append({"role": "assistant", "content": r.pop("text")})
        rows.append(r)
    return rows


def run(name: str, cmd: list[str], url: str, a, variants: list[tuple[str, dict]]) -> dict:
    out = {}
    with served(name, cmd, url):
        turn(url, [{"role": "user", "content": "Hello."}], 4, {})  # warm up (shares no prefix but the template's)
        for label, extra in variants:
            out[label] = conversation(url, a.turns, a.max_tokens, extra)
            ttft = [r["ttft_ms"] for r in out[label]]
            print(f"{label:>16}: TTFT per turn (ms) {' '.join(f'{t:.0f}' for t in ttft)}; "
                  f"sum {np.nansum(ttft):.0f}", file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(ap)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--llama-server", default=None, help="llama-server binary (skipped if not given)")
    ap.add_argument("--llama-type", default="Q4_0", help="llama.cpp type made from --model with llama-quantize")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    model = source_model(ap, a)
    results: dict[str, list[dict]] = {}
    for label, flags in (("luthier", []), ("luthier nocache", ["--cache-tokens", "0"])):
        port = free_port()
        cmd = [sys.executable, "-m", "luthier.cli", "serve", model, "--port", str(port), "--bits", a.bits,
               "--group-size", str(a.group_size), "-t", str(a.threads), "--parallel", "1", "--ctx", str(a.ctx),
               "--log-level", "warning", *flags]
        results.update(run(label, cmd, f"http://127.0.0.1:{port}", a, [(label, {})]))
    if a.llama_server:
        with tempfile.TemporaryDirectory() as tmp:
            lmodel = llama_model(model, a.llama_type, os.path.join(os.path.dirname(a.llama_server),
                                                                   "llama-quantize"), tmp)
            port = free_port()
            cmd = [a.llama_server, "-m", lmodel, "--port", str(port), "-t", str(a.threads), "-tb", str(a.threads),
                   "--parallel", "1", "-c", str(a.ctx), "--no-webui"]
            results.update(run("llama-server", cmd, f"http://127.0.0.1:{port}", a,
                               [("llama-server", {}), ("llama nocache", {"cache_prompt": False})]))
    print("\n| engine | " + " | ".join(f"turn {i + 1}" for i in range(a.turns)) + " | sum of TTFT |")
    print("|---|" + "---|" * (a.turns + 1))
    for label, rows in results.items():
        cells = [f"{r['ttft_ms']:.0f} ms ({r['prompt_tokens']}"
                 + (f", {r['cached_tokens']} cached" if r["cached_tokens"] else "") + ")" for r in rows]
        print(f"| {label} | " + " | ".join(cells) + f" | {np.nansum([r['ttft_ms'] for r in rows]):.0f} ms |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": model, "bits": a.bits, "group_size": a.group_size, "threads": a.threads,
                       "turns": a.turns, "max_tokens": a.max_tokens, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
