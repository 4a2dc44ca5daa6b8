"""DPO: the loss starts at log 2 (policy = stored reference), raises the chosen-minus-rejected
log-probability margin on held-out pairs, and tp2 x pp2 x dp2 gives the single-process losses,
reward margins and accuracies."""

import math
import random

import numpy as np
import pytest
from data_util import write_documents
from sft_util import TINY, VOCAB, losses, preprocess, train, write_records
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_lite.data.dpo_dataset import reference_paths
from megatron_lite.distributed.testing import run_distributed
from megatron_lite.training.dpo import DPO_METRICS

EOD = VOCAB


def preference_pairs(n: int, seed: int) -> list[dict]:
    """'what is A+B': chosen the sum, rejected another number (ids 10 + k)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        wrong = rng.choice([k for k in range(9) if k != a + b])
        prompt = f"{10 + a} {10 + b}"
        out.append({"prompt": prompt, "chosen": str(10 + a + b), "rejected": str(10 + wrong)})
    return out


def reference(load: str, data: str, output: str | None = None) -> np.ndarray:
    """tools/dpo_reference.py in this process: [pairs, 2] log-probabilities under `load`."""
    import dpo_reference  # tools/ (on the path through data_util)

    extra = ["--output", output] if output else []
    assert dpo_reference.main(["--load", load, "--data-path", data, *extra]) == 0
    return np.load(output or reference_paths(data)[0])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A base model pretrained on letter text, training pairs with its reference log-probs,
    and held-out pairs."""
    d = tmp_path_factory.mktemp("dpo")
    docs = [np.random.default_rng(i).integers(10, 40, 30) for i in range(200)]
    corpus = write_documents(str(d / "letters"), [np.append(t, EOD) for t in docs])
    base = str(d / "base")
    run_distributed(train, 1, [*TINY, "--data-path", corpus, "--train-iters", "20", "--save", base])
    pairs = preprocess(write_records(d / "p.jsonl", preference_pairs(600, 0)), str(d / "p"), "dpo")
    held = preprocess(write_records(d / "h.jsonl", preference_pairs(50, 9)), str(d / "h"), "dpo")
    reference(base, pairs)
    return d, base, pairs, held


DPO = ["--dpo", "--finetune", "--micro-batch-size", "4", "--global-batch-size", "16"]


@pytest.mark.slow
def test_dpo_raises_the_held_out_margin(setup):
    d, base, pairs, held = setup
    tuned = str(d / "tuned")
    flags = [*TINY, *DPO, "--data-path", pairs, "--load", base, "--save", tuned]
    flags += ["--train-iters", "40", "--lr", "1e-2", "--lr-decay-style", "constant"]
    log = run_distributed(train, 1, [*flags, "--tensorboard-dir", str(d / "tb")])[0]
    got = losses(log)
    assert got[1] == pytest.approx(math.log(2), abs=1e-4)  # policy = reference at the start
    events = EventAccumulator(str(d / "tb"))
    events.Reload()
    for name in DPO_METRICS:  # TensorBoard gets what the log line has, every iteration
        logged = losses(log, name)
        assert [e.step for e in events.Scalars(name)] == sorted(logged) == list(range(1, 41))
        for e in events.Scalars(name):
            assert e.value == pytest.approx(logged[e.step], rel=1e-5, abs=1e-6), name
    assert sum(got[i] for i in range(31, 41)) / 10 < math.log(2) - 0.03
    before = reference(base, held, str(d / "before.npy"))
    after = reference(tuned, held, str(d / "after.npy"))
    margin_before, margin_after = before[:, 0] - before[:, 1], after[:, 0] - after[:, 1]
    assert margin_after.mean() > margin_before.mean() + 2.0, (margin_before, margin_after)
    assert (margin_after > 0).mean() >= max(0.6, (margin_before > 0).mean() + 0.2)


def test_layouts_match_single_process_dpo(setup):
    """Loss, reward margin and accuracy per iteration: tp2 x pp2 x dp2 = one process."""
    _, base, pairs, _ = setup
    flags = [*TINY, *DPO, "--data-path", pairs, "--load", base, "--train-iters", "4"]
    one = run_distributed(train, 1, flags)[0]
    layout = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    eight = run_distributed(train, 8, [*flags, *layout], timeout=120)[-1]
    # Continuous quantities only: accuracy is a step function of margins near 0 early on, so rounding
    # differences between layouts (and machines) flip it.
    continuous = [name for name in DPO_METRICS if name != "dpo accuracy"]
    for name in ("lm loss", *continuous):
        want, got = losses(one, name), losses(eight, name)
        assert sorted(want) == sorted(got) == [1, 2, 3, 4], (name, one[-2000:])
        for it in want:
            assert got[it] == pytest.approx(want[it], rel=1e-5, abs=1e-7), (name, it)
    assert losses(one, "dpo accuracy")[4] > 0.5  # it already prefers the chosen answers


def test_dpo_refuses_missing_reference_and_non_pairs(setup, tmp_path):
    from megatron_lite.data.dpo_dataset import DPODataset
    from megatron_lite.data.sft_dataset import MaskedDataset
    from megatron_lite.data.tokenizer import NullTokenizer
    from megatron_lite.errors import DataError

    _, _, _, held = setup
    tok = NullTokenizer(VOCAB)
    with pytest.raises(DataError, match=r"tools/dpo_reference.py --load CHECKPOINT"):
        DPODataset(MaskedDataset(held), np.arange(5), 5, "train", seq_length=32, seed=1,
                   tokenizer=tok)  # fmt: skip
    sft = preprocess(write_records(tmp_path / "s.jsonl", [{"prompt": "1", "response": "2"}]),
                     str(tmp_path / "s"))  # fmt: skip
    with pytest.raises(DataError, match=r"not preference pairs .* --task dpo"):
        DPODataset(MaskedDataset(sft), np.arange(1), 1, "train", seq_length=32, seed=1,
                   tokenizer=tok)  # fmt: skip


def test_a_reference_of_other_pairs_or_garbage_is_refused_naming_the_file(setup, tmp_path):
    """The reference is bound to its pairs' files (a digest): another dataset with as many pairs is
    refused, and unreadable reference files give one DataError naming them, the data untouched."""
    from megatron_lite.data.dpo_dataset import DPODataset
    from megatron_lite.data.sft_dataset import MaskedDataset
    from megatron_lite.data.tokenizer import NullTokenizer
    from megatron_lite.errors import DataError

    _, base, _, _ = setup
    mine = preprocess(
        write_records(tmp_path / "a.jsonl", preference_pairs(12, 3)), str(tmp_path / "a"), "dpo"
    )
    other = preprocess(
        write_records(tmp_path / "b.jsonl", preference_pairs(12, 4)), str(tmp_path / "b"), "dpo"
    )
    reference(base, mine)

    def build(prefix):
        return DPODataset(MaskedDataset(prefix), np.arange(12), 12, "train", seq_length=32, seed=1,
                          tokenizer=NullTokenizer(VOCAB))  # fmt: skip

    assert build(mine).reference.shape == (12, 2)
    npy, meta = reference_paths(mine)
    other_npy, other_meta = reference_paths(other)
    for src, dst in ((npy, other_npy), (meta, other_meta)):
        with open(src, "rb") as f, open(dst, "wb") as g:
            g.write(f.read())
    with pytest.raises(
        DataError, match=r"computed from other pairs than .*b_dpo.*dpo_reference.py"
    ):
        build(other)
    data_files = sorted(tmp_path.glob("b_*.bin")) + sorted(tmp_path.glob("b_*.idx"))
    before = {p: p.read_bytes() for p in data_files}
    garbage = {
        "npy": (other_npy, b"\x93NUMPY garbage"),
        "object": (other_npy, None),
        "json": (other_meta, b"{not json"),
    }
    for case, (path, content) in garbage.items():
        for src, dst in (
            (npy, other_npy),
            (meta, other_meta),
        ):  # a good pair, then one file spoiled
            with open(src, "rb") as f, open(dst, "wb") as g:
                g.write(f.read())
        if content is None:
            np.save(path, np.array([[{"a": 1}, None]] * 12, dtype=object), allow_pickle=True)
        else:
            with open(path, "wb") as f:
                f.write(content)
        with pytest.raises(DataError, match=rf"{path}: .*dpo_reference.py") as e:
            build(other)
        assert "\n" not in str(e.value), case
    assert {p: p.read_bytes() for p in data_files} == before
