"""Hugging Face `transformers` checkpoints (config.json + safetensors) <-> megatron_lite tensors.

Two flavours map one to one:
- GPT-2 (LayerNorm, learned positions, GeLU MLP, biases) <-> `GPT2LMHeadModel`. HF's Conv1D stores
  weights as [in, out], so every linear is transposed; `c_attn` holds all q rows, then all k, then
  all v, while our fused QKV is laid out per head group [q; k; v] (transformer.py).
- Llama (RMSNorm, rotary, SwiGLU, GQA, usually no biases, untied) <-> `LlamaForCausalLM`. Our rotary
  embedding rotates halves (`rotate_half`, GPT-NeoX style), the convention of HF's Llama, so the q/k
  rows map without a permutation (Meta's original interleaved-pair checkpoints are what HF's own
  converter permutes). Our fc1 is [gate; up] stacked; HF keeps gate_proj and up_proj apart.

`HFReader` reads a HF directory through the CheckpointReader interface (full tensors by our global
names), so the loader's reshard path (`checkpointing.shard_from_reader`) imports HF weights into any
tp x pp. `hf_export.export_hf` writes any reader to HF format one tensor at a time.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable

import torch

from megatron_lite.checkpointing import CheckpointError, CheckpointReader
from megatron_lite.config import Config, ModelConfig, precision_of
from megatron_lite.device import PRECISION_DTYPES

GPT2, LLAMA = "gpt2", "llama"
WORD_EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_WEIGHT = "output_layer.weight"
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def training_dtype(cfg: dict) -> torch.dtype:
    """The model weights' dtype in a run of this config (masters stay fp32)."""
    o = cfg.get("optim", {})
    return PRECISION_DTYPES[precision_of(o.get("bf16", False), o.get("fp16", False))]


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


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


def rules_for(m: dict) -> tuple[dict[str, Rule], dict[str, Rule], str]:
    """(global rules, per-layer rules, HF layer prefix) keyed by our (layer-relative) name."""
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
    return {r.ours: r for r in glob}, {r.ours: r for r in layer}, prefix


def to_hf_tensors(m: dict, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Our full tensor `name` as HF (name, tensor) pairs."""
    glob, layer, prefix = rules_for(m)
    match = _LAYER.match(name)
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
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": m["num_layers"],
        "hidden_size": m["hidden_size"],
        "intermediate_size": m["ffn_hidden_size"],
        "num_attention_heads": m["num_attention_heads"],
        "num_key_value_heads": m["num_query_groups"],
        "head_dim": m["kv_channels"],
        "max_position_embeddings": m["max_position_embeddings"],
        "rms_norm_eps": m["layernorm_epsilon"],
        "hidden_act": "silu",
        "rope_theta": float(m["rotary_base"]),  # transformers 4.x; 5.x reads rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": float(m["rotary_base"])},
        "attention_bias": m["add_bias_linear"],
        "mlp_bias": m["add_bias_linear"],
        "attention_dropout": m["attention_dropout"],
        **common,
    }


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
    elif kind == LLAMA:
        rope = hf.get("rope_parameters") or {}
        if (rope.get("rope_type") or "default") != "default" or hf.get("rope_scaling"):
            raise CheckpointError(
                f"Llama rope scaling {rope or hf.get('rope_scaling')} is not "
                "supported (only the default rotary embedding)"
            )
        if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias", False) != hf.get(
            "attention_bias", False
        ):
            raise CheckpointError("Llama needs hidden_act silu and mlp_bias == attention_bias")
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
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
            rotary_base=int(theta) if float(theta).is_integer() else theta,
            normalization="RMSNorm",
            layernorm_epsilon=hf.get("rms_norm_eps", 1e-6),
            swiglu=True,
            untie_embeddings_and_output_weights=not tie,
            add_bias_linear=bool(hf.get("attention_bias", False)),
            hidden_dropout=0.0,
            attention_dropout=hf.get("attention_dropout", 0.0),
            init_method_std=hf.get("initializer_range", 0.02),
        )
    else:
        raise CheckpointError(f"model_type {kind!r}: only 'gpt2' and 'llama' can be imported")
    return Config(model=m).to_dict()


def model_flags(m: dict) -> str:
    """The training flags that rebuild this model (printed after an import)."""
    f = [
        f"--num-layers {m['num_layers']}",
        f"--hidden-size {m['hidden_size']}",
        f"--num-attention-heads {m['num_attention_heads']}",
        f"--ffn-hidden-size {m['ffn_hidden_size']}",
        f"--kv-channels {m['kv_channels']}",
        f"--max-position-embeddings {m['max_position_embeddings']}",
        f"--normalization {m['normalization']}",
        f"--position-embedding-type {m['position_embedding_type']}",
        f"--layernorm-epsilon {m['layernorm_epsilon']}",
    ]
    if m["position_embedding_type"] == "rope":
        f.append(f"--rotary-base {m['rotary_base']}")
    for key, flag in (
        ("swiglu", "--swiglu"),
        ("openai_gelu", "--openai-gelu"),
        ("untie_embeddings_and_output_weights", "--untie-embeddings-and-output-weights"),
        ("group_query_attention", "--group-query-attention"),
    ):
        if m.get(key):
            f.append(flag)
    if m["group_query_attention"]:
        f.append(f"--num-query-groups {m['num_query_groups']}")
    if not m["add_bias_linear"]:
        f.append("--disable-bias-linear")
    return " ".join(f)


# ---------------------------------------------------------------------------------------------------
# Reading a HF directory through the CheckpointReader interface


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


class HFReader:
    """A HF model directory seen as a one-stage megatron_lite checkpoint without optimizer state."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.dir = path
        with open(os.path.join(path, "config.json")) as f:
            self.hf = json.load(f)
        self.config = config_from_hf(self.hf)
        self.vocab_size: int = self.hf["vocab_size"]
        self.iteration, self.consumed_samples = 0, 0
        self.layout = {"tp": 1, "pp": 1, "dp": 1, "vpp": None}
        self.tp = self.pp = 1
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            raise CheckpointError(
                f"{path}: no model.safetensors (or index); only safetensors weights are read"
            )
        self._where: dict[str, object] = {}
        for name in files:
            handle = safe_open(os.path.join(path, name), framework="pt")
            for key in handle.keys():
                self._where[key] = handle
        m = self.config["model"]
        self._glob, self._layer, self._prefix = rules_for(m)
        self._names = self._our_names(m)

    def _our_names(self, m: dict) -> list[str]:
        def present(rule: Rule, prefix: str) -> bool:
            return all(prefix + h in self._where for h in rule.hf)

        names = [n for n, r in self._glob.items() if n != OUTPUT_WEIGHT and present(r, "")]
        for i in range(m["num_layers"]):
            prefix = self._prefix.format(i)
            names += [
                f"decoder.layers.{i}.{n}" for n, r in self._layer.items() if present(r, prefix)
            ]
        if m["untie_embeddings_and_output_weights"]:
            names.append(OUTPUT_WEIGHT)
        # the final norm after the layers, as the model's state dict orders them
        return sorted(names, key=lambda n: ("final_layernorm" in n) + 2 * (n == OUTPUT_WEIGHT))

    def names(self) -> list[str]:
        return list(self._names)

    def locate(self, name: str) -> int | None:
        return 0 if name in self._names else None

    def has_optimizer(self) -> bool:
        return False

    def optimizer_state_keys(self, name: str) -> list[str]:  # noqa: ARG002
        return []

    def file(self, tp_rank: int = 0, pp_rank: int = 0) -> dict:  # noqa: ARG002
        # the special token ids have no place in our config: an import keeps them in `extra`
        special = {k: self.hf.get(k) for k in SPECIAL_TOKENS}
        return {"optimizer": None, "opt_param_scheduler": None, "extra": {"hf": special}}

    def _get(self, hf_name: str) -> torch.Tensor:
        if hf_name not in self._where:
            raise CheckpointError(f"{self.dir} holds no tensor named {hf_name}")
        return self._where[hf_name].get_tensor(hf_name)

    def full_tensor(self, name: str, state_key: str | None = None) -> torch.Tensor:
        if state_key is not None:
            raise CheckpointError(f"{self.dir} is a Hugging Face model: no optimizer state")
        match = _LAYER.match(name)
        rule = self._layer.get(match.group(2)) if match else self._glob.get(name)
        if rule is None or name not in self._names:
            raise CheckpointError(f"{self.dir} holds no tensor named {name}")
        prefix = self._prefix.format(match.group(1)) if match else ""
        return rule.join([self._get(prefix + h) for h in rule.hf]).contiguous()


def open_checkpoint(path: str, iteration: int | None = None) -> CheckpointReader | HFReader:
    """A reader for a megatron_lite checkpoint directory or a HF model directory."""
    if is_hf_dir(path):
        return HFReader(path)
    return CheckpointReader(path, iteration)
