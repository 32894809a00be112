"""Mixed precision: bits per linear layer, chosen from measured sensitivity under an
average bits-per-weight budget.

Sensitivity of layer l at b bits, cost(l, b): the KL divergence of the model's next-token
distribution from the float model's, on a few calibration sequences, when only layer l
is quantized (round-to-nearest). It is measured at the lowest candidate bits (one tail
of the forward pass per layer: blocks from l's on, then the head), and carried to the
other candidates by the layer's own output error on its calibration inputs:
cost(l, b) = KL(l, b_min) * tr(E_b H E_b^T) / tr(E_bmin H E_bmin^T), E_b = W - RTN_b(W)
(a second-order model of the loss is linear in the output error's energy, and the error
of one layer's rounding keeps its direction across bit widths).

A candidate is a number of bits (at the group size given to the command) or a pair (bits,
group size), e.g. (4, 128), (4, 32), (3, 64): group size is a precision knob as much as the
bits are (on SmolLM2, 4-bit layers at group 32 cost 0.5 bit/weight more than at 128 and
remove most of their error), so the allocation may trade either.

Bits per weight of a layer (what the budget counts): bits + 16/g for the fp16 scales,
+ 16/g more for fp16 zeros unless symmetric, g the group size fitted to the row as the
engine fits it. The allocation (allocate_bits) starts every layer at its cheapest
candidate and repeatedly takes the upgrade (to any higher candidate of one layer) with the
largest cost reduction per added bit that still fits: the average never exceeds the budget.
The layers are then quantized with their bits by sequential GPTQ (or RTN), as
calibration.py does, so every layer is a QTensor the LUT kernels run.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable

import numpy as np

from .awq import (
    _ATTR,
    BLOCK_LINEARS,
    DEFAULT_GRID,
    AWQBlockHook,
    _Capture,
    fake_quantizer,
    fold_into_weights,
    output_error,
    quantizer,
)
from .calibration import (
    DEFAULT_N_SAMPLES,
    DEFAULT_SEQ_LEN,
    CalibOptions,
    HessianAccumulator,
    Progress,
    QuantizeGroup,
    _CalibLinear,
    calibration_factory,
    calibration_tokens,
    sequential_quantize,
    split_rows,
)
from .gptq import DEFAULT_BLOCK_SIZE, DEFAULT_PERCDAMP, gptq_quantize
from .qtensor import SUPPORTED_BITS, QTensor

CANDIDATE_BITS = (2, 3, 4)
DEFAULT_SENS_SAMPLES = 2
DEFAULT_SENS_LEN = 128
GroupFit = Callable[[int], int]
Candidate = int | tuple[int, int]  # bits (at the command's group size), or (bits, group size)


def cand_bits(c: Candidate) -> int:
    return c[0] if isinstance(c, tuple) else int(c)


def cand_group(c: Candidate, k: int, fit: GroupFit) -> int:
    """The group size of candidate c on a row of k weights, fitted as the engine fits it."""
    if isinstance(c, tuple):
        from ..engine import _fit_group

        return _fit_group(k, c[1])
    return fit(k)


def cand_label(c: Candidate) -> str:
    return f"{c[0]}g{c[1]}" if isinstance(c, tuple) else str(c)


AUTO_GROUPS = (128, 64, 32)
AUTO_BELOW, AUTO_ABOVE = 1.25, 1.0  # bits/weight either side of the budget "auto" spans
AUTO_BITS_BELOW = 1.6  # and code bits no further below it


def auto_candidates(budget: float, symmetric: bool = False) -> tuple[Candidate, ...]:
    """The candidates "auto" gives a budget: every (bits 2-6, group 128/64/32) whose bits per
    weight lie within [budget - 1.25, budget + 1.0] and whose bits are at least budget - 1.6
    (so 2g32, 3.0 bits/weight, is not a candidate of 4.2). The sensitivity is measured at the
    cheapest candidate and carried to the others by their output error, which holds near the
    measurement: the measured sets (3g128..4g32 under 3.9-4.5 bits, 4g128..6g32 under
    5.5-6.0, benchmarks/README.md) span about that range."""
    out = tuple((b, g) for b in SUPPORTED_BITS if b >= max(2.0, budget - AUTO_BITS_BELOW) for g in AUTO_GROUPS
                if budget - AUTO_BELOW <= layer_bpw(b, g, symmetric) <= budget + AUTO_ABOVE)
    if not out:
        raise ValueError(f"no mixed candidate lies near a budget of {budget} bits/weight (2-6 bits at groups "
                         f"{'/'.join(map(str, AUTO_GROUPS))}); give --mixed-bits")
    return out


def parse_candidates(text: str, budget: float | None = None, symmetric: bool = False) -> tuple[Candidate, ...]:
    """'2,3,4' -> (2, 3, 4); '3g128,4g128,4g32' -> ((3, 128), (4, 128), (4, 32)); 'auto' ->
    auto_candidates(budget)."""
    if str(text).strip().lower() == "auto":
        if budget is None:
            raise ValueError("mixed candidates 'auto' need the bits-per-weight budget")
        return auto_candidates(budget, symmetric)
    out: list[Candidate] = []
    for item in str(text).split(","):
        item = item.strip().lower()
        try:
            if "g" in item:
                b, g = item.split("g", 1)
                out.append((int(b), int(g)))
            else:
                out.append(int(item))
        except ValueError:
            raise ValueError(f"mixed candidates are BITS or BITSgGROUP (e.g. 4g32), got {item!r}") from None
    if not out or any(cand_bits(c) not in SUPPORTED_BITS for c in out) or any(
            isinstance(c, tuple) and c[1] < 1 for c in out):
        raise ValueError(f"mixed candidates need bits 1-6 and positive group sizes, got {text!r}")
    return tuple(out)


def _cheapest(cands, k: int, fit: GroupFit) -> Candidate:
    """The candidate with the fewest bits per weight on a row of k (scales counted)."""
    return min(cands, key=lambda c: (cand_bits(c), -cand_group(c, k, fit)))


def layer_bpw(bits: int, group_size: int, symmetric: bool = False) -> float:
    """Storage bits per weight of a layer: codes plus fp16 scales (and zeros)."""
    return bits + 16.0 * (1 if symmetric else 2) / group_size


def allocate_bits(
    sizes: dict[str, int],
    bpw: dict[str, dict[int, float]],
    cost: dict[str, dict[int, float]],
    budget: float,
) -> dict[str, int]:
    """Bits per layer minimizing sum(cost) greedily, with sum(sizes * bpw) <= budget *
    sum(sizes). sizes: weights per layer; bpw[l][b]: bits per weight of layer l at b bits;
    cost[l][b]: its sensitivity. Raises ValueError when even the cheapest choice is over."""
    names = list(sizes)
    choice = {n: min(bpw[n], key=lambda b: bpw[n][b]) for n in names}
    limit = budget * sum(sizes.values())
    used = sum(sizes[n] * bpw[n][choice[n]] for n in names)
    if used > limit * (1 + 1e-12):
        raise ValueError(f"the budget {budget} bits/weight is below the cheapest choice "
                         f"({used / sum(sizes.values()):.4f})")
    while True:
        best, best_ratio = None, 0.0
        for n in names:
            c = choice[n]
            for b in bpw[n]:
                extra = sizes[n] * (bpw[n][b] - bpw[n][c])
                gain = cost[n][c] - cost[n][b]
                if extra <= 0 or gain <= 0 or used + extra > limit:
                    continue
                if gain / extra > best_ratio:
                    best, best_ratio = (n, b, extra), gain / extra
        if best is None:
            return choice
        n, b, extra = best
        choice[n] = b
        used += extra


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


class _Swap:
    """A float linear whose weight a measurement can replace for a while."""

    def __init__(self, w: np.ndarray):
        self.w = np.asarray(w, np.float32)  # [n, k]
        self.wt = np.ascontiguousarray(self.w.T)  # [k, n]
        self.override: np.ndarray | None = None  # [k, n] when set

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x @ (self.wt if self.override is None else self.override)  # [m, k] @ [k, n]


def measure_sensitivity(
    args: Any,
    weights: dict[str, np.ndarray],
    tokens: np.ndarray,
    candidate_bits: tuple[Candidate, ...],
    fit: GroupFit,
    symmetric: bool = False,
    progress: Progress | None = None,
) -> tuple[dict[str, dict[Candidate, float]], dict]:
    """cost[layer][candidate] of every block linear (module docstring) on tokens [N, L].
    Returns (cost, {"kl": KL at the cheapest candidate, "err": output errors by candidate})."""
    from ..models import Transformer
    from ..models.transformer import rms_norm, softcap

    tokens = np.asarray(tokens)
    n_samples, seq_len = tokens.shape
    model = Transformer(args, weights, lambda name, w: _Swap(w))
    layers = model.layers
    positions = np.arange(seq_len)
    trig = {id(r): r.cos_sin(positions) for r in model._ropes.values()}
    cache = model.new_cache(seq_len)
    fq = lambda c, k: fake_quantizer(cand_bits(c), cand_group(c, k, fit), symmetric)  # noqa: E731

    def block(j: int, lay: Any, x: np.ndarray) -> np.ndarray:
        rope = model.layer_rope(j)
        return model._block(j, lay, x, rope, trig[id(rope)], cache, 0)

    def log_probs(x: np.ndarray) -> np.ndarray:
        logits = model.output(rms_norm(x, model.output_norm, args.norm_eps))  # [L, vocab]
        if args.final_logit_softcap:
            logits = softcap(logits, args.final_logit_softcap)
        return _log_softmax(logits)

    # the float pass, block by block: each block's inputs, each layer's output errors
    x = np.asarray(model.tok_embd[tokens], dtype=np.float32)  # [N, L] -> [N, L, dim]
    if args.embed_scale != 1.0:
        x = x * np.float32(args.embed_scale)
    xs: list[np.ndarray] = []
    err: dict[str, dict[int, float]] = {}
    for i, layer in enumerate(layers):
        xs.append(x)
        caps = {n: _Capture(getattr(layer, _ATTR[n]).w, record=True) for n in BLOCK_LINEARS}
        rec = copy.copy(layer)  # the block with linears that record their inputs
        for n, c in caps.items():
            setattr(rec, _ATTR[n], c)
        x = np.stack([block(i, rec, x[s]) for s in range(n_samples)])  # [N, L, dim]
        for n, c in caps.items():
            w = getattr(layer, _ATTR[n]).w
            h = c.acc.hessian.astype(np.float32)
            err[f"blk.{i}.{n}.weight"] = {c: output_error(w - fq(c, w.shape[1])(w), h) for c in candidate_bits}
    ref = [log_probs(x[s]) for s in range(n_samples)]  # [L, vocab] each
    p_ref = [np.exp(r) for r in ref]

    # one tail of the forward pass per layer, only that layer at the lowest bits
    kl: dict[str, float] = {}
    total = len(layers) * len(BLOCK_LINEARS)
    for i, layer in enumerate(layers):
        for n in BLOCK_LINEARS:
            lin = getattr(layer, _ATTR[n])
            name = f"blk.{i}.{n}.weight"
            c_min = _cheapest(candidate_bits, lin.w.shape[1], fit)
            lin.override = np.ascontiguousarray(fq(c_min, lin.w.shape[1])(lin.w).T)
            acc = 0.0
            for s in range(n_samples):
                y = xs[i][s]
                for j in range(i, len(layers)):
                    y = block(j, layers[j], y)
                lq = log_probs(y)
                acc += float((p_ref[s] * (ref[s] - lq)).sum(-1).mean())  # KL(float || quantized)
            lin.override = None
            kl[name] = max(acc / n_samples, 0.0)
            if progress:
                progress(len(kl), total, f"sensitivity {name}")
    cost = {}
    for name, e in err.items():
        e0 = e[_cheapest(candidate_bits, weights[name].shape[1], fit)]
        cost[name] = {c: kl[name] * (e[c] / e0 if e0 > 0 else 0.0) for c in candidate_bits}
    return cost, {"kl": kl, "err": err}


def mixed_group_quantizer(
    bits_of: dict[str, Candidate],
    fit: GroupFit,
    symmetric: bool = False,
    use_gptq: bool = True,
    act_order: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
    percdamp: float = DEFAULT_PERCDAMP,
) -> QuantizeGroup:
    """quantize_group for sequential_quantize with a candidate (bits, group) per layer: the
    layers of a group with the same candidate are stacked into one GPTQ (or each rounded to
    nearest)."""

    def quantize_group(group: list[_CalibLinear], acc: HessianAccumulator) -> list[QTensor]:
        out: dict[str, QTensor] = {}
        k = group[0].w.shape[1]
        for c in sorted({bits_of[l.name] for l in group}, key=cand_label):
            members = [l for l in group if bits_of[l.name] == c]
            b, g = cand_bits(c), cand_group(c, k, fit)
            if use_gptq:
                w = np.concatenate([l.w for l in members])  # rows of one input: [sum n, k]
                qt = gptq_quantize(w, acc.hessian, b, g, symmetric, act_order, block_size, percdamp)
                out.update(zip([l.name for l in members], split_rows(qt, [l.w.shape[0] for l in members])))
            else:
                out.update((l.name, quantizer(b, g, symmetric)(l.w)) for l in members)
        return [out[l.name] for l in group]

    return quantize_group


def quantize_model_mixed(
    path: str | None,
    bpw_budget: float,
    group_size: int,
    calib_file: str,
    n_samples: int = DEFAULT_N_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    *,
    candidate_bits: tuple[Candidate, ...] = CANDIDATE_BITS,
    use_gptq: bool = True,
    sens_samples: int = DEFAULT_SENS_SAMPLES,
    sens_len: int = DEFAULT_SENS_LEN,
    awq: bool = False,
    **options: Any,
):
    """Load a float model, choose bits per block linear (candidate_bits) from measured
    sensitivity so that their average bits per weight (scales and zeros counted) is at
    most bpw_budget, quantize them with those bits by sequential GPTQ (or RTN when not
    use_gptq) on `calib_file`, and return an engine.LoadedModel on the LUT kernels. Same
    shape as calibration.quantize_model_gptq (options: CalibOptions' fields), bpw_budget in
    place of bits; the head is not counted in the budget. awq: AWQ's scale search first in
    each block, at each layer's chosen bits, folded into the norms as quantize_model_awq
    does (lm.extra["weights"]: the float weights with the folded norms).
    lm.extra["mixed"]: the bits per layer, the achieved bits per weight, the sensitivities
    and the timings."""
    from .. import engine

    o = CalibOptions(n_samples=n_samples, seq_len=seq_len, **options)
    path, args, weights, tok, meta, tokens, load_s = o.load(path, calib_file)
    fit = lambda k: engine._fit_group(k, group_size)  # noqa: E731
    with open(calib_file, encoding="utf-8") as f:
        sens_tokens = calibration_tokens(tok, f.read(), sens_samples, sens_len, o.seed + 1)
    qts, stats = mixed_model_layers(args, weights, tokens, sens_tokens, bpw_budget, fit, candidate_bits, o.symmetric,
                                    use_gptq, o.act_order, o.block_size, o.percdamp, o.progress, awq=awq)
    if awq:
        weights = fold_into_weights(args, weights, stats.pop("awq_scales"))
    lm = o.build(path, args, weights, tok, meta, qts, max(qt.bits for qt in qts.values()), group_size, load_s,
                 stats, sens_samples=sens_samples, sens_len=sens_len, calib_file=calib_file)
    lm.extra.update(mixed=stats)
    return lm


def mixed_model_layers(
    args: Any,
    weights: dict[str, np.ndarray],
    tokens: np.ndarray,
    sens_tokens: np.ndarray,
    bpw_budget: float,
    fit: GroupFit,
    candidate_bits: tuple[Candidate, ...] = CANDIDATE_BITS,
    symmetric: bool = False,
    use_gptq: bool = True,
    act_order: bool = True,
    block_size: int = DEFAULT_BLOCK_SIZE,
    percdamp: float = DEFAULT_PERCDAMP,
    progress: Progress | None = None,
    *,
    awq: bool = False,
    awq_grid: int = DEFAULT_GRID,
) -> tuple[dict[str, QTensor], dict]:
    """The mixed-precision QTensors of every block linear of a float model (weights): the
    sensitivities measured on sens_tokens [N', L'], the allocation under bpw_budget, then
    sequential GPTQ (or RTN) on tokens [N, L], after AWQ's scale search per block when awq
    (each layer's error judged at its own bits; stats["awq_scales"]: {block: scales} for
    awq.fold_into_weights, which the QTensors expect). Returns ({name: QTensor}, stats)."""
    from ..models import Transformer

    if not candidate_bits or any(cand_bits(c) not in SUPPORTED_BITS for c in candidate_bits):
        raise ValueError(f"candidate bits must be among 1-6, got {candidate_bits}")
    t0 = time.perf_counter()
    names = [f"blk.{i}.{n}.weight" for i in range(args.n_layers) for n in BLOCK_LINEARS]
    sizes = {n: int(weights[n].size) for n in names}
    bpw = {n: {c: layer_bpw(cand_bits(c), cand_group(c, weights[n].shape[1], fit), symmetric)
               for c in candidate_bits} for n in names}
    cost, sens = measure_sensitivity(args, weights, sens_tokens, tuple(candidate_bits), fit, symmetric, progress)
    bits_of = allocate_bits(sizes, bpw, cost, bpw_budget)
    sens_s = time.perf_counter() - t0

    calib_model = Transformer(args, weights, calibration_factory())
    qg = mixed_group_quantizer(bits_of, fit, symmetric, use_gptq, act_order, block_size, percdamp)
    hook = None
    if awq:  # the search rounds each linear as it will be: its candidate's bits and group size
        hook = AWQBlockHook(args, fit, CANDIDATE_BITS[-1], symmetric, awq_grid,
                            layer_quant=lambda name, k: (cand_bits(bits_of[name]), cand_group(bits_of[name], k, fit)))
    qts, stats = sequential_quantize(calib_model, tokens, qg, progress, block_hook=hook,
                                     label="awq+mixed" if awq else "mixed")
    del calib_model
    if hook is not None:
        stats.update(awq_scales=hook.scales, awq_search=hook.search)

    achieved = sum(sizes[n] * bpw[n][bits_of[n]] for n in names) / sum(sizes.values())
    counts = {cand_label(c) if isinstance(c, tuple) else c: sum(1 for n in names if bits_of[n] == c)
              for c in candidate_bits}
    stats.update(method="awq+mixed" if awq else "mixed", budget=bpw_budget, bpw=achieved, counts=counts,
                 bits={n: cand_bits(c) for n, c in bits_of.items()},
                 groups={n: qts[n].group_size for n in names},
                 sensitivity_seconds=sens_s, quantize_seconds=stats["seconds"], seconds=sens_s + stats["seconds"],
                 cost={n: {cand_label(c): v for c, v in cv.items()} for n, cv in cost.items()}, kl=sens["kl"],
                 use_gptq=use_gptq, awq=awq)
    return qts, stats
