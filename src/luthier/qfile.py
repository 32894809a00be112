"""Quantized model files (`luthier quantize`); the GGUF writing underneath, and float GGUF
export (`luthier convert`), are in gguf_write.py.

A luthier file is a GGUF container that loads without repacking or requantizing: the
packed arrays lie in the file as `kernels.PackedWeight` holds them, and loading hands
read-only views of the memory map straight to the kernels and the native decoder.

    KV pairs  luthier.format_version (u32, the FIRST key: detection reads one key),
              luthier.{bits, head_bits} (str: "2", "ternary", ...), luthier.{group_size,
              head_group_size, method, mode (informative: the loader's mode runs),
              symmetric, source ("gguf" | "hf"), embd_rows}, luthier.linears (JSON: name -> kind, n,
              k, and for "lut" bits, group_size, ternary, zero_const), general.alignment 64;
              then the source GGUF's KV pairs, or an HF folder's JSON files as luthier.hf.*.
    tensors   "lut":   NAME.lut_w I8 [weight_bytes], NAME.lut_s F16 [scale_count], NAME.lut_z
                       F16 [scale_count] (absent if symmetric): PackedWeight's w, s, z bytes
              "int8":  NAME.q8p I8 [P, 8 kp], NAME.q8p_s F16 [P, 8 kp / 32]: the int8
                       panels of int8.py / csrc/int8_gemm.h (P = ceil(n / 8), kp = k rounded
                       up to 32). Files written before panels hold rows, NAME.q8 I8 [n, kp]
                       and NAME.q8_s F16 [n, kp / 32]: read, and rearranged on load.
              "float": NAME.f32 F32 [n, k] (--bits 16)
              embeddings at 8 bits (luthier.embd_bits "8"): token_embd.weight.q8p /
                       .q8p_s as "int8"; a tied int8 head IS that pair (stored once)
              norms, biases, float embeddings: their GGUF names, F32, or F16 where that is
              exact, so the loaded model computes bit for bit what the in-memory one does.

Writes are atomic (`atomic_output`): a temp file beside OUT, fsync, rename.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import numpy as np

from .gguf_write import (
    Progress,
    WriteError,
    _kv,
    _Tensor,
    _write_gguf,
    atomic_output,
    check_output,
    convert_to_file,
)
from .quant.qtensor import SUPPORTED_BITS

__all__ = ["ALIGNMENT", "FORMAT_KEY", "FORMAT_VERSION", "METHODS", "WriteError", "atomic_output",
           "check_output", "convert_to_file", "is_luthier_file", "load_quantized", "quantize_to_file",
           "write_quantized"]

FORMAT_KEY = "luthier.format_version"
FORMAT_VERSION = 1
EMBD_ROWS_KEY = "luthier.embd_rows"  # rows of an int8 embedding that is not a tied head's
ALIGNMENT = 64  # every packed array starts on a cache line
HF_FILES = {  # luthier.hf.<key> -> file of a Hugging Face folder kept in the quantized file
    "config": "config.json", "tokenizer": "tokenizer.json",
    "tokenizer_config": "tokenizer_config.json", "generation_config": "generation_config.json",
    "chat_template": "chat_template.jinja",
}
# source keys not copied: the writer sets them, or they describe the source's tensor types
_SKIP_KEYS = ("general.architecture", "general.alignment", "general.file_type",
              "general.quantization_version")


def _float_tensor(name: str, a: np.ndarray) -> _Tensor:
    """A float tensor as F16 when that loses nothing (2-D only), else F32."""
    a = np.asarray(a, np.float32)
    if a.ndim == 2:
        with np.errstate(over="ignore"):
            h = a.astype(np.float16)
        if np.array_equal(h.astype(np.float32), a):
            return _Tensor(name, a.shape, np.float16, lambda: h)
    return _Tensor(name, a.shape, np.float32, lambda: a)


def _q8_tensors(name: str, q: np.ndarray, scale: np.ndarray) -> list[_Tensor]:
    """NAME.q8p I8 [P, 8 kp] and NAME.q8p_s F16 [P, 8 kp / 32]: int8 panels, fp16 scale bits."""
    return [_Tensor(name + ".q8p", q.shape, np.int8, lambda: q),
            _Tensor(name + ".q8p_s", scale.shape, np.float16, lambda: scale.view(np.float16))]


def _linear_tensors(name: str, lin: Any) -> tuple[dict, list[_Tensor]]:
    """(the luthier.linears entry, the tensors) of one built linear layer."""
    from .engine import FloatLinear, Int8Linear
    from .kernels import QLinear

    if isinstance(lin, QLinear):
        p = lin.packed
        spec = dict(kind="lut", n=p.n, k=p.k, bits=p.bits, group_size=p.group_size,
                    ternary=bool(p.ternary), zero_const=float(p.zero_const))
        ts = [_Tensor(name + ".lut_w", p.w.shape, np.int8, lambda: p.w.view(np.int8)),
              _Tensor(name + ".lut_s", p.s.shape, np.float16, lambda: p.s.view(np.float16))]
        if p.z is not None:
            ts.append(_Tensor(name + ".lut_z", p.z.shape, np.float16, lambda: p.z.view(np.float16)))
        return spec, ts
    if isinstance(lin, Int8Linear):
        return dict(kind="int8", n=lin.n, k=lin.k), _q8_tensors(name, lin.q, lin.scale)
    if isinstance(lin, FloatLinear):
        wt = lin.wt  # [k, n]
        spec = dict(kind="float", n=int(wt.shape[1]), k=int(wt.shape[0]))
        return spec, [_Tensor(name + ".f32", (wt.shape[1], wt.shape[0]), np.float32, lambda: wt.T)]
    raise TypeError(f"{name}: cannot store a {type(lin).__name__} layer")


def _source_kvs(path: str, meta: dict) -> list:
    """The KV pairs that rebuild ModelArgs and the tokenizer: a GGUF source's own, or a
    Hugging Face folder's JSON files as luthier.hf.* strings."""
    from gguf import GGUFValueType as VT

    if os.path.isdir(path):
        kvs = [("luthier.source", "hf", VT.STRING, None)]
        for key, fname in HF_FILES.items():
            p = os.path.join(path, fname)
            if os.path.isfile(p):
                with open(p, encoding="utf-8") as f:
                    kvs.append((f"luthier.hf.{key}", f.read(), VT.STRING, None))
        return kvs
    from .loaders.gguf import GGUFFile

    with GGUFFile(path) as f:
        types = f.metadata_types
    kvs = [("luthier.source", "gguf", VT.STRING, None)]
    for key, value in meta.items():
        if key not in _SKIP_KEYS and not key.startswith("luthier."):
            kv = _kv(key, value, types[key])
            if kv is not None:
                kvs.append(kv)
    return kvs


def write_quantized(out: str, src_path: str, args: Any, meta: dict, floats: dict[str, np.ndarray],
                    linears: dict[str, Any], info: dict[str, Any], force: bool = False,
                    progress: Progress | None = None) -> None:
    """Write a luthier file: `floats` (GGUF name -> array, everything that is not a linear
    layer), `linears` (name the model's linear factory was called with -> QLinear /
    Int8Linear / FloatLinear), `info` (bits, group_size, head_bits, head_group_size,
    embd_bits (8: token_embd as int8 panels), method, mode, symmetric). Refuses an existing
    `out` unless force."""
    from gguf import GGUFValueType as VT

    from .int8 import Int8Linear, q8_panels, quantize_q8

    tensors: list[_Tensor] = []
    specs = {}
    for name, lin in linears.items():
        specs[name], ts = _linear_tensors(name, lin)
        tensors += ts
    typed = dict(bits=(str, VT.STRING), group_size=(int, VT.UINT32), head_bits=(str, VT.STRING),
                 head_group_size=(int, VT.UINT32), embd_bits=(str, VT.STRING), method=(str, VT.STRING),
                 mode=(str, VT.STRING), symmetric=(bool, VT.BOOL))
    emb = floats.get("token_embd.weight")
    extra_kvs: list[tuple] = []
    if info["embd_bits"] == 8 and emb is not None:  # int8 panels, unless a tied int8 head holds them
        floats = {n: a for n, a in floats.items() if n != "token_embd.weight"}
        if not isinstance(linears.get("token_embd.weight"), Int8Linear):
            tensors += _q8_tensors("token_embd.weight", *q8_panels(*quantize_q8(emb)))
            extra_kvs.append((EMBD_ROWS_KEY, int(emb.shape[0]), VT.UINT32, None))  # panels pad rows to 8
    tensors = [_float_tensor(n, a) for n, a in floats.items()] + tensors
    kvs = [(FORMAT_KEY, FORMAT_VERSION, VT.UINT32, None)]
    kvs += [(f"luthier.{k}", conv(info[k]), vt, None) for k, (conv, vt) in typed.items()]
    kvs.append(("luthier.linears", json.dumps(specs), VT.STRING, None))
    kvs += extra_kvs
    kvs += _source_kvs(src_path, meta)
    with atomic_output(out, force) as tmp:
        _write_gguf(tmp, args.arch, kvs, tensors, ALIGNMENT, progress, first_key=FORMAT_KEY)


# ----------------------------------------------------------------------------- quantizing


METHODS = ("rtn", "gptq", "awq", "awq+gptq", "mixed", "awq+mixed")
MIXED_METHODS = ("mixed", "awq+mixed")


def _rtn_linears(args: Any, weights: dict, quant: Any, progress: Progress | None) -> dict[str, Any]:
    """Every linear quantized as engine._build would, by name."""
    from . import engine
    from .models import Transformer

    linears: dict[str, Any] = {}
    n_lin = 7 * args.n_layers + 1  # q, k, v, o, gate, up, down per block, and the head

    def factory(name: str, w: np.ndarray):
        head = name in ("output.weight", "token_embd.weight")
        lin = engine.make_linear(w, quant.head_bits if head else quant.bits,
                                 quant.head_group_size if head else quant.group_size, quant, 1)
        linears[name] = lin
        if progress:
            progress(len(linears), n_lin, f"quantizing {name}")
        return lin

    Transformer(args, weights, factory)
    return linears


def _calibrated_linears(path: str, method: str, quant: Any, calib: dict,
                        progress: Progress | None) -> tuple[Any, dict, dict, dict]:
    """A calibrated method's model, built by the same quant/ function `ppl --method` calls:
    (ModelArgs, the float weights its linears expect, e.g. with AWQ's scales folded into the
    norms, metadata, linears by name: the block QTensors packed, the head by make_linear)."""
    from . import engine
    from .kernels import QLinear
    from .quant.awq import quantize_model_awq
    from .quant.calibration import quantize_model_gptq
    from .quant.mixed import parse_candidates, quantize_model_mixed

    opts = dict(n_samples=calib["samples"], seq_len=calib["len"], head_bits=quant.head_bits,
                head_group_size=quant.head_group_size, symmetric=quant.symmetric, mode=quant.mode, native=False,
                act_order=calib.get("act_order", True), percdamp=calib["percdamp"], seed=calib.get("seed", 0),
                progress=progress)
    if method in MIXED_METHODS:
        lm = quantize_model_mixed(path, calib["budget"], quant.group_size, calib["file"],
                                  candidate_bits=parse_candidates(calib.get("candidates") or "auto", calib["budget"],
                                                                 quant.symmetric),
                                  awq=method == "awq+mixed", **opts)
    elif method == "gptq":
        lm = quantize_model_gptq(path, quant.bits, quant.group_size, calib["file"], **opts)
    else:
        lm = quantize_model_awq(path, quant.bits, quant.group_size, calib["file"], use_gptq=method == "awq+gptq",
                                **opts)
    weights = lm.extra["weights"]
    linears = {name: QLinear(qt, mode=quant.mode) for name, qt in lm.extra["qtensors"].items()}
    head = "output.weight" if "output.weight" in weights else "token_embd.weight"  # tied or not
    linears[head] = engine.make_linear(weights[head], quant.head_bits, quant.head_group_size, quant, 1)
    return lm.args, weights, lm.metadata, linears


def _weight_count(lin: Any) -> int:
    """Weights of a built linear: QLinear (packed), FloatLinear (wt) or Int8Linear."""
    if hasattr(lin, "packed"):
        return lin.packed.n * lin.packed.k
    if hasattr(lin, "wt"):
        return int(lin.wt.size)
    return lin.n * lin.k


def quantize_to_file(model: str | None, out: str, quant: Any, method: str = "rtn",
                     calib: dict | None = None, force: bool = False,
                     progress: Progress | None = None) -> dict[str, Any]:
    """Quantize MODEL (GGUF or HF folder) with `quant` (engine.QuantConfig) by `method`
    (METHODS; calib: file, samples, len, act_order, percdamp) and write a luthier
    file. Returns statistics (seconds, bytes, bits per weight of the block linears)."""
    from . import engine
    from .quant.calibration import check_calib_bits

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method in MIXED_METHODS and not ((calib or {}).get("budget") and calib.get("file")):
        raise ValueError(f"--method {method} needs --bpw-budget (average bits per weight, e.g. 4.2) and --calib FILE")
    if method not in ("rtn",) + MIXED_METHODS:
        if not (calib or {}).get("file"):
            raise ValueError(f"--method {method} needs --calib FILE (calibration text)")
        check_calib_bits(quant.bits, f"--method {method}")
    out = check_output(out, force)  # before the slow part
    path = engine.resolve_model_path(model)
    t0 = time.perf_counter()
    if method == "rtn":
        source = quant.bits == engine.SOURCE  # imported codes (GGUF types, GPTQ/AWQ) as they are
        args, weights, _, meta = engine.read_float_model(path, progress, keep_codes=source, gguf_codes=source,
                                                         lazy=True)  # one float tensor at a time
        try:
            linears = _rtn_linears(args, weights, quant, progress)
            floats = {n: weights[n] for n in weights if n not in linears or n == "token_embd.weight"}
        finally:
            if isinstance(weights, engine.LazyGGUFWeights):
                weights.close()
        permuted = [n for n, lin in linears.items() if getattr(lin, "perm", None) is not None]
        if permuted:  # act-order GPTQ imports: the file format has no column permutation
            raise ValueError(f"{path}: {len(permuted)} act-order (desc_act) GPTQ linears, e.g. {permuted[0]}, "
                             "cannot be written to a luthier file as they are; run the checkpoint directly, or "
                             "quantize it with --bits 1-6 (requantizes its dequantized weights)")
    else:  # the calibrated methods read the model themselves
        args, weights, meta, linears = _calibrated_linears(path, method, quant, calib or {}, progress)
        floats = {n: w for n, w in weights.items() if n not in linears or n == "token_embd.weight"}
    t_quant = time.perf_counter() - t0
    # source codes came through no quantizer, and keep their own groups (each linear's spec
    # records its group size; luthier.group_size stays the config's, which nothing reads then)
    info = dict(bits=quant.bits, group_size=quant.group_size, head_bits=quant.head_bits,
                head_group_size=quant.head_group_size, embd_bits=quant.embedding_bits,
                method="source" if quant.bits == engine.SOURCE else method,
                mode=quant.mode, symmetric=quant.symmetric)
    write_quantized(out, path, args, meta, floats, linears, info, force, progress)
    block = [(l, _weight_count(l)) for n, l in linears.items() if n.startswith("blk.")]
    qbytes = sum(l.packed.nbytes if hasattr(l, "packed") else l.nbytes for l, _ in block)
    return dict(path=out, seconds=time.perf_counter() - t0, quantize_seconds=t_quant,
                file_bytes=os.path.getsize(out), block_bytes=qbytes,
                bits_per_weight=8 * qbytes / max(1, sum(n for _, n in block)))


# ----------------------------------------------------------------------------- loading


def is_luthier_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a luthier quantized file: its first metadata key is FORMAT_KEY.
    Reads a few dozen bytes; anything unreadable is 'no' (the GGUF loader then explains)."""
    try:
        with open(path, "rb") as f:  # magic, version, n_tensors, n_kv, first key length + bytes
            head = f.read(24 + 8 + len(FORMAT_KEY))
    except OSError:
        return False
    key = len(FORMAT_KEY).to_bytes(8, "little") + FORMAT_KEY.encode()
    return head[:4] == b"GGUF" and head[24:] == key


def _q8_arrays(f: Any, name: str, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The int8 panels of NAME [n, k]: views of NAME.q8p / .q8p_s, or, in a file written
    before panels, NAME.q8 / .q8_s rows rearranged (a copy)."""
    from .int8 import q8_panel_count, q8_panels, q8_width

    kp = q8_width(k)
    if name + ".q8p" in f.tensors or name + ".q8" not in f.tensors:
        p = q8_panel_count(n)
        return (_view(f, name + ".q8p", "I8", (p, 8 * kp)).view(np.int8),
                _view(f, name + ".q8p_s", "F16", (p, kp // 4)))
    return q8_panels(_view(f, name + ".q8", "I8", (n, kp)).view(np.int8),
                     _view(f, name + ".q8_s", "F16", (n, kp // 32)))


def _view(f: Any, name: str, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A checked, read-only view of a stored tensor (no copy); F16 as its uint16 bits."""
    info = f.tensors.get(name)
    if info is None or info.type_name != type_name or info.shape != shape:
        got = f"{info.type_name}{list(info.shape)}" if info else "missing"
        raise ValueError(f"{f.path}: corrupt luthier file: {name} is {got}, expected {type_name}{list(shape)}")
    dt = {"I8": np.uint8, "F16": np.uint16, "F32": np.float32}[type_name]
    return f.raw(name).view(dt).reshape(shape)  # bytes -> the stored [shape]


def _build_linear(f: Any, name: str, spec: dict, mode: str, n_threads: int):
    from . import _core
    from .engine import FloatLinear
    from .int8 import Int8Linear
    from .kernels import PackedWeight, QLinear

    try:
        kind, n, k = spec["kind"], int(spec["n"]), int(spec["k"])
        if n <= 0 or k <= 0:
            raise ValueError
        if kind == "lut":
            bits, gs = int(spec["bits"]), int(spec["group_size"])
            if bits not in SUPPORTED_BITS or gs <= 0:
                raise ValueError
            zero_const, ternary = float(spec["zero_const"]), bool(spec["ternary"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{f.path}: corrupt luthier file: bad layer entry {name}: {spec}") from None
    if kind == "lut":
        wb, sc, *_ = _core.packed_shape(n, k, bits, gs)
        w, s = _view(f, name + ".lut_w", "I8", (wb,)), _view(f, name + ".lut_s", "F16", (sc,))
        z = _view(f, name + ".lut_z", "F16", (sc,)) if name + ".lut_z" in f.tensors else None
        lin = QLinear(PackedWeight(n, k, bits, gs, ternary, w, s, z, zero_const), mode=mode, n_threads=n_threads)
        lin.nbytes = lin.packed.nbytes  # type: ignore[attr-defined]
        return lin
    if kind == "int8":
        return Int8Linear.from_panels(*_q8_arrays(f, name, n, k), n, k, n_threads)
    if kind == "float":
        return FloatLinear(_view(f, name + ".f32", "F32", (n, k)))
    raise ValueError(f"{f.path}: corrupt luthier file: {name} has unknown kind {kind!r}")


def _args_and_tokenizer(meta: dict) -> tuple[Any, Any]:
    from .models import ModelArgs
    from .tokenizer import Tokenizer

    if meta.get("luthier.source") != "hf":
        return ModelArgs.from_gguf_metadata(meta), Tokenizer.from_gguf_metadata(meta)
    if "luthier.hf.config" not in meta or "luthier.hf.tokenizer" not in meta:
        raise ValueError("corrupt luthier file: the Hugging Face config or tokenizer is missing")
    args = ModelArgs.from_hf_config(json.loads(meta["luthier.hf.config"]))
    # Tokenizer.from_file reads the folder's files (and their siblings): give it one back
    with tempfile.TemporaryDirectory(prefix="luthier-tok-") as d:
        for key, fname in HF_FILES.items():
            if f"luthier.hf.{key}" in meta:
                with open(os.path.join(d, fname), "w", encoding="utf-8") as f:
                    f.write(meta[f"luthier.hf.{key}"])
        tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    return args, tok


def load_quantized(path: str, quant: Any = None, n_threads: int | None = None, ctx: int | None = None,
                   native: bool = True, n_seq: int = 1, kv: str = "f16") -> Any:
    """An engine.LoadedModel from a luthier file, memory-mapped. Of `quant` only `mode`
    (a runtime choice) is used; bits, group sizes and the rest are the file's."""
    from . import engine
    from .loaders.gguf import GGUFFile
    from .models import Transformer

    t0 = time.perf_counter()
    n_threads = n_threads or min(os.cpu_count() or 1, 8)
    f = GGUFFile(path)  # checks every tensor lies inside the file: a truncated file stops here
    meta = f.metadata
    version = meta.get(FORMAT_KEY)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: luthier file format version {version}, this luthier reads {FORMAT_VERSION}")
    try:
        specs = json.loads(meta["luthier.linears"])
        bits, head_bits = engine.parse_bits(meta["luthier.bits"]), engine.parse_bits(meta["luthier.head_bits"])
        # files written before 8-bit embeddings have no embd_bits: their table is float
        embd_bits = engine.parse_bits(meta.get("luthier.embd_bits", "16"))
        if embd_bits not in engine.FLOAT_BITS:
            raise ValueError(f"luthier.embd_bits {embd_bits}")
        cfg = engine.QuantConfig(bits=bits, group_size=int(meta["luthier.group_size"]), head_bits=head_bits,
                                 head_group_size=int(meta["luthier.head_group_size"]), embd_bits=embd_bits,
                                 mode=quant.mode if quant is not None else engine.QuantConfig().mode,
                                 symmetric=bool(meta["luthier.symmetric"]))
        if not isinstance(specs, dict):
            raise ValueError("luthier.linears is not an object")
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: corrupt luthier file: {e}") from None
    args, tok = _args_and_tokenizer(meta)
    linears = {name: _build_linear(f, name, spec, cfg.mode, n_threads) for name, spec in specs.items()}
    rows = None
    if cfg.embd_bits == 8:  # the int8 table: a tied int8 head's pair, or its own
        e = "token_embd.weight"
        try:  # rows: a tied int8 head's, luthier.embd_rows, or (before panels) the rows stored
            vocab = int(specs[e]["n"] if e in specs else meta.get(EMBD_ROWS_KEY) or f.tensors[e + ".q8"].shape[0])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: corrupt luthier file: the int8 embedding {e}.q8p or its row count "
                             f"{EMBD_ROWS_KEY} is missing") from None
        rows = engine.Int8Rows(*_q8_arrays(f, e, vocab, args.dim), vocab, args.dim)
    parts = {name + suffix for name in [*specs, "token_embd.weight"]
             for suffix in (".lut_w", ".lut_s", ".lut_z", ".q8p", ".q8p_s", ".q8", ".q8_s", ".f32")}
    weights: dict[str, np.ndarray] = {}
    for name, info in f.tensors.items():  # the float tensors: F16 or F32 (_view checks)
        if name not in parts:
            a = _view(f, name, "F16" if info.type_name == "F16" else "F32", info.shape)
            weights[name] = a.view(np.float16) if info.type_name == "F16" else a
    for name, spec in specs.items():  # Transformer checks linear shapes: a zero-byte stand-in
        weights.setdefault(name, np.broadcast_to(np.float32(0), (int(spec["n"]), int(spec["k"]))))
    if rows is not None:
        weights.setdefault("token_embd.weight", np.broadcast_to(np.float32(0), rows.shape))

    def factory(name: str, w: np.ndarray):
        if name not in linears:
            raise ValueError(f"{path}: corrupt luthier file: no stored layer {name}")
        return linears[name]

    model = Transformer(args, weights, factory)
    if rows is not None:
        model.tok_embd = rows
    n_ctx = int(ctx or min(args.max_seq_len or engine.DEFAULT_CTX, engine.DEFAULT_CTX))
    if n_ctx <= 0:
        raise ValueError(f"ctx must be positive, got {n_ctx}")
    runner = model
    if native:
        from .native import NativeModel

        runner = NativeModel(model, n_ctx, n_threads, cfg.mode, n_seq=n_seq, kv=kv)
    lm = engine.LoadedModel(path, args, runner, tok, meta, cfg, n_threads)
    lm.load_seconds = time.perf_counter() - t0
    lm.linear_bytes = int(sum(getattr(l, "nbytes", 0) for l in linears.values()))
    lm.extra.update(linears=list(linears.values()), ctx=n_ctx, reference=model, qfile=f,
                    method=meta.get("luthier.method"))
    return lm
