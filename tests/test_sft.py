"""Supervised fine-tuning: chat templates and their assistant masks, the preprocessing tool, the
loss (only assistant tokens, packed = unpacked), layouts = one process, and a fine-tuned tiny model
that answers a synthetic instruction task the base model cannot."""

import os
import types

import numpy as np
import pytest
import torch
from data_util import train_gpt2_tokenizer, write_documents
from factory import NO_DROPOUT, tiny_config
from sft_util import (
    TINY,
    VOCAB,
    addition_task,
    losses,
    preprocess,
    reverse_task,
    train,
    write_records,
)

from megatron_lite.data.chat import ChatFormat
from megatron_lite.data.sft_dataset import MaskedDataset, SFTDataset, packed_sample
from megatron_lite.data.tokenizer import NullTokenizer, build_tokenizer
from megatron_lite.distributed.testing import run_distributed
from megatron_lite.inference.generation import generate, load_model
from megatron_lite.model import build_model_chunks
from megatron_lite.parallel_state import ParallelState
from megatron_lite.training.step import forward_step

EOD = VOCAB
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "The quick fox?"},
    {"role": "assistant", "content": "The lazy dog."},
    {"role": "user", "content": "And?"},
    {"role": "assistant", "content": "numbers 0 1"},
]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_GENERATION = CHATML.replace(
    "{{ m['content'] }}<|im_end|>",
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>"
    "{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}",
)


def masked_text(tok, ids, mask) -> str:
    return tok.detokenize([i for i, m in zip(ids, mask) if m])


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Our GPT-2 BPE tokenizer and the same vocabulary as a HuggingFace one with ChatML tokens."""
    from transformers import GPT2TokenizerFast

    d = tmp_path_factory.mktemp("tok")
    vocab, merges = train_gpt2_tokenizer(str(d), vocab_size=400)
    hf = GPT2TokenizerFast.from_pretrained(str(d))
    hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    hf.chat_template = CHATML
    hf.save_pretrained(str(d / "hf"))
    ns = types.SimpleNamespace
    gpt2 = build_tokenizer(
        ns(tokenizer_type="GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    )
    hf_tok = build_tokenizer(
        ns(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(d / "hf"))
    )
    return gpt2, hf_tok


def test_builtin_template_masks_assistant_tokens_and_their_end(tokenizers):
    gpt2, _ = tokenizers
    fmt = ChatFormat.for_tokenizer(gpt2)
    ids, mask = fmt.encode(CHAT)
    assert fmt.name == "chatml" and fmt.stop_token_ids == [gpt2.eod]
    assert masked_text(gpt2, ids, mask) == "The lazy dog.<|endoftext|>numbers 0 1<|endoftext|>"
    assert [i for i, m in zip(ids, mask) if m].count(gpt2.eod) == 2  # the end token, as an id
    prompt, prompt_mask = fmt.encode(CHAT[:2], add_generation_prompt=True)
    assert ids[: len(prompt)] == prompt and not any(prompt_mask)
    assert fmt.render(CHAT[:2], True).endswith("<|im_start|>user\nThe quick fox?<|endoftext|>"
                                               "<|im_start|>assistant\n")  # fmt: skip
    null = ChatFormat.for_tokenizer(NullTokenizer(VOCAB))  # plain: ids, turns end with eod
    chat = [{"role": "user", "content": "1 2 3"}, {"role": "assistant", "content": "3 2 1"}]
    assert null.encode(chat) == ([1, 2, 3, EOD, 3, 2, 1, EOD], [0, 0, 0, 0, 1, 1, 1, 1])
    assert null.render(chat[:1], True) == f"1 2 3 {EOD}"


@pytest.mark.parametrize("template", [None, CHATML_GENERATION], ids=["prefixes", "generation"])
def test_hf_chat_template_masks_assistant_turns(tokenizers, template):
    """The tokenizer's own template through apply_chat_template: the mask from rendered prefixes
    (cut after <|im_end|>) or from {% generation %} blocks is the assistant text and its end."""
    _, hf = tokenizers
    fmt = ChatFormat.for_tokenizer(hf, template)
    im_end = hf.hf.convert_tokens_to_ids("<|im_end|>")
    assert fmt.name == "huggingface" and im_end in fmt.stop_token_ids
    ids, mask = fmt.encode(CHAT)
    rendered = hf.hf.apply_chat_template(CHAT, chat_template=template, return_dict=True)
    assert ids == list(rendered["input_ids"])
    assert masked_text(hf, ids, mask) == "The lazy dog.<|im_end|>numbers 0 1<|im_end|>"
    assert fmt.render(CHAT[:2], True).endswith("<|im_start|>assistant\n")
    prompt = fmt.prompt_ids(CHAT[:2])
    assert prompt == fmt.encode(CHAT[:2], add_generation_prompt=True)[0] == ids[: len(prompt)]
    first, first_mask = fmt.encode(CHAT[2:3])  # an assistant turn first: only it is masked
    assert masked_text(hf, first, first_mask) == "The lazy dog.<|im_end|>"


def test_preprocess_tool_applies_the_hf_tokenizers_own_template(tokenizers, tmp_path):
    import preprocess_sft_data  # tools/ (on the path through data_util)

    _, hf = tokenizers
    jsonl = write_records(tmp_path / "c.jsonl", [{"messages": CHAT}])
    flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf.hf.name_or_path]
    assert (
        preprocess_sft_data.main(["--input", jsonl, "--output-prefix", str(tmp_path / "c"), *flags])
        == 0
    )
    ((ids, mask),) = MaskedDataset(str(tmp_path / "c_sft_document"))[0]
    assert (ids.tolist(), mask.tolist()) == ChatFormat.for_tokenizer(hf).encode(CHAT)


def test_preprocess_tool_writes_tokens_and_masks_and_names_bad_lines(tmp_path, capsys):
    import preprocess_sft_data  # tools/ (on the path through data_util)

    records = [
        {"prompt": "1 2", "response": "2 1"},
        {"messages": [{"role": "user", "content": "5"}, {"role": "assistant", "content": "6 7"}]},
    ]
    prefix = preprocess(write_records(tmp_path / "ok.jsonl", records), str(tmp_path / "ok"))
    ds = MaskedDataset(prefix)
    assert len(ds) == 2
    (ids, mask), = ds[1]  # fmt: skip
    assert ids.tolist() == [5, EOD, 6, 7, EOD] and mask.tolist() == [0, 0, 1, 1, 1]
    bad = [
        ('{"prompt": "1"}', "expected 'messages', or 'prompt' and 'response'"),
        ('{"messages": [{"role": "user", "content": "1"}]}', "no assistant message"),
        ('{"messages": [{"role": "robot", "content": "1"}]}', "role 'robot'"),
        ('{"prompt": "1", "response": 2}', "'response' must be a string"),
        ('{"prompt": "1", ', "malformed JSON"),
    ]
    for line, why in bad:  # the tool's main in this process: a subprocess each costs seconds
        path = tmp_path / "bad.jsonl"
        path.write_text('{"prompt": "1", "response": "2"}\n\n' + line + "\n")
        rc = preprocess_sft_data.main(
            ["--input", str(path), "--output-prefix", str(tmp_path / "bad")]
            + ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB)]
        )
        err = capsys.readouterr().err
        assert rc == 1 and f"error: {path}:3: " in err and why in err, err
        assert not any(f.startswith("bad_") for f in os.listdir(tmp_path))  # nothing written


FLAVOURS = {
    "learned": dict(hidden_size=32, num_attention_heads=4),
    "rope": dict(hidden_size=32, num_attention_heads=4, position_embedding_type="rope"),
}


def tiny_model(flavour: str):
    cfg = tiny_config(seq_length=32, **NO_DROPOUT, max_position_embeddings=32, seed=3,
                      **FLAVOURS[flavour])  # fmt: skip
    torch.manual_seed(0)
    return build_model_chunks(cfg, ParallelState.single(), cfg.padded_vocab_size(VOCAB + 1))[0]


def sft_loss(model, rows: list[dict]) -> torch.Tensor:
    """The training step's loss (forward_step's loss function) of one microbatch of rows."""
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    with torch.no_grad():
        output, loss_func = forward_step(iter([batch]), model)
        return loss_func(output)[0]


def conversation(prompt: list[int], response: list[int], *later_prompt: int):
    ids = [*prompt, EOD, *response, EOD, *later_prompt]
    mask = [0] * (len(prompt) + 1) + [1] * (len(response) + 1) + [0] * len(later_prompt)
    return np.array(ids), np.array(mask)


CONVS = [
    conversation([11, 12, 13], [13, 12, 11]),
    conversation([20, 21], [21, 20, 22, 23], 30, 31, 32),  # a last user turn, after the answer
    conversation([14, 15, 16, 17], [17, 16]),
]


def test_only_assistant_tokens_count_in_the_sft_loss():
    """The loss is the mean over assistant labels; prompt labels, a user turn after the last
    answer and another packed conversation's prompt do not change it; an answer token does."""
    model = tiny_model("learned")
    row = packed_sample(CONVS, 32, EOD)
    loss = sft_loss(model, [row])
    per_token = model(row["tokens"][None], row["position_ids"][None],
                      row["attention_mask"][None], labels=row["labels"][None])[0]  # fmt: skip
    m = row["loss_mask"]
    assert m.sum() == 4 + 5 + 3
    assert torch.allclose(loss, (per_token * m).sum() / m.sum())
    assert not torch.allclose(loss, per_token.mean())
    relabelled = dict(row, labels=torch.where(m > 0, row["labels"], (row["labels"] + 7) % VOCAB))
    assert torch.equal(sft_loss(model, [relabelled]), loss)
    later = [CONVS[0], conversation([20, 21], [21, 20, 22, 23], 40, 41, 42), CONVS[2]]
    assert torch.equal(sft_loss(model, [packed_sample(later, 32, EOD)]), loss)
    other = [conversation([31, 32, 33], [13, 12, 11]), *CONVS[1:]]  # first conversation's prompt
    changed = sft_loss(model, [packed_sample(other, 32, EOD)])
    assert not torch.allclose(changed, loss)  # its own answer's loss moves...
    got = model(*(packed_sample(other, 32, EOD)[k][None] for k in ("tokens", "position_ids",
                "attention_mask")), labels=row["labels"][None])[0]  # fmt: skip
    assert torch.allclose(got[8:], per_token[8:], atol=1e-6)  # ...the other conversations' not
    answer = dict(row, labels=row["labels"].clone())
    answer["labels"][int(torch.nonzero(m)[0])] += 1
    assert not torch.allclose(sft_loss(model, [answer]), loss)


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_packed_and_unpacked_batches_give_the_same_loss(flavour):
    """Three conversations in one row (positions and attention reset per conversation) = each
    in its own padded row; without the reset the packed loss differs."""
    model = tiny_model(flavour)
    packed = packed_sample(CONVS, 32, EOD)
    unpacked = [packed_sample([c], 32, EOD) for c in CONVS]
    assert packed["position_ids"][:12].tolist() == list(range(8)) + list(range(4))
    want = sft_loss(model, unpacked)
    assert sft_loss(model, [packed]) == pytest.approx(float(want), abs=1e-6)
    leaky = dict(packed, position_ids=torch.arange(32), attention_mask=torch.triu(
        torch.ones(1, 32, 32, dtype=torch.bool), 1))  # fmt: skip
    assert sft_loss(model, [leaky]) != pytest.approx(float(want), abs=1e-4)


def test_sft_dataset_packs_whole_conversations(tmp_path):
    prefix = preprocess(
        write_records(tmp_path / "t.jsonl", reverse_task(50, 1)), str(tmp_path / "t")
    )
    ds = SFTDataset(MaskedDataset(prefix), np.arange(50), 30, "train", seq_length=32, seed=1,
                    tokenizer=NullTokenizer(VOCAB))  # fmt: skip
    assert len(ds) >= 30  # two epochs, each shuffled and packed on its own
    rows = [ds.conversations(i) for i in range(len(ds))]
    assert all(sum(len(t) for t, _ in r) <= 33 for r in rows)
    assert sorted(len(r) for r in rows[: len(rows) // 2])[-1] == 4  # 4 x 8 tokens in 33
    item = ds[0]
    assert item["loss_mask"].sum() == 4 * len(rows[0])


LAYOUT_ITERS = 4


def layout_losses(tmp_path, nproc: int, extra: list[str]) -> dict[int, float]:
    data = tmp_path / "layout_sft_document"
    if not os.path.exists(f"{data}.bin"):
        preprocess(
            write_records(tmp_path / "layout.jsonl", reverse_task(300, 2)), str(tmp_path / "layout")
        )
    flags = [*TINY, "--sft", "--data-path", str(data), "--train-iters", str(LAYOUT_ITERS), *extra]
    log = run_distributed(train, nproc, flags, timeout=120)[-1]
    got = losses(log)
    assert sorted(got) == list(range(1, LAYOUT_ITERS + 1)), log[-2000:]
    return got


def test_layouts_match_single_process_sft_loss(tmp_path):
    """tp2 x pp2 x dp2, and tp2 x dp2 with ZeRO-1 and sequence parallelism, at default flags."""
    ref = layout_losses(tmp_path, 1, [])
    assert ref[LAYOUT_ITERS] < ref[1]
    for nproc, extra in [
        (8, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
        (4, ["--tensor-model-parallel-size", "2", "--use-distributed-optimizer", "--sequence-parallel"]),
    ]:  # fmt: skip
        got = layout_losses(tmp_path, nproc, extra)
        for it in ref:
            assert got[it] == pytest.approx(ref[it], rel=1e-5), (extra, it, got[it], ref[it])


def accuracy(path: str, tasks: list[dict]) -> float:
    """Greedy answers of the checkpoint at `path` to `tasks`, exact-match accuracy."""
    lm = load_model(path, dtype=torch.float32, device=torch.device("cpu"))
    fmt = ChatFormat.for_tokenizer(NullTokenizer(VOCAB))
    right = 0
    for t in tasks:
        prompt, _ = fmt.encode(
            [{"role": "user", "content": t["prompt"]}], add_generation_prompt=True
        )
        out = generate(lm, prompt, 4, eod=EOD).tokens
        right += out == [*map(int, t["response"].split()), EOD]
    return right / len(tasks)


def pretrain_and_finetune(tmp_path) -> tuple[str, str]:
    """A base model pretrained on letter text, and the same fine-tuned (--sft) on 'what is A+B'
    from its checkpoint (--pretrained-checkpoint: --load is empty at the first start)."""
    docs = [np.random.default_rng(i).integers(10, 40, 30) for i in range(200)]
    corpus = write_documents(str(tmp_path / "letters"), [np.append(d, EOD) for d in docs])
    base, tuned = str(tmp_path / "base"), str(tmp_path / "tuned")
    train([*TINY, "--data-path", corpus, "--train-iters", "20", "--save", base])
    task = write_records(tmp_path / "add.jsonl", addition_task(2000, 3))
    sft = [*TINY, "--sft", "--data-path", preprocess(task, str(tmp_path / "add"))]
    sft += ["--pretrained-checkpoint", base, "--load", tuned, "--save", tuned]  # resumable
    sft += ["--train-iters", "100"]
    sft += ["--micro-batch-size", "16", "--global-batch-size", "32", "--lr", "1e-2"]
    train([*sft, "--lr-decay-style", "constant"])  # later flags win
    return base, tuned


@pytest.mark.slow
def test_finetuned_model_answers_the_instruction_task(tmp_path):
    """'what is A+B' (0 <= A, B <= 4): the base model answers few of 50 new prompts, the model
    fine-tuned from its checkpoint most (greedy generation up to the end token)."""
    base, tuned = run_distributed(pretrain_and_finetune, 1, tmp_path, timeout=300)[0]
    torch.set_num_threads(1)  # tiny matrices: threads only contend
    held_out = addition_task(50, 99)
    base_acc, tuned_acc = accuracy(base, held_out), accuracy(tuned, held_out)
    assert base_acc <= 0.2 and tuned_acc >= 0.7, (base_acc, tuned_acc)
