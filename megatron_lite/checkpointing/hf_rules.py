"""Hugging Face `transformers` models <-> megatron_lite: tensor names and shapes, and configs.

Two flavours map one to one:
- GPT-2 (LayerNorm, learned positions, GeLU MLP, biases) <-> `GPT2LMHeadModel`. HF's Conv1D stores
  weights as [in, out], so every linear is transposed; `c_attn` holds all q rows, then all k, then
  all v, while our fused QKV is laid out per head group [q; k; v] (transformer.py).
- Llama (RMSNorm, rotary, SwiGLU, GQA, usually no biases, untied) <-> `LlamaForCausalLM`. Our rotary
  embedding rotates halves (`rotate_half`, GPT-NeoX style), the convention of HF's Llama, so the q/k
  rows map without a permutation (Meta's original interleaved-pair checkpoints are what HF's own
  converter permutes). Our fc1 is [gate; up] stacked; HF keeps gate_proj and up_proj apart.
  Mistral (`MistralForCausalLM`) is the same layout with a sliding window; RoPE scaling and the
  window map onto config keys in `hf_rope.py`.
  Qwen2/2.5 (`Qwen2ForCausalLM`) is a Llama with biases on q/k/v only (--add-qkv-bias).

A Llama with --num-experts is a Mixtral (`MixtralForCausalLM`): its MLP rules are in hf_mixtral.py.

`hf_reader.HFReader` reads a HF directory by these rules; `hf_export.export_hf` writes by them.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable

import torch

from megatron_lite.checkpointing import CheckpointError
from megatron_lite.checkpointing.hf_mixtral import (
    MIXTRAL,
    check_mixtral,
    is_moe,
    mixtral_config,
    mixtral_mlp_rules,
    moe_from_mixtral,
)
from megatron_lite.checkpointing.hf_rope import (
    rope_parameters,
    rope_settings_from_hf,
    sliding_window,
    window_settings_from_hf,
)
from megatron_lite.config import Config, ModelConfig, MoEConfig, command_line
from megatron_lite.model.gpt import WORD_EMBEDDING

GPT2, LLAMA, MISTRAL, QWEN2 = "gpt2", "llama", "mistral", "qwen2"
OUTPUT_WEIGHT = "output_layer.weight"
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")
LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")  # (layer number, name in the layer)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def flavour_of(m: dict) -> str:
    """'gpt2' or 'llama' for our model settings (a ModelConfig as a dict), or a clear error."""
    gpt2 = {
        "normalization": "LayerNorm",
        "position_embedding_type": "learned_absolute",
        "swiglu": False,
    }
    llama = {"normalization": "RMSNorm", "position_embedding_type": "rope", "swiglu": True}
    for name, want in ((GPT2, gpt2), (LLAMA, llama)):
        if all(m.get(k) == v for k, v in want.items()):
            if name == GPT2:
                bad = []
                if m["num_query_groups"] != m["num_attention_heads"]:
                    bad.append("grouped-query attention")
                if m["kv_channels"] * m["num_attention_heads"] != m["hidden_size"]:
                    bad.append("--kv-channels x heads != --hidden-size")
                if not m["add_bias_linear"]:
                    bad.append("--disable-bias-linear")
                if bad:
                    raise CheckpointError(f"GPT-2 format cannot hold: {', '.join(bad)}")
            if name == GPT2 and m.get("window_size") is not None:
                raise CheckpointError("GPT-2 format cannot hold --window-size")
            return name
    settings = {k: m.get(k) for k in gpt2}
    raise CheckpointError(
        f"no Hugging Face architecture for this model ({settings}): GPT-2 needs LayerNorm, "
        "learned_absolute positions and GeLU; Llama needs RMSNorm, rope and --swiglu"
    )


# ---------------------------------------------------------------------------------------------------
# Tensor rules: one of our tensors <-> one or more HF tensors


def _split_qkv(w: torch.Tensor, m: dict) -> list[torch.Tensor]:
    """Our per-group [q heads; k; v] rows -> [all q, all k, all v] (weight [rows, h] or bias)."""
    ng, d = m["num_query_groups"], m["kv_channels"]
    per = m["num_attention_heads"] // ng
    x = w.reshape(ng, per + 2, d, -1)
    out = [x[:, :per], x[:, per : per + 1], x[:, per + 1 :]]
    return [t.reshape(-1, *w.shape[1:]) for t in out]


def _join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: dict) -> torch.Tensor:
    ng, d = m["num_query_groups"], m["kv_channels"]
    per = m["num_attention_heads"] // ng
    parts = [q.reshape(ng, per, d, -1), k.reshape(ng, 1, d, -1), v.reshape(ng, 1, d, -1)]
    return torch.cat(parts, dim=1).reshape(-1, *q.shape[1:])


class Rule:
    """Our tensor `ours` <-> HF tensors `hf`: `split` makes the HF ones, `join` makes ours."""

    def __init__(
        self,
        ours: str,
        hf: list[str],
        split: Callable[[torch.Tensor], list[torch.Tensor]] | None = None,
        join: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
    ):
        self.ours, self.hf = ours, hf
        self.split = split or (lambda t: [t])
        self.join = join or (lambda ts: ts[0])


def _gpt2_layer_rules(m: dict) -> list[Rule]:
    qkv_w = Rule(
        "self_attention.linear_qkv.weight",
        ["attn.c_attn.weight"],
        lambda t: [torch.cat(_split_qkv(t, m), 0).t()],
        lambda ts: _join_qkv(*ts[0].t().chunk(3, 0), m),
    )
    qkv_b = Rule(
        "self_attention.linear_qkv.bias",
        ["attn.c_attn.bias"],
        lambda t: [torch.cat(_split_qkv(t, m), 0)],
        lambda ts: _join_qkv(*ts[0].chunk(3, 0), m),
    )
    rules = [qkv_w, qkv_b]
    for ours, hf, transpose in (
        ("input_layernorm.weight", "ln_1.weight", False),
        ("input_layernorm.bias", "ln_1.bias", False),
        ("self_attention.linear_proj.weight", "attn.c_proj.weight", True),
        ("self_attention.linear_proj.bias", "attn.c_proj.bias", False),
        ("pre_mlp_layernorm.weight", "ln_2.weight", False),
        ("pre_mlp_layernorm.bias", "ln_2.bias", False),
        ("mlp.linear_fc1.weight", "mlp.c_fc.weight", True),
        ("mlp.linear_fc1.bias", "mlp.c_fc.bias", False),
        ("mlp.linear_fc2.weight", "mlp.c_proj.weight", True),
        ("mlp.linear_fc2.bias", "mlp.c_proj.bias", False),
    ):
        if transpose:
            rules.append(Rule(ours, [hf], lambda t: [t.t()], lambda ts: ts[0].t()))
        else:
            rules.append(Rule(ours, [hf]))
    return rules


def _llama_layer_rules(m: dict) -> list[Rule]:
    rules = []
    for kind in ("weight", "bias"):
        rules += [
            Rule(
                f"self_attention.linear_qkv.{kind}",
                [f"self_attn.{p}_proj.{kind}" for p in "qkv"],
                lambda t: _split_qkv(t, m),
                lambda ts: _join_qkv(*ts, m),
            ),
            Rule(f"self_attention.linear_proj.{kind}", [f"self_attn.o_proj.{kind}"]),
            Rule(
                f"mlp.linear_fc1.{kind}",
                [f"mlp.gate_proj.{kind}", f"mlp.up_proj.{kind}"],
                lambda t: list(t.chunk(2, 0)),
                lambda ts: torch.cat(ts, 0),
            ),
            Rule(f"mlp.linear_fc2.{kind}", [f"mlp.down_proj.{kind}"]),
        ]
    rules += [
        Rule("input_layernorm.weight", ["input_layernorm.weight"]),
        Rule("pre_mlp_layernorm.weight", ["post_attention_layernorm.weight"]),
    ]
    return rules


def rules_for(m: dict, moe: dict | None = None) -> tuple[dict[str, Rule], dict[str, Rule], str]:
    """(global rules, per-layer rules, HF layer prefix) keyed by our (layer-relative) name;
    `moe`: the config's moe section (a Llama with experts is a Mixtral)."""
    if is_moe(moe):
        if flavour_of(m) != LLAMA:
            raise CheckpointError("an MoE model converts to Hugging Face only as a Mixtral (Llama)")
        check_mixtral(m, moe)
    if flavour_of(m) == GPT2:
        glob = [
            Rule(WORD_EMBEDDING, ["transformer.wte.weight"]),
            Rule("embedding.position_embeddings.weight", ["transformer.wpe.weight"]),
            Rule("decoder.final_layernorm.weight", ["transformer.ln_f.weight"]),
            Rule("decoder.final_layernorm.bias", ["transformer.ln_f.bias"]),
            Rule(OUTPUT_WEIGHT, ["lm_head.weight"]),
        ]
        layer, prefix = _gpt2_layer_rules(m), "transformer.h.{}."
    else:
        glob = [
            Rule(WORD_EMBEDDING, ["model.embed_tokens.weight"]),
            Rule("decoder.final_layernorm.weight", ["model.norm.weight"]),
            Rule(OUTPUT_WEIGHT, ["lm_head.weight"]),
        ]
        layer, prefix = _llama_layer_rules(m), "model.layers.{}."
        if is_moe(moe):  # the dense MLP's rules give way to the router's and the experts'
            layer = [r for r in layer if not r.ours.startswith("mlp.")]
            layer += mixtral_mlp_rules(moe, Rule)
    return {r.ours: r for r in glob}, {r.ours: r for r in layer}, prefix


def to_hf_tensors(
    m: dict, name: str, t: torch.Tensor, moe: dict | None = None
) -> list[tuple[str, torch.Tensor]]:
    """Our full tensor `name` as HF (name, tensor) pairs."""
    glob, layer, prefix = rules_for(m, moe)
    match = LAYER_NAME.match(name)
    rule = layer.get(match.group(2)) if match else glob.get(name)
    if rule is None:
        raise CheckpointError(f"no Hugging Face name for tensor {name}")
    hf = [prefix.format(match.group(1)) + h for h in rule.hf] if match else rule.hf
    return list(zip(hf, rule.split(t)))


# ---------------------------------------------------------------------------------------------------
# Configs


def hf_config(cfg: dict, vocab_size: int, dtype: torch.dtype, eod: int | None = None) -> dict:
    """config.json for our config (Config.to_dict()) and true vocabulary size."""
    m = cfg["model"]
    common = {
        "vocab_size": vocab_size,
        "initializer_range": m["init_method_std"],
        "tie_word_embeddings": not m["untie_embeddings_and_output_weights"],
        "dtype": dtype_name(dtype),
        "torch_dtype": dtype_name(dtype),  # the key transformers 4.x reads
        "use_cache": True,
        "bos_token_id": eod,
        "eos_token_id": eod,
    }
    if flavour_of(m) == GPT2:
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_layer": m["num_layers"],
            "n_embd": m["hidden_size"],
            "n_head": m["num_attention_heads"],
            "n_inner": m["ffn_hidden_size"],
            "n_positions": m["max_position_embeddings"],
            "layer_norm_epsilon": m["layernorm_epsilon"],
            # our GeLU is exact erf unless --openai-gelu (GPT-2's tanh approximation)
            "activation_function": "gelu_new" if m.get("openai_gelu") else "gelu",
            "resid_pdrop": m["hidden_dropout"],
            "embd_pdrop": m["hidden_dropout"],
            "attn_pdrop": m["attention_dropout"],
            "scale_attn_weights": True,
            **common,
        }
    rope = rope_parameters(m)
    llama = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": LLAMA,
        "num_hidden_layers": m["num_layers"],
        "hidden_size": m["hidden_size"],
        "intermediate_size": m["ffn_hidden_size"],
        "num_attention_heads": m["num_attention_heads"],
        "num_key_value_heads": m["num_query_groups"],
        "head_dim": m["kv_channels"],
        "max_position_embeddings": m["max_position_embeddings"],
        "rms_norm_eps": m["layernorm_epsilon"],
        "hidden_act": "silu",
        "rope_theta": rope["rope_theta"],  # transformers 4.x; 5.x reads rope_parameters
        "rope_parameters": rope,
        "attention_bias": m["add_bias_linear"],
        "mlp_bias": m["add_bias_linear"],
        "attention_dropout": m["attention_dropout"],
        **common,
    }
    if rope["rope_type"] != "default":
        llama["rope_scaling"] = rope  # transformers 4.x's key for the same settings
    window = sliding_window(m)
    if is_moe(cfg.get("moe")):
        return mixtral_config(cfg, llama, window)
    if m.get("add_qkv_bias") and not m["add_bias_linear"]:
        if window is not None:
            raise CheckpointError("Qwen2 export with --window-size is not supported")
        llama.update(architectures=["Qwen2ForCausalLM"], model_type=QWEN2, use_sliding_window=False)
        for k in ("attention_bias", "mlp_bias"):
            del llama[k]
        return llama
    if window is None:
        return llama
    if m["add_bias_linear"]:  # HF Mistral has no bias switch
        raise CheckpointError(
            "a --window-size model exports as MistralForCausalLM, which has no biases: "
            "it needs --disable-bias-linear"
        )
    llama.update(architectures=["MistralForCausalLM"], model_type=MISTRAL, sliding_window=window)
    return llama


def config_from_hf(hf: dict) -> dict:
    """Our Config (as a dict) for a HF config.json of a GPT-2 or Llama model."""
    kind = hf.get("model_type")
    tie = hf.get("tie_word_embeddings", kind == GPT2)
    if kind == GPT2:
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise CheckpointError(f"GPT-2 activation_function {act!r} is not supported")
        m = ModelConfig(
            num_layers=hf["n_layer"],
            hidden_size=hf["n_embd"],
            num_attention_heads=hf["n_head"],
            ffn_hidden_size=hf.get("n_inner") or 4 * hf["n_embd"],
            seq_length=hf["n_positions"],
            max_position_embeddings=hf["n_positions"],
            layernorm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            openai_gelu=act != "gelu",
            untie_embeddings_and_output_weights=not tie,
            hidden_dropout=hf.get("resid_pdrop", 0.1),
            attention_dropout=hf.get("attn_pdrop", 0.1),
            init_method_std=hf.get("initializer_range", 0.02),
        )
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise CheckpointError("GPT-2 scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn")
    elif kind in (LLAMA, MISTRAL, MIXTRAL, QWEN2):
        if kind == QWEN2 and hf.get("use_sliding_window"):
            raise CheckpointError("Qwen2 use_sliding_window is not supported (--window-size)")
        if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias", False) != hf.get(
            "attention_bias", False
        ):
            raise CheckpointError("Llama needs hidden_act silu and mlp_bias == attention_bias")
        heads = hf["num_attention_heads"]
        groups = hf.get("num_key_value_heads") or heads
        m = ModelConfig(
            num_layers=hf["num_hidden_layers"],
            hidden_size=hf["hidden_size"],
            num_attention_heads=heads,
            group_query_attention=groups != heads,
            num_query_groups=groups,
            kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
            ffn_hidden_size=hf["intermediate_size"],
            seq_length=hf["max_position_embeddings"],
            max_position_embeddings=hf["max_position_embeddings"],
            position_embedding_type="rope",
            **rope_settings_from_hf(hf),
            **(window_settings_from_hf(hf) if kind in (MISTRAL, MIXTRAL) else {}),
            normalization="RMSNorm",
            layernorm_epsilon=hf.get("rms_norm_eps", 1e-6),
            swiglu=True,
            untie_embeddings_and_output_weights=not tie,
            add_bias_linear=bool(hf.get("attention_bias", False)),
            add_qkv_bias=kind == QWEN2,
            hidden_dropout=0.0,
            attention_dropout=hf.get("attention_dropout", 0.0),
            init_method_std=hf.get("initializer_range", 0.02),
        )
    else:
        raise CheckpointError(
            f"model_type {kind!r}: only 'gpt2', 'llama', 'mistral', 'mixtral' and 'qwen2' can be "
            "imported (Qwen3's q/k norm, Gemma's soft-capping and DeepSeek's MLA are not)"
        )
    moe = MoEConfig(**moe_from_mixtral(hf)) if kind == MIXTRAL else MoEConfig()
    return Config(model=m, moe=moe).to_dict()


def model_flags(m: dict, moe: dict | None = None) -> str:
    """The training flags that rebuild this model (printed after an import): every model (and MoE)
    setting that differs from its default, in its flag's spelling (`config.command_line`)."""
    flags = command_line(ModelConfig(**m))
    if is_moe(moe):
        flags += command_line(MoEConfig(**moe))
    return shlex.join(flags)
