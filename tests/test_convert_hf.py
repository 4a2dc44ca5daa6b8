"""tools/checkpoint/convert.py: Hugging Face export/import and offline reshard of trained checkpoints.

Two checkpoints are trained by the real entry point at tp=2, pp=2 (GPT-2 flavour; Llama flavour with
GQA); `transformers` must load their exports and give the same logits. HF models created by
`transformers` itself must import and export back bit for bit. Resharding must keep logits and
optimizer state, and the result must resume training with `--load`.
"""

import dataclasses
import json
import shlex
import subprocess
import sys

import pytest
import torch
from factory import make_config
from launch_util import ROOT, TINY_GPT, layout_flags, load_tool, losses, run_pretrain

from megatron_lite import checkpointing as ckpt
from megatron_lite.arguments import parse_args
from megatron_lite.checkpointing.hf_export import export_hf
from megatron_lite.checkpointing.hf_reader import HFReader
from megatron_lite.checkpointing.hf_rules import config_from_hf, model_flags
from megatron_lite.checkpointing.reshard import probe_tokens, reshard
from megatron_lite.distributed.testing import run_distributed
from megatron_lite.inference.generation import load_model
from megatron_lite.parallel_state import ParallelState

transformers = pytest.importorskip("transformers")  # the `hf` extra (installed by `make test`)
safetensors_torch = pytest.importorskip("safetensors.torch")

LLAMA_FLAGS = (
    "--swiglu --normalization RMSNorm --position-embedding-type rope --disable-bias-linear "
    "--untie-embeddings-and-output-weights --group-query-attention --num-query-groups 2"
).split()
CPU = torch.device("cpu")  # compared with transformers on the CPU
VOCAB = 501  # NullTokenizer --vocab-size 500 + its end-of-document id


convert_tool = load_tool("checkpoint/convert.py")


def _train(save, extra):
    flags = [*TINY_GPT, *extra, *layout_flags(2, 2), "--train-iters", "4"]
    out = run_pretrain(4, [*flags, "--save", str(save), "--save-interval", "2"])
    return losses(out.stdout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{flavour: (checkpoint dir, {iteration: loss})}, trained 4 iterations at tp=2 pp=2."""
    d = tmp_path_factory.mktemp("trained")
    return {
        "gpt2": (d / "gpt2", _train(d / "gpt2", [])),
        "llama": (d / "llama", _train(d / "llama", LLAMA_FLAGS)),
    }


def our_logits(path, tokens, iteration=None):
    lm = load_model(str(path), dtype=torch.float32, iteration=iteration, device=CPU)
    return lm.logits(tokens)


def hf_logits(path, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(tokens).logits, model


@pytest.mark.slow
@pytest.mark.parametrize(
    "flavour,cls", [("gpt2", "GPT2LMHeadModel"), ("llama", "LlamaForCausalLM")]
)
def test_export_of_trained_tp2pp2_checkpoint_gives_transformers_the_same_logits(
    trained, tmp_path, flavour, cls
):
    src, _ = trained[flavour]
    out = tmp_path / "hf"
    assert convert_tool.main(["--saver", "hf", "--load-dir", str(src), "--save-dir", str(out)]) == 0
    assert ckpt.CheckpointReader(str(src)).layout["tp"] == 2
    tokens = probe_tokens(VOCAB, 32, n=3, seed=1)
    theirs, model = hf_logits(out, tokens)
    assert type(model).__name__ == cls
    assert theirs.shape[-1] == VOCAB  # padding rows dropped
    ours = our_logits(src, tokens)
    assert (theirs - ours).abs().max().item() < 1e-4
    assert ours.abs().max().item() > 0.1  # a trained model, not all zeros
    if flavour == "llama":
        assert model.config.num_key_value_heads == 2 and not model.config.tie_word_embeddings


def _random_hf_model(flavour, path):
    torch.manual_seed(7)
    if flavour == "gpt2":  # GPT-2's own gelu_new (tanh) activation: imported as --openai-gelu
        config = transformers.GPT2Config(
            n_layer=2,
            n_embd=32,
            n_head=4,
            vocab_size=97,
            n_positions=24,
            bos_token_id=96,
            eos_token_id=96,
        )
        model = transformers.GPT2LMHeadModel(config)
    else:  # qwen2 is a Llama with q/k/v biases only: imported as --add-qkv-bias
        qwen2 = flavour == "qwen2"
        config_class = transformers.Qwen2Config if qwen2 else transformers.LlamaConfig
        model_class = transformers.Qwen2ForCausalLM if qwen2 else transformers.LlamaForCausalLM
        config = config_class(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
            vocab_size=97,
            max_position_embeddings=24,
            rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        )
        model = model_class(config)
    with torch.no_grad():  # norms and biases away from their 1/0 init, so a mix-up shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(path))
    return model


@pytest.mark.parametrize("flavour", ["gpt2", "llama", "qwen2"])
def test_import_of_transformers_model_then_export_round_trips_exactly(tmp_path, flavour):
    model = _random_hf_model(flavour, tmp_path / "orig")
    reshard(HFReader(str(tmp_path / "orig")), str(tmp_path / "ours"), 2, 2, log=lambda s: None)
    reader = ckpt.CheckpointReader(str(tmp_path / "ours"))
    assert (reader.tp, reader.pp, reader.has_optimizer()) == (2, 2, False)
    tokens = probe_tokens(97, 24, seed=2)
    with torch.no_grad():
        expected = model.eval()(tokens).logits
    assert (our_logits(tmp_path / "ours", tokens) - expected).abs().max().item() < 1e-4

    export_hf(reader, str(tmp_path / "back"), log=lambda s: None)
    a = safetensors_torch.load_file(str(tmp_path / "orig/model.safetensors"))
    b = safetensors_torch.load_file(str(tmp_path / "back/model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    back, loaded = hf_logits(tmp_path / "back", tokens)  # the export loads as the same class
    assert type(loaded) is type(model) and torch.equal(back, expected)
    ca, cb = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("orig", "back"))
    keys = [
        "model_type",
        "vocab_size",
        "hidden_size",
        "n_embd",
        "num_key_value_heads",
        "eos_token_id",
    ]
    assert {k: ca.get(k) for k in keys} == {k: cb.get(k) for k in keys}
    if flavour == "gpt2":
        assert cb["n_inner"] == 4 * ca["n_embd"] and cb["activation_function"] == "gelu_new"
    else:
        assert cb["rope_parameters"]["rope_theta"] == 5000.0


@pytest.mark.parametrize("flavour", ["gpt2", "llama", "qwen2"])
def test_printed_flags_of_an_import_rebuild_the_same_model(tmp_path, flavour):
    _random_hf_model(flavour, tmp_path / "orig")
    imported = HFReader(str(tmp_path / "orig")).config["model"]
    flags = model_flags(imported)
    assert dataclasses.asdict(parse_args(shlex.split(flags)).model) == imported, flags
    if flavour == "qwen2":  # q/k/v biases without the other linears
        assert {"--add-qkv-bias", "--disable-bias-linear"} <= set(flags.split())
    elif flavour == "llama":  # derived settings are left out; bare flags for booleans
        assert "--swiglu" in flags.split() and "--ffn-hidden-size 48" in flags
        assert "--hidden-dropout 0.0" in flags and "--kv-channels" not in flags
    else:
        assert "--openai-gelu" in flags.split() and "--ffn-hidden-size" not in flags


@pytest.mark.parametrize(
    "hf,named",
    [
        ({"model_type": "qwen3"}, "Qwen3's q/k norm"),
        ({"model_type": "gemma2"}, "Gemma's soft-capping"),
        ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window"),
    ],
)
def test_hf_families_we_cannot_hold_are_refused_by_name(hf, named):
    with pytest.raises(ckpt.CheckpointError, match=named):
        config_from_hf(hf)


def _tp4_logits(path, tokens):
    import torch.distributed as dist

    ps = ParallelState.build(dist.get_world_size(), 1)
    return load_model(path, ps, dtype=torch.float32, device=CPU).logits(tokens)


@pytest.mark.slow
def test_reshard_tp2pp2_to_tp1pp1_to_tp4pp1_keeps_logits_and_optimizer_state(trained, tmp_path):
    src, _ = trained["gpt2"]
    tp1, tp4 = tmp_path / "tp1pp1", tmp_path / "tp4pp1"
    base = ["--load-dir", str(src), "--save-dir", str(tp1), "--iteration", "2"]
    assert convert_tool.main(base) == 0
    assert (
        convert_tool.main(
            ["--load-dir", str(tp1), "--save-dir", str(tp4), "--target-tensor-parallel-size", "4"]
        )
        == 0
    )
    assert sorted(p.name for p in (tp4 / "iter_0000002").iterdir()) == [
        f"mp_rank_{r:02d}" for r in range(4)
    ]
    tokens = probe_tokens(VOCAB, 32, seed=3)
    reference = our_logits(src, tokens, iteration=2)
    assert (our_logits(tp1, tokens) - reference).abs().max().item() < 1e-5
    got = run_distributed(_tp4_logits, 4, str(tp4), tokens, timeout=120)
    for logits in got:  # run at tp = 4 from the tp = 4 files
        assert (logits - reference).abs().max().item() < 1e-5

    source = dict(ckpt.iter_full_state(str(src), 2, optimizer=True))
    for name, states in ckpt.iter_full_state(str(tp4), optimizer=True):
        assert set(states) == set(source[name]) and states, name
        for k, t in states.items():
            full = source[name][k]
            assert torch.equal(t[: full.shape[0]], full[: t.shape[0]]), (name, k)


@pytest.mark.slow
def test_resharded_checkpoint_resumes_training_with_load(trained, tmp_path):
    src, reference = trained["gpt2"]
    dst = tmp_path / "tp1"
    assert (
        convert_tool.main(["--load-dir", str(src), "--save-dir", str(dst), "--iteration", "2"]) == 0
    )
    out = run_pretrain(
        1, [*TINY_GPT, *layout_flags(1, 1), "--train-iters", "4", "--load", str(dst)]
    )
    assert "loaded checkpoint" in out.stdout
    resumed = losses(out.stdout)
    assert sorted(resumed) == [3, 4]
    for it in resumed:  # optimizer state and LR schedule came along: the same next losses
        assert resumed[it] == pytest.approx(reference[it], rel=5e-5), (it, resumed, reference)


@pytest.mark.slow
def test_check_mode_exits_nonzero_when_logits_differ_beyond_tolerance(trained, tmp_path):
    src, _ = trained["llama"]
    args = ["--load-dir", str(src), "--saver", "hf", "--dtype", "bf16", "--check"]
    script = str(ROOT / "tools/checkpoint/convert.py")
    cmd = [sys.executable, script, *args, "--save-dir", str(tmp_path / "a")]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "check passed" in ok.stdout  # bf16 rounding is within the bf16 default tolerance
    strict = [*args, "--save-dir", str(tmp_path / "b"), "--check-tolerance", "1e-6"]
    assert convert_tool.main(strict) == 1


@pytest.mark.slow
def test_impossible_target_layout_is_refused_with_the_reason(trained, tmp_path, capsys):
    src, _ = trained["llama"]  # 2 query groups cannot be split over 4 tp ranks
    args = ["--load-dir", str(src), "--save-dir", str(tmp_path / "x")]
    assert convert_tool.main([*args, "--target-tensor-parallel-size", "4"]) == 2
    assert "--num-query-groups (2) must be divisible by --tensor-model-parallel-size (4)" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "x" / "latest_checkpointed_iteration.txt").exists()


def _export_a_tiny_model_tokenized_by(data, vocab_size: int, tmp_path) -> dict:
    """Save a 1-layer model whose config names the tokenizer `data`, export it to tmp_path/hf;
    returns the exported config.json."""
    from megatron_lite.model import build_model_chunks

    cfg = make_config(1, num_layers=1, hidden_size=16, num_attention_heads=2, data=data)
    ps = ParallelState.single()
    chunks = build_model_chunks(cfg, ps, cfg.padded_vocab_size(vocab_size))
    ckpt.save_checkpoint(
        str(tmp_path / "ck"), 1, chunks, None, None, cfg, ps, 0, vocab_size=vocab_size
    )
    export_hf(ckpt.CheckpointReader(str(tmp_path / "ck")), str(tmp_path / "hf"), log=lambda s: None)
    return json.loads((tmp_path / "hf/config.json").read_text())


def test_export_copies_the_gpt2_tokenizer_that_transformers_then_reads_alike(tmp_path):
    from megatron_lite.config import DataConfig
    from megatron_lite.data.tokenizer import GPT2BPETokenizer, bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("e", "n")]
    vocab = {s: i for i, s in enumerate(symbols + [a + b for a, b in merges] + ["<|endoftext|>"])}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    )
    data = DataConfig(
        tokenizer_type="GPT2BPETokenizer",
        vocab_file=str(tmp_path / "vocab.json"),
        merge_file=str(tmp_path / "merges.txt"),
    )
    tok = GPT2BPETokenizer(data.vocab_file, data.merge_file)
    config = _export_a_tiny_model_tokenized_by(data, tok.vocab_size, tmp_path)
    assert (tmp_path / "hf/merges.txt").read_text() == (tmp_path / "merges.txt").read_text()
    assert config["eos_token_id"] == tok.eod and config["vocab_size"] == tok.vocab_size
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "then the hen, then 42 ten!"
    assert theirs.encode(text) == tok.tokenize(text)
    assert len(tok.tokenize(text)) < len(text.encode())  # the merges did apply


def test_export_and_generation_carry_a_huggingface_tokenizer_directory(tmp_path):
    """A run tokenized with --tokenizer-type HuggingFaceTokenizer (a tokenizer.json directory, as
    Llama 3 ships): the export copies its files, and generation from the export finds it."""
    from megatron_lite.config import DataConfig
    from megatron_lite.data.tokenizer import HuggingFaceTokenizer, bytes_to_unicode
    from megatron_lite.inference.generation import build_generation_tokenizer, load_model

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + ["he", "<|endoftext|>"])}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nh e\n")
    hf_tok = tmp_path / "tok"
    transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path)).save_pretrained(str(hf_tok))
    data = DataConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(hf_tok))
    tok = HuggingFaceTokenizer(data.tokenizer_model)
    config = _export_a_tiny_model_tokenized_by(data, tok.vocab_size, tmp_path)
    assert (tmp_path / "hf/tokenizer.json").read_text() == (hf_tok / "tokenizer.json").read_text()
    assert config["eos_token_id"] == tok.eod
    for name in ("vocab.json", "merges.txt"):  # only tokenizer.json describes it now
        (tmp_path / "hf" / name).unlink(missing_ok=True)
    found = build_generation_tokenizer(load_model(str(tmp_path / "hf")))
    assert isinstance(found, HuggingFaceTokenizer)
    assert found.tokenize("the hen") == tok.tokenize("the hen") and found.eod == tok.eod
