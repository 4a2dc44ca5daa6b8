"""Long-context model features: RoPE scaling (linear, Llama 3, YaRN), --rotary-percent and
sliding-window attention (--window-size), through the model, training, generation and HF conversion.

- Our inverse frequencies and attention factors equal transformers' for every scheme.
- Every attention backend (fused kernel, SDPA, unfused) gives the windowed softmax of a mask built
  by hand, values and gradients, alone and on top of an explicit (reset-attention-mask) mask.
- Tiny random HF Llama models with rope_type llama3 / linear / yarn and a Mistral with a sliding
  window import through tools/checkpoint/convert.py with logits equal to transformers' at a length
  past the original context and the window (where the scaling and the window change the logits),
  export back to the same tensors, and print flags that rebuild the same model.
- Training through the real entry point with a window and YaRN at tp2 (with sequence parallelism)
  and at pp2 (fused kernel) gives the single-process losses step by step, with the default
  --make-vocab-size-divisible-by.
- Generation with the KV cache past the window equals full recomputation and transformers' own
  sliding-window greedy decoding; left-padded batches equal one prompt at a time.
- Bad values are refused with one line naming the flag.
"""

import argparse
import dataclasses
import json
import shlex

import pytest
import torch
from factory import tiny_config
from launch_util import TINY_GPT, layout_flags, load_tool, losses, run_pretrain

from megatron_lite.arguments import parse_args
from megatron_lite.checkpointing import CheckpointError, CheckpointReader
from megatron_lite.checkpointing.hf_reader import HFReader
from megatron_lite.checkpointing.hf_rules import config_from_hf, hf_config, model_flags
from megatron_lite.config import Config, ConfigError, ModelConfig
from megatron_lite.inference.generation import SamplingParams, generate, generate_batch, load_model
from megatron_lite.model import rope
from megatron_lite.model.transformer import CoreAttention

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

CPU = torch.device("cpu")
VOCAB, SEQ, ORIGINAL, WINDOW = 97, 48, 32, 8  # SEQ past both the original context and the window
HF_DIMS = dict(
    num_hidden_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=48,
    vocab_size=VOCAB,
    max_position_embeddings=64,
)
ROPES = {
    "llama3": {  # head_dim 16: one pair kept, one blended, the rest divided by the factor
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": ORIGINAL,
    },
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": ORIGINAL,
    },
    "yarn-mscale": {  # DeepSeek's attention factor: the ratio of two mscales
        "rope_type": "yarn",
        "rope_theta": 20000.0,
        "factor": 8.0,
        "original_max_position_embeddings": ORIGINAL,
        "beta_fast": 16.0,
        "beta_slow": 2.0,
        "mscale": 0.9,
        "mscale_all_dim": 0.4,
    },
}
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
UNSCALED = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 1.0}  # HF's default + partial


convert_tool = load_tool("checkpoint/convert.py")


def _hf_model(rope_parameters: dict, window: int | None = None, state: dict | None = None):
    """A random HF Llama (Mistral with `window`), or one with the weights `state`."""
    torch.manual_seed(5)
    if window is None:
        config = transformers.LlamaConfig(rope_parameters=rope_parameters, **HF_DIMS)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.MistralConfig(
            sliding_window=window, rope_parameters=rope_parameters, **HF_DIMS
        )
        model = transformers.MistralForCausalLM(config)
    with torch.no_grad():
        if state is not None:
            model.load_state_dict(state)
        else:  # norms away from 1, so a mix-up shows
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def _tokens(n=2, s=SEQ, seed=1):
    return torch.randint(0, VOCAB, (n, s), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------
# The rope math against transformers' own


def _as_hf_config(rope_parameters: dict, partial: float = 1.0):
    return transformers.LlamaConfig(
        rope_parameters={**rope_parameters, "partial_rotary_factor": partial}, **HF_DIMS
    )


@pytest.mark.parametrize("name", list(ROPES))
def test_inverse_frequencies_and_attention_factor_equal_transformers(name):
    hf = _as_hf_config(ROPES[name])
    want_freq, want_factor = ROPE_INIT_FUNCTIONS[ROPES[name]["rope_type"]](hf, CPU)
    imported = config_from_hf({**hf.to_dict(), "model_type": "llama"})["model"]
    ours, factor = rope.inv_frequencies(ModelConfig(**imported))
    torch.testing.assert_close(ours, want_freq, rtol=1e-6, atol=0)
    assert factor == pytest.approx(want_factor, rel=1e-9)
    default_freq, _ = ROPE_INIT_FUNCTIONS["linear"](_as_hf_config(UNSCALED), CPU)
    assert (ours - default_freq).abs().max() > 1e-3  # the scheme changed the frequencies


def test_rotary_percent_rotates_only_its_channels_with_hf_partial_frequencies():
    m = ModelConfig(hidden_size=64, num_attention_heads=4, position_embedding_type="rope")
    half = dataclasses.replace(m, rotary_percent=0.5)
    want, _ = ROPE_INIT_FUNCTIONS["linear"](_as_hf_config(UNSCALED, partial=0.5), CPU)
    torch.testing.assert_close(rope.inv_frequencies(half)[0], want)
    x = torch.randn(10, 2, 4, 16)
    cos, sin = rope.rotary_cos_sin(10, half, CPU)
    y = rope.apply_rotary(x, cos, sin)
    assert torch.equal(y[..., 8:], x[..., 8:]) and not torch.allclose(y[..., :8], x[..., :8])
    full = rope.apply_rotary(x, *rope.rotary_cos_sin(10, m, CPU))
    torch.testing.assert_close(full.norm(dim=-1), x.norm(dim=-1))  # a rotation keeps the norm


# ---------------------------------------------------------------------------------------------------
# Sliding window in every attention backend


def _reference_attention(q, k, v, left, extra_mask=None):
    """softmax(q k^T / sqrt(d)) v with query i seeing keys i-left .. i, from explicit loops."""
    s = q.shape[2]
    allowed = torch.zeros(s, s, dtype=torch.bool)
    for i in range(s):
        for j in range(s):
            allowed[i, j] = 0 <= i - j <= left
    masked = ~allowed if extra_mask is None else ~allowed | extra_mask
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return torch.softmax(scores.masked_fill(masked, float("-inf")), -1) @ v


@pytest.mark.parametrize("backend", ["fused", "sdpa", "unfused"])
def test_every_attention_backend_applies_the_window_to_values_and_gradients(backend):
    from megatron_lite import _extensions

    if backend == "fused":  # the kernel itself must run, not the torch fallback
        assert _extensions.load("_fused_kernels") is not None
    m = dict(seq_length=24, window_size=[5, 0], attention_backend=backend, attention_dropout=0.0)
    core = CoreAttention(tiny_config(**m))
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, 24, 8, generator=g) for _ in range(3))
    doc = torch.arange(24) >= 10  # two documents (reset-attention-mask)
    explicit = (doc[:, None] != doc[None, :]) | torch.ones(24, 24, dtype=torch.bool).triu(1)
    for mask in (None, explicit[None, None]):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = core(*leaves, mask)
        ref = _reference_attention(*ref_leaves, 5, None if mask is None else explicit)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        grad = torch.randn(out.shape, generator=g)
        out.backward(grad)
        ref.backward(grad)
        for a, b in zip(leaves, ref_leaves):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    causal = _reference_attention(q, k, v, left=24)
    assert (core(q, k, v, None) - causal).abs().max() > 1e-2  # the window changed the output


# ---------------------------------------------------------------------------------------------------
# HF import / export


def _import_export(tmp_path, hf_model):
    """HF dir -> convert.py --loader hf (tp2) -> convert.py --saver hf: (ours dir, back dir)."""
    orig, ours, back = (str(tmp_path / d) for d in ("orig", "ours", "back"))
    hf_model.save_pretrained(orig)
    argv = ["--loader", "hf", "--load-dir", orig, "--save-dir", ours]
    assert convert_tool.main([*argv, "--target-tensor-parallel-size", "2"]) == 0
    assert CheckpointReader(ours).tp == 2
    assert convert_tool.main(["--saver", "hf", "--load-dir", ours, "--save-dir", back]) == 0
    return orig, ours, back


def _check_round_trip(orig, ours, back, model, tokens):
    expected = _logits(model, tokens)
    lm = load_model(ours, dtype=torch.float32, device=CPU)
    assert (lm.logits(tokens) - expected).abs().max().item() < 1e-4
    a = safetensors_torch.load_file(f"{orig}/model.safetensors")
    b = safetensors_torch.load_file(f"{back}/model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)
    again = transformers.AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).eval()
    assert type(again) is type(model)
    assert (_logits(again, tokens) - expected).abs().max().item() < 1e-5
    imported = HFReader(orig).config["model"]
    flags = model_flags(imported)
    assert dataclasses.asdict(parse_args(shlex.split(flags)).model) == imported, flags
    return expected, json.loads(open(f"{back}/config.json").read()), flags


@pytest.mark.parametrize("name", list(ROPES))
def test_llama_with_rope_scaling_imports_with_transformers_logits_and_exports_back(tmp_path, name):
    model = _hf_model(ROPES[name])
    tokens = _tokens()
    expected, back_config, flags = _check_round_trip(
        *_import_export(tmp_path, model), model, tokens
    )
    unscaled = _hf_model(DEFAULT_ROPE, state=model.state_dict())
    assert (_logits(unscaled, tokens) - expected).abs().max().item() > 1e-2  # scaling matters
    p = back_config["rope_parameters"]
    assert p["rope_type"] == ROPES[name]["rope_type"] and p["factor"] == ROPES[name]["factor"]
    want_flag = {"llama3": "--use-rope-scaling", "linear": "--rotary-seq-len-interpolation"}
    assert want_flag.get(name, "--rope-type yarn") in flags


def test_mistral_sliding_window_imports_with_transformers_logits_and_exports_as_mistral(tmp_path):
    model = _hf_model(ROPES["yarn"], window=WINDOW)
    tokens = _tokens()
    expected, back_config, flags = _check_round_trip(
        *_import_export(tmp_path, model), model, tokens
    )
    assert back_config["sliding_window"] == WINDOW and back_config["model_type"] == "mistral"
    assert f"--window-size {WINDOW - 1},0" in flags  # HF's W keys include the query's own
    full = _hf_model(ROPES["yarn"], window=None, state=model.state_dict())
    assert (_logits(full, tokens) - expected).abs().max().item() > 1e-2  # the window matters


# ---------------------------------------------------------------------------------------------------
# Generation with the KV cache


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """(HF Mistral with a window of WINDOW keys, our model loaded from its directory)."""
    path = str(tmp_path_factory.mktemp("mistral"))
    model = _hf_model(DEFAULT_ROPE, window=WINDOW)
    model.save_pretrained(path)
    return model, load_model(path, dtype=torch.float32, device=CPU)


def test_cached_generation_past_the_window_equals_recompute_and_transformers(windowed):
    model, lm = windowed
    prompt, n = [5, 17, 42, 8, 3, 60, 11], 30  # 37 tokens: the window slides 29 times
    greedy = SamplingParams(temperature=0)
    cached = generate(lm, prompt, n, greedy, return_logits=True)
    full = generate(lm, prompt, n, greedy, use_cache=False, return_logits=True)
    assert cached.tokens == full.tokens and len(cached.tokens) == n
    diff = max((a - b).abs().max().item() for a, b in zip(cached.step_logits, full.step_logits))
    assert diff < 1e-5
    with torch.no_grad():
        theirs = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n
        )
    assert theirs[0, len(prompt) :].tolist() == cached.tokens


def test_left_padded_batch_with_a_window_equals_one_prompt_at_a_time(windowed):
    _, lm = windowed
    prompts = [[3, 9], [5, 17, 42, 8, 3, 60, 11, 70, 2, 33, 4, 19], [7, 7, 1, 90, 64]]
    for params, seeds in ((SamplingParams(temperature=0), [0, 0, 0]), (None, [3, 4, 5])):
        params = params or SamplingParams(temperature=0.9, top_k=30)
        batch = generate_batch(lm, prompts, 14, params, seeds=seeds)
        alone = [generate(lm, p, 14, params, seed=s).tokens for p, s in zip(prompts, seeds)]
        assert [o.tokens for o in batch] == alone


# ---------------------------------------------------------------------------------------------------
# Training: tp2 (sequence parallel) equals one process


LONG_FLAGS = [
    *TINY_GPT,
    *"--swiglu --normalization RMSNorm --position-embedding-type rope --disable-bias-linear "
    "--untie-embeddings-and-output-weights --group-query-attention --num-query-groups 2 "
    "--window-size 7,0 --rope-type yarn --rotary-scaling-factor 4 "
    "--original-max-position-embeddings 16 --rotary-percent 0.5 --train-iters 6".split(),
]


@pytest.mark.slow
def test_windowed_yarn_training_at_tp2_and_pp2_matches_single_process_losses():
    """tp2 with sequence parallelism (SDPA, as the reference), and pp2 on the fused kernel."""
    ref = losses(run_pretrain(1, [*LONG_FLAGS, *layout_flags(1, 1)]).stdout)
    assert sorted(ref) == list(range(1, 7)) and ref[6] < ref[1]
    for nproc, extra in (
        (2, [*layout_flags(2, 1), "--sequence-parallel"]),
        (2, [*layout_flags(1, 2), "--attention-backend", "fused"]),
    ):
        out = run_pretrain(nproc, [*LONG_FLAGS, *extra]).stdout
        got = losses(out)
        assert sorted(got) == sorted(ref), out[-3000:]
        for it, want in ref.items():
            assert got[it] == pytest.approx(want, rel=1e-5), (extra, it, got[it], want)


# ---------------------------------------------------------------------------------------------------
# Refusals


ROPE_MODEL = dict(position_embedding_type="rope")


@pytest.mark.parametrize(
    "settings,words",
    [
        (dict(window_size=[4, 2]), "--window-size 4,2"),
        (dict(window_size=[-3, 0]), "left must be >= 0"),
        (dict(window_size="7"), "'left,right'"),
        (dict(use_rope_scaling=True, rope_type="yarn", **ROPE_MODEL), "choose one RoPE scaling"),
        (dict(use_rope_scaling=True), "needs --position-embedding-type rope"),
        (dict(rotary_scaling_factor=4.0, **ROPE_MODEL), "--rotary-scaling-factor (4.0)"),
        (dict(rope_type="yarn", beta_fast=1.0, **ROPE_MODEL), "--beta-fast (1.0)"),
        (dict(rotary_percent=0.1, **ROPE_MODEL), "--rotary-percent (0.1)"),
        (dict(use_rope_scaling=True, low_freq_factor=5.0, **ROPE_MODEL), "--low-freq-factor"),
    ],
)
def test_bad_long_context_settings_are_refused_naming_the_flag(settings, words):
    with pytest.raises(ConfigError) as e:
        ModelConfig(hidden_size=32, num_attention_heads=4, **settings)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_bad_window_flag_exits_with_its_message(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--window-size", "4096"])
    assert "--window-size takes 'left,right'" in capsys.readouterr().err


def test_unsupported_hf_settings_and_exports_are_refused_with_the_reason():
    base = {**_as_hf_config(DEFAULT_ROPE).to_dict(), "model_type": "llama"}
    for hf, words in (
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic'"),
        ({"rope_parameters": {**DEFAULT_ROPE, "partial_rotary_factor": 0.5}}, "partial_rotary"),
        (
            {
                "model_type": "mistral",
                "sliding_window": 8,
                "layer_types": ["sliding_attention", "full_attention"],
            },
            "layer_types",
        ),  # fmt: skip
        ({"model_type": "phi3"}, "'mixtral' and 'qwen2' can be imported"),
    ):
        with pytest.raises(CheckpointError, match=words):
            config_from_hf({**base, **hf})
    llama = dict(
        hidden_size=32,
        num_attention_heads=4,
        swiglu=True,
        normalization="RMSNorm",
        position_embedding_type="rope",
    )
    for model, words in (
        (dict(llama, rotary_percent=0.5), "--rotary-percent 0.5"),
        (dict(llama, window_size=[7, 0]), "--disable-bias-linear"),
        (dict(hidden_size=32, num_attention_heads=4, window_size=[7, 0]), "GPT-2 format"),
    ):
        cfg = Config(model=ModelConfig(**model)).to_dict()
        with pytest.raises(CheckpointError, match=words):
            hf_config(cfg, VOCAB, torch.float32)


def test_megatron_lm_checkpoint_args_carry_rope_scaling_and_the_window():
    from megatron_lite.checkpointing.megatron import config_from_args

    args = argparse.Namespace(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        position_embedding_type="rope",
        rotary_base=500000,
        use_rope_scaling=True,
        rope_scaling_factor=16.0,
        window_size=(4095, 0),  # Megatron's tuple_type
    )
    m = config_from_args(args)["model"]
    assert (m["rotary_base"], m["use_rope_scaling"], m["rope_scaling_factor"]) == (
        500000,
        True,
        16.0,
    )
    assert m["window_size"] == [4095, 0] and ModelConfig(**m).window_left == 4095
