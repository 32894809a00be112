"""Prompt lookup decoding (lookup.py): decode tok/s with and without drafts from the text,
on tasks whose answers repeat their input (copying, editing code, extracting sentences)
and on one that does not (a story), greedy, through the Python API of each engine:

    luthier      luthier.Llama(bits=4, group_size=128) vs the same with
                 draft_model=PromptLookupDecoding(num_pred_tokens=N)
    llama.cpp    llama_cpp.Llama(--llama-gguf, e.g. a Q4_0 of the same source) vs the same with
                 draft_model=LlamaPromptLookupDecoding(num_pred_tokens=N)   (optional)

decode tok/s = (tokens - 1) / (time of the last streamed token - time of the first), the
median of --reps runs, the two settings alternating. Greedy output must not change with
lookup: the tokens are compared and a difference is an error.

    python benchmarks/bench_lookup.py [--llama-gguf Q4_0.gguf] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

TEXT = ("The lighthouse keeper climbed the stairs every evening at dusk. He lit the lamp, wound the "
        "clock, and wrote one line in the logbook: the wind, the sea, the ships that passed. In winter "
        "the storms came from the north and the waves broke over the rocks below the tower. In summer "
        "the sea was calm, and children from the village rowed out to wave at him.")
CODE = '''def mean_and_total(values):
    total = 0
    count = 0
    for v in values:
        total += v
        count += 1
    if count == 0:
        return 0.0, total
    return total / count, total
'''
TASKS = {
    "copy": "Repeat this text exactly, word for word:\n\n" + TEXT,
    "edit code": "Rename the variable `total` to `acc` in this Python function and return the whole "
                 "function:\n\n" + CODE,
    "extract": "From the text below, copy every sentence that mentions the sea.\n\n" + TEXT,
    "story": "Write a short story about a lighthouse keeper.",
}


def timed(stream) -> tuple[float, list[str]]:
    """Decode tok/s of a streamed chat completion, and its text pieces."""
    times, pieces = [], []
    for c in stream:
        piece = c["choices"][0]["delta"].get("content")
        if piece:
            times.append(time.perf_counter())
            pieces.append(piece)
    tps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    return tps, pieces


def run_engine(name: str, plain, drafted, max_tokens: int, reps: int) -> list[dict]:
    rows = []
    for task, prompt in TASKS.items():
        msgs = [{"role": "user", "content": prompt}]
        res: dict[str, list[float]] = {"plain": [], "lookup": []}
        texts = {}
        for _ in range(reps):
            for label, llm in (("plain", plain), ("lookup", drafted)):
                if hasattr(llm, "reset"):
                    llm.reset()
                tps, pieces = timed(llm.create_chat_completion(msgs, temperature=0.0, max_tokens=max_tokens,
                                                               stream=True))
                res[label].append(tps)
                texts.setdefault(label, "".join(pieces))
        same = texts["plain"] == texts["lookup"]
        stats = getattr(drafted, "stats", None)
        acc = f"{stats.accepted_tokens}/{stats.draft_tokens}" if stats is not None and stats.draft_tokens else "-"
        row = {"engine": name, "task": task, "plain_tps": float(np.median(res["plain"])),
               "lookup_tps": float(np.median(res["lookup"])), "same_text": same, "accepted": acc,
               "chars": len(texts["plain"])}
        row["speedup"] = row["lookup_tps"] / row["plain_tps"]
        rows.append(row)
        print(f"{name:10s} {task:10s} {row['plain_tps']:8.1f} {row['lookup_tps']:8.1f} {row['speedup']:6.2f}x "
              f"{acc:>9s} {'same' if same else 'DIFFERENT'}", flush=True)
        if not same and name == "luthier":
            raise SystemExit(f"{task}: greedy output changed with lookup decoding")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="source model for luthier (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--llama-gguf", default=None, help="a GGUF for llama-cpp-python (skipped if not given)")
    ap.add_argument("--threads", "-t", type=int, default=2)
    ap.add_argument("--draft", type=int, default=10, help="num_pred_tokens")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    from bench_kernels import cpu_name, git_commit

    import luthier

    print(f"# {cpu_name()}, commit {git_commit()}; command: python {' '.join(sys.argv)}")
    print(f"{'engine':10s} {'task':10s} {'plain':>8s} {'lookup':>8s} {'gain':>7s} {'accepted':>9s} output")
    kw = dict(bits=4, group_size=128, n_threads=a.threads, n_ctx=1024)
    plain = luthier.Llama(a.model, **kw)
    drafted = luthier.Llama(a.model, draft_model=luthier.PromptLookupDecoding(num_pred_tokens=a.draft), **kw)
    rows = run_engine("luthier", plain, drafted, a.max_tokens, a.reps)
    if a.llama_gguf:
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        lk = dict(model_path=a.llama_gguf, n_threads=a.threads, n_ctx=1024, verbose=False)
        rows += run_engine("llama.cpp", llama_cpp.Llama(**lk),
                           llama_cpp.Llama(draft_model=LlamaPromptLookupDecoding(num_pred_tokens=a.draft), **lk),
                           a.max_tokens, a.reps)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"commit": git_commit(), "cpu": cpu_name(), "argv": sys.argv, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
