"""Calibration and sequential GPTQ of a whole model.

The model runs block by block over N calibration sequences of L tokens. Inside a block the
linear layers are quantized in the order the forward pass reaches them ("true sequential",
as in the GPTQ paper's reference implementation): q/k/v (one shared input), then o, then
gate/up (one shared input), then down. Each group is calibrated on inputs computed by the
already-quantized layers before it, in this block and in every block before it.

How, without a second copy of the forward pass: the model is the ordinary numpy
`models.Transformer`, built with a linear factory that returns `_CalibLinear`s. One pass
over the samples runs `Transformer._block` until it reaches a linear that is not quantized
yet: that linear (and those called with the very same input array, e.g. k and v after q)
add the input to a shared Hessian; the next unquantized linear stops the pass (`_Stop`).
GPTQ then quantizes the group, and the next pass goes one group further. Quantized linears
cache their output per sample, so every product is computed once; only attention is
recomputed per pass. A last pass with every linear quantized gives the next block's input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any, Callable

import numpy as np

from .gptq import DEFAULT_BLOCK_SIZE, DEFAULT_PERCDAMP, HessianAccumulator, gptq_quantize
from .qtensor import SUPPORTED_BITS, QTensor

DEFAULT_N_SAMPLES = 32
DEFAULT_SEQ_LEN = 512

Progress = Callable[[int, int, str], None]


class _Stop(Exception):
    """Ends a calibration pass through a block at the first linear it cannot run yet."""


def calibration_tokens(tokenizer: Any, text: str, n_samples: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """int64 [n_samples, seq_len]: random windows of the tokenized text (fixed seed), as
    the GPTQ reference samples its calibration set; BOS first when the model adds BOS."""
    if n_samples < 1 or seq_len < 2:
        raise ValueError(f"need n_samples >= 1 and seq_len >= 2, got {n_samples}, {seq_len}")
    ids = np.asarray(tokenizer.encode(text, add_bos=False, special=False, add_eos=False), np.int64)
    if len(ids) < seq_len:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than seq_len={seq_len}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - seq_len + 1, n_samples)  # [N]
    out = np.stack([ids[s : s + seq_len] for s in starts])  # [N, L]
    if getattr(tokenizer, "add_bos", False) and getattr(tokenizer, "bos_id", None) is not None:
        out[:, 0] = tokenizer.bos_id
    return out


class _Runner:
    """State shared by a block's _CalibLinears during one pass."""

    def __init__(self) -> None:
        self.sample = 0
        self.stage_x: np.ndarray | None = None  # input of the group being calibrated
        self.members: list[_CalibLinear] = []  # that group (found on sample 0)
        self.acc: HessianAccumulator | None = None


class _CalibLinear:
    """A linear layer of the model being calibrated: float until quantized, then the
    dequantized GPTQ weights (its output cached per sample while its block is calibrated)."""

    def __init__(self, name: str, w: np.ndarray, runner: _Runner):
        self.name = name
        self.w = np.asarray(w, dtype=np.float32)  # [n, k]
        self.runner = runner
        self.qtensor: QTensor | None = None
        self.wq_t: np.ndarray | None = None  # [k, n] dequantized, transposed
        self.outputs: dict[int, np.ndarray] = {}

    def set_quantized(self, qt: QTensor) -> None:
        self.qtensor = qt
        self.wq_t = np.ascontiguousarray(qt.dequantize().T)  # [n, k] -> [k, n]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        r = self.runner
        if self.wq_t is not None:
            out = self.outputs.get(r.sample)
            if out is None:
                out = self.outputs[r.sample] = x @ self.wq_t  # [m, k] @ [k, n] -> [m, n]
            return out
        if r.stage_x is None:  # the first unquantized linear of this pass opens the group
            r.stage_x = x
            if r.sample == 0:
                r.acc = HessianAccumulator(x.shape[-1])
                r.members = [self]
            r.acc.add(x)
        elif x is not r.stage_x:
            raise _Stop  # a later group: its inputs need this group quantized first
        elif r.sample == 0:
            r.members.append(self)  # same input: calibrated with the group (k, v after q)
        if r.sample > 0:
            if self is r.members[-1]:
                raise _Stop  # the group is complete; nothing after it is needed
            return np.zeros((x.shape[0], self.w.shape[0]), np.float32)  # never read
        return x @ self.w.T  # sample 0 runs on, to find where the group ends


class _Unused:
    """Stands for the output head during calibration (never called)."""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        raise RuntimeError("the output head is not calibrated")


@contextlib.contextmanager
def _blas_threads(n: int):
    """GPTQ's column loop is many small BLAS calls, which threads only slow down."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(n, user_api="blas"):
        yield


QuantizeGroup = Callable[[list["_CalibLinear"], HessianAccumulator], list[QTensor]]
# block_hook(i, layer, run, n_samples): called before block i's groups are calibrated;
# run(layer_like, s) runs block i on sample s's input with `layer_like` (e.g. a copy of the
# layer with float linears) and returns its output [L, dim]
BlockHook = Callable[[int, Any, Callable[[Any, int], np.ndarray], int], None]


def sequential_quantize(
    model: Any,
    tokens: np.ndarray,
    quantize_group: QuantizeGroup,
    progress: Progress | None = None,
    observer: Callable[[list[str], np.ndarray], None] | None = None,
    block_hook: BlockHook | None = None,
    label: str = "gptq",
) -> tuple[dict[str, QTensor], dict]:
    """The layer-by-layer driver shared by GPTQ, AWQ and mixed precision: every block
    linear of `model` (a models.Transformer built with `calibration_factory`), group by
    group in forward order, each group calibrated on calibration tokens [N, L] as computed
    by the already-quantized layers before it. quantize_group(group, acc) returns one
    QTensor per member of the group (members share the input whose Hessian acc holds).
    Returns ({tensor name: QTensor}, stats)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"calibration tokens must be [n_samples, seq_len], got shape {tokens.shape}")
    n_samples, seq_len = tokens.shape
    args = model.args
    layers = model.layers
    lins_of = [[v for v in vars(layer).values() if isinstance(v, _CalibLinear)] for layer in layers]
    total = sum(len(x) for x in lins_of)
    if total == 0:
        raise TypeError("the model was not built with calibration_factory")
    runner = lins_of[0][0].runner

    x = np.asarray(model.tok_embd[tokens], dtype=np.float32)  # [N, L] -> [N, L, dim]
    if args.embed_scale != 1.0:
        x = x * np.float32(args.embed_scale)
    positions = np.arange(seq_len)
    trig = {id(r): r.cos_sin(positions) for r in model._ropes.values()}
    cache = model.new_cache(seq_len)
    t_quant = 0.0
    t_hook = 0.0
    t0 = time.perf_counter()
    done = 0
    for i, layer in enumerate(layers):
        rope = model.layer_rope(i)

        def run_block(s: int) -> np.ndarray:
            runner.sample, runner.stage_x = s, None
            return model._block(i, layer, x[s], rope, trig[id(rope)], cache, 0)

        if block_hook is not None:
            t1 = time.perf_counter()
            block_hook(i, layer, lambda lay, s: model._block(i, lay, x[s], rope, trig[id(rope)], cache, 0),
                       n_samples)
            t_hook += time.perf_counter() - t1
        while any(lin.wq_t is None for lin in lins_of[i]):
            runner.members, runner.acc = [], None
            for s in range(n_samples):
                try:
                    run_block(s)
                except _Stop:
                    pass
            group = runner.members
            if not group:
                raise RuntimeError(f"block {i}: a linear layer is never called")
            if observer:
                observer([lin.name for lin in group], runner.acc.hessian)
            t1 = time.perf_counter()
            with _blas_threads(1):
                qts = quantize_group(group, runner.acc)
            t_quant += time.perf_counter() - t1
            for lin, qt in zip(group, qts, strict=True):
                lin.set_quantized(qt)
            done += len(group)
            if progress:
                progress(done, total, f"{label} blk.{i}: " + ", ".join(l.name.split(".")[2] for l in group))
        x = np.stack([run_block(s) for s in range(n_samples)])  # [N, L, dim]: next block's input
        for lin in lins_of[i]:
            lin.outputs.clear()
    qts_all = {lin.name: lin.qtensor for lins in lins_of for lin in lins}
    stats = {"seconds": time.perf_counter() - t0, "quant_seconds": t_quant, "hook_seconds": t_hook,
             "layers": total, "calib_tokens": int(n_samples * seq_len)}
    return qts_all, stats


def split_rows(qt: QTensor, rows: list[int]) -> list[QTensor]:
    """A QTensor of stacked layers [sum n, k] back into one QTensor per layer."""
    out, r0 = [], 0
    for n in rows:
        z = qt.zeros[r0 : r0 + n] if qt.zeros is not None else None
        out.append(QTensor(qt.codes[r0 : r0 + n], qt.scales[r0 : r0 + n], z, qt.bits, qt.group_size, qt.ternary))
        r0 += n
    return out


def gptq_group_quantizer(
    bits: int | str,
    group_size: int | Callable[[int], int | None] | None,
    symmetric: bool = False,
    act_order: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
    percdamp: float = DEFAULT_PERCDAMP,
) -> QuantizeGroup:
    """sequential_quantize's quantize_group for GPTQ: the layers of a group share their
    input, so their rows are stacked and quantized with one Hessian factorization."""
    fit = group_size if callable(group_size) else (lambda k: group_size)

    def quantize_group(group: list[_CalibLinear], acc: HessianAccumulator) -> list[QTensor]:
        k = group[0].w.shape[1]
        if fit(k) is None and bits == "ternary":  # one scale per tensor: each layer alone
            return [gptq_quantize(lin.w, acc.hessian, bits, None, symmetric, act_order, block_size, percdamp)
                    for lin in group]
        w = np.concatenate([lin.w for lin in group])  # rows of one input: [sum n, k]
        qt = gptq_quantize(w, acc.hessian, bits, fit(k), symmetric, act_order, block_size, percdamp)
        return split_rows(qt, [lin.w.shape[0] for lin in group])

    return quantize_group


def gptq_model_layers(
    model: Any,
    tokens: np.ndarray,
    bits: int | str,
    group_size: int | Callable[[int], int] | None,
    symmetric: bool = False,
    act_order: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
    percdamp: float = DEFAULT_PERCDAMP,
    progress: Progress | None = None,
    observer: Callable[[list[str], np.ndarray], None] | None = None,
) -> tuple[dict[str, QTensor], dict]:
    """Sequential GPTQ of every block linear of `model`, a models.Transformer built with
    `calibration_factory`, over calibration tokens [N, L]. bits: 1-6 or "ternary".
    group_size: an int or a function of k (None: one ternary scale per tensor).
    observer(names, H), if given, sees each group and its Hessian in the order they
    are quantized. Returns ({tensor name: QTensor}, stats)."""
    quantize_group = gptq_group_quantizer(bits, group_size, symmetric, act_order, block_size, percdamp)
    qts, stats = sequential_quantize(model, tokens, quantize_group, progress, observer)
    stats["gptq_seconds"] = stats["quant_seconds"]
    return qts, stats


def calibration_factory(runner: _Runner | None = None) -> Callable[[str, np.ndarray], Any]:
    """A models.Transformer linear factory for gptq_model_layers: blocks' linears become
    _CalibLinears, the head is left out."""
    runner = runner or _Runner()

    def make(name: str, w: np.ndarray):
        return _CalibLinear(name, w, runner) if name.startswith("blk.") else _Unused()

    return make


def read_float_model(path: str) -> tuple[Any, dict, Any, dict]:
    """(ModelArgs, float weights by GGUF name, Tokenizer, metadata), as load_model reads them."""
    from ..engine import read_float_model as read

    return read(path)


def load_calibration(path: str | None, calib_file: str, n_samples: int, seq_len: int, seed: int = 0):
    """(resolved path, ModelArgs, float weights, Tokenizer, metadata, calibration tokens
    [N, L], seconds the model took to read)."""
    from .. import engine

    path = engine.resolve_model_path(path)
    with open(calib_file, encoding="utf-8") as f:
        text = f.read()
    t0 = time.perf_counter()
    args, weights, tok, meta = read_float_model(path)
    load_s = time.perf_counter() - t0
    tokens = calibration_tokens(tok, text, n_samples, seq_len, seed)
    return path, args, weights, tok, meta, tokens, load_s


def build_quantized_model(
    path: str,
    args: Any,
    weights: dict,
    tok: Any,
    meta: dict,
    qts: dict[str, QTensor],
    cfg: Any,
    n_threads: int | None,
    ctx: int | None,
    native: bool,
):
    """An engine.LoadedModel whose block linears run the given QTensors on the LUT kernels
    (the output head quantized as engine.load_model does, cfg.head_bits); `weights` gives
    everything else (norms, biases, embeddings), e.g. with AWQ's scales folded in;
    lm.extra["weights"] keeps them (a file stores them beside the codes)."""
    from .. import engine
    from ..kernels import QLinear
    from ..models import Transformer

    n_threads = n_threads or min(os.cpu_count() or 1, 8)
    linears: list = []

    def factory(name: str, w: np.ndarray):
        if name in qts:
            lin = QLinear(qts[name], mode=cfg.mode, n_threads=n_threads)
            lin.nbytes = lin.packed.nbytes  # type: ignore[attr-defined]
        else:  # the output head
            lin = engine.make_linear(w, cfg.head_bits, cfg.head_group_size, cfg, n_threads)
        linears.append(lin)
        return lin

    model = Transformer(args, weights, factory)
    engine.set_embedding(model, cfg.embedding_bits)
    n_ctx = int(ctx or min(args.max_seq_len or engine.DEFAULT_CTX, engine.DEFAULT_CTX))
    runner = model
    if native:
        from ..native import NativeModel

        runner = NativeModel(model, n_ctx, n_threads, cfg.mode)
    lm = engine.LoadedModel(path, args, runner, tok, meta, cfg, n_threads)
    lm.linear_bytes = int(sum(getattr(l, "nbytes", 0) for l in linears))
    lm.extra.update(linears=linears, ctx=n_ctx, reference=model, qtensors=qts, weights=weights)
    return lm


def check_calib_bits(bits: Any, method: str) -> None:
    if bits not in SUPPORTED_BITS + ("ternary",):
        raise ValueError(f"{method} quantizes to 1-6 bits or ternary, got {bits}")


@dataclasses.dataclass
class CalibOptions:
    """The options every calibrated method (GPTQ, AWQ, mixed) takes besides bits, group
    size and the calibration file: how much calibration text, GPTQ's knobs, and how the
    returned model is built (head, embeddings, table mode, threads, context)."""

    n_samples: int = DEFAULT_N_SAMPLES  # calibration sequences
    seq_len: int = DEFAULT_SEQ_LEN  # tokens per sequence
    head_bits: Any = 4
    head_group_size: int = 32
    embd_bits: int | None = None
    symmetric: bool = False
    act_order: bool = True
    block_size: int = DEFAULT_BLOCK_SIZE
    percdamp: float = DEFAULT_PERCDAMP
    mode: str = "fast"
    n_threads: int | None = None
    ctx: int | None = None
    native: bool = True
    seed: int = 0
    progress: Progress | None = None

    def load(self, path: str | None, calib_file: str):
        """load_calibration with these sample counts."""
        return load_calibration(path, calib_file, self.n_samples, self.seq_len, self.seed)

    def build(self, path: str, args: Any, weights: dict, tok: Any, meta: dict, qts: dict[str, QTensor],
              bits: Any, group_size: int, load_s: float, stats: dict, **info: Any):
        """build_quantized_model with these options, its load and quantize times set; stats
        (the method's, for lm.extra) gain the sample counts and `info` (method, ...)."""
        from .. import engine

        cfg = engine.QuantConfig(bits=bits, group_size=group_size, head_bits=self.head_bits,
                                 head_group_size=self.head_group_size, embd_bits=self.embd_bits, mode=self.mode,
                                 symmetric=self.symmetric)
        lm = build_quantized_model(path, args, weights, tok, meta, qts, cfg, self.n_threads, self.ctx, self.native)
        lm.load_seconds = load_s
        lm.quantize_seconds = stats["seconds"]
        stats.update(n_samples=self.n_samples, seq_len=self.seq_len, **info)
        return lm


def quantize_model_gptq(
    path: str | None,
    bits: int | str,
    group_size: int,
    calib_file: str,
    n_samples: int = DEFAULT_N_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    **options: Any,
):
    """Load a float model, GPTQ its block linears on `calib_file` (N sequences of L tokens),
    and return an engine.LoadedModel running them on the LUT kernels. bits: 1-6, or
    "ternary" (absmean grid with error feedback; group_size 0: one scale per tensor). The
    output head is quantized like engine.load_model does (round-to-nearest at head_bits).
    Group sizes are fitted to each row length as engine does (engine._fit_group), so RTN
    and GPTQ models of the same --group-size use the same groups. options: CalibOptions'
    fields (head_bits, act_order, percdamp, n_threads, progress, ...)."""
    from .. import engine
    from ..models import Transformer

    o = CalibOptions(n_samples=n_samples, seq_len=seq_len, **options)
    check_calib_bits(bits, "GPTQ")
    path, args, weights, tok, meta, tokens, load_s = o.load(path, calib_file)
    calib_model = Transformer(args, weights, calibration_factory())
    if bits == "ternary" and not group_size:
        fit = None  # one absmean scale per tensor, as BitNet b1.58
    else:
        fit = lambda k: engine._fit_group(k, group_size)  # noqa: E731
    qts, stats = gptq_model_layers(calib_model, tokens, bits, fit, o.symmetric, o.act_order, o.block_size,
                                   o.percdamp, o.progress)
    del calib_model
    lm = o.build(path, args, weights, tok, meta, qts, bits, group_size, load_s, stats, method="gptq",
                 act_order=o.act_order, calib_file=calib_file, percdamp=o.percdamp, block_size=o.block_size)
    lm.extra.update(gptq=stats)
    return lm
