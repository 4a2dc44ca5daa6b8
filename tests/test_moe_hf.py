"""Mixtral <-> megatron_lite through Hugging Face files: a `MixtralForCausalLM` made by transformers
imports (at tp2 x pp2 on disk), gives transformers' logits, generates what transformers generates
greedily, and our checkpoint exports back to the same tensors and config (tools/checkpoint/convert.py
runs both directions through these readers)."""

import json

import pytest
import torch

from megatron_lite import checkpointing as ckpt
from megatron_lite.checkpointing import CheckpointError
from megatron_lite.checkpointing.hf_export import export_hf
from megatron_lite.checkpointing.hf_reader import HFReader
from megatron_lite.checkpointing.hf_rules import model_flags, rules_for
from megatron_lite.checkpointing.reshard import probe_tokens, reshard
from megatron_lite.inference.generation import SamplingParams, generate, load_model

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
CPU = torch.device("cpu")
VOCAB = 97


def _mixtral(path, window: int | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=32,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        sliding_window=window,
    )
    model = transformers.MixtralForCausalLM(config)
    with torch.no_grad():  # norms away from their init of ones, so a mix-up shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(path))
    return model.eval()


@pytest.mark.parametrize("window", [None, 6], ids=["full", "sliding-window"])
def test_mixtral_imports_matches_transformers_generates_and_exports_back(tmp_path, window):
    model = _mixtral(tmp_path / "orig", window)
    reader = HFReader(str(tmp_path / "orig"))
    assert reader.config["moe"]["num_experts"] == 4
    assert reader.config["model"]["window_size"] == (None if window is None else [window - 1, 0])
    assert "--num-experts 4" in model_flags(reader.config["model"], reader.config["moe"])
    reshard(reader, str(tmp_path / "ours"), 2, 2, log=lambda s: None)  # through tp2 x pp2 files
    ours = load_model(str(tmp_path / "ours"), dtype=torch.float32, device=CPU)
    tokens = probe_tokens(VOCAB, 32, seed=3)
    with torch.no_grad():
        want = model(tokens).logits
    got = ours.logits(tokens)[..., :VOCAB]
    assert (got - want).abs().max().item() < 1e-4

    prompt = tokens[0, :5].tolist()
    out = generate(ours, prompt, 8, SamplingParams(temperature=0.0), use_cache=True)
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    assert out.tokens == ref[0, len(prompt) :].tolist() and len(out.tokens) == 8

    export_hf(
        ckpt.CheckpointReader(str(tmp_path / "ours")), str(tmp_path / "back"), log=lambda s: None
    )
    a = safetensors_torch.load_file(str(tmp_path / "orig/model.safetensors"))
    b = safetensors_torch.load_file(str(tmp_path / "back/model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ca, cb = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("orig", "back"))
    keys = [
        "model_type",
        "num_local_experts",
        "num_experts_per_tok",
        "intermediate_size",
        "sliding_window",
    ]
    assert {k: ca[k] for k in keys} == {k: cb[k] for k in keys}
    assert cb["architectures"] == ["MixtralForCausalLM"]


def test_what_mixtral_cannot_hold_is_refused_by_name():
    m = {
        "normalization": "RMSNorm",
        "position_embedding_type": "rope",
        "swiglu": True,
        "num_layers": 2,
        "add_bias_linear": False,
    }
    with pytest.raises(CheckpointError, match="--moe-shared-expert-intermediate-size"):
        rules_for(m, {"num_experts": 4, "moe_shared_expert_intermediate_size": 64})
    with pytest.raises(CheckpointError, match="--moe-layer-freq"):
        rules_for(m, {"num_experts": 4, "moe_layer_freq": [1, 0]})
