"""RoPE scaling and sliding-window settings <-> Hugging Face config.json keys.

HF keeps RoPE scaling in `rope_parameters` (transformers 5; `rope_scaling` plus a top-level
`rope_theta` in 4.x, read here too) with a `rope_type`: default, linear, llama3 or yarn map onto
model/rope.py's schemes with the same numbers. HF's `sliding_window` W lets a query see W keys
including itself (`kv_idx > q_idx - W`): our --window-size W-1,0. Llama has no sliding window, so a
windowed model is exported as `MistralForCausalLM` (Mistral = Llama without biases, plus the window).
"""

from __future__ import annotations

import math

from megatron_lite.checkpointing import CheckpointError
from megatron_lite.config import ModelConfig
from megatron_lite.model.rope import original_positions, rope_type, yarn_attention_factor

SUPPORTED = ("default", "linear", "llama3", "yarn")


def rope_parameters(m: dict) -> dict:
    """HF `rope_parameters` of our model settings (a ModelConfig as a dict)."""
    mc = ModelConfig(**m)
    if mc.rotary_percent != 1.0:
        raise CheckpointError(
            f"--rotary-percent {mc.rotary_percent}: HF Llama/Mistral rotate every channel; "
            "export needs --rotary-percent 1.0"
        )
    kind = rope_type(mc)
    out = {"rope_type": kind, "rope_theta": float(mc.rotary_base)}
    if kind == "linear":
        out["factor"] = float(mc.rotary_seq_len_interpolation_factor)
    elif kind == "llama3":
        out.update(
            factor=mc.rope_scaling_factor,
            low_freq_factor=mc.low_freq_factor,
            high_freq_factor=mc.high_freq_factor,
            original_max_position_embeddings=original_positions(mc),
        )
    elif kind == "yarn":
        f = mc.rotary_scaling_factor
        out.update(
            factor=f,
            original_max_position_embeddings=original_positions(mc),
            beta_fast=mc.beta_fast,
            beta_slow=mc.beta_slow,
            # explicit, so HF need not re-derive it from mscale (its rule differs at mscale_all_dim 0)
            attention_factor=yarn_attention_factor(f, mc.mscale, mc.mscale_all_dim),
            truncate=True,
        )
    return out


def sliding_window(m: dict) -> int | None:
    """HF `sliding_window` of our --window-size (None: full causal attention)."""
    left = ModelConfig(**m).window_left
    return None if left is None else left + 1


def _params(hf: dict) -> dict:
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    if "type" in params and "rope_type" not in params:  # transformers 4.x's older key
        params["rope_type"] = params["type"]
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    return params


def _yarn_from_hf(p: dict, max_positions: int) -> dict:
    orig = p.get("original_max_position_embeddings")
    if orig is None:
        raise CheckpointError("HF rope_type yarn needs original_max_position_embeddings")
    factor = p.get("factor") or max_positions / orig  # HF's rule when factor is absent
    if p.get("truncate", True) is not True:
        raise CheckpointError("HF rope_type yarn with truncate false is not supported")
    mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
    attention = p.get("attention_factor")
    if attention is None and mscale and mscale_all_dim:
        out = {"mscale": float(mscale), "mscale_all_dim": float(mscale_all_dim)}
    else:  # one mscale: attention = 0.1 mscale ln(factor) + 1 over 1 (mscale_all_dim 0)
        attention = yarn_attention_factor(factor, 1.0, 0.0) if attention is None else attention
        if factor <= 1 and attention != 1.0:
            raise CheckpointError(f"HF yarn attention_factor {attention} with factor {factor} <= 1")
        ms = (attention - 1.0) / (0.1 * math.log(factor)) if factor > 1 else 1.0
        out = {"mscale": ms, "mscale_all_dim": 0.0}
    return {
        "rope_type": "yarn",
        "rotary_scaling_factor": float(factor),
        "original_max_position_embeddings": int(orig),
        "beta_fast": float(p.get("beta_fast") or 32),
        "beta_slow": float(p.get("beta_slow") or 1),
        **out,
    }


def rope_settings_from_hf(hf: dict) -> dict:
    """ModelConfig keyword arguments for a HF config's RoPE (base, scaling, partial rotation)."""
    p = _params(hf)
    kind = p.get("rope_type") or "default"
    if kind not in SUPPORTED:
        raise CheckpointError(
            f"HF rope_type {kind!r} is not supported (supported: {', '.join(SUPPORTED)})"
        )
    partial = p.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise CheckpointError(f"HF partial_rotary_factor {partial}: only 1.0 is supported")
    theta = p["rope_theta"]
    out: dict = {"rotary_base": int(theta) if float(theta).is_integer() else theta}
    if kind == "linear":
        out["rotary_seq_len_interpolation_factor"] = float(p["factor"])
    elif kind == "llama3":
        out.update(
            use_rope_scaling=True,
            rope_scaling_factor=float(p["factor"]),
            low_freq_factor=float(p.get("low_freq_factor", 1.0)),
            high_freq_factor=float(p.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(p["original_max_position_embeddings"]),
        )
    elif kind == "yarn":
        out.update(_yarn_from_hf(p, hf["max_position_embeddings"]))
    return out


def window_settings_from_hf(hf: dict) -> dict:
    """ModelConfig keyword arguments for a HF (Mistral) config's sliding window."""
    w = hf.get("sliding_window")
    types = set(hf.get("layer_types") or [])
    if len(types) > 1:
        raise CheckpointError(
            f"HF layer_types mixes {sorted(types)}: a window on some layers only is not supported"
        )
    if w is None or types == {"full_attention"}:
        return {}
    if not isinstance(w, int) or w < 1:
        raise CheckpointError(f"HF sliding_window must be a positive integer, got {w!r}")
    return {"window_size": [w - 1, 0]}
