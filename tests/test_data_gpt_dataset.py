"""GPTDataset / BlendedDataset: Megatron's sample construction, caching, masks, blending, and the
cache built by one rank per node while the others wait."""

import json
import os

import numpy as np
import pytest
import torch
from data_util import labelled_documents, write_documents
from factory import make_config

from megatron_lite.config import DataConfig
from megatron_lite.data import build_train_valid_test_datasets, train_valid_test_num_samples
from megatron_lite.data.gpt_dataset import GPTDataset, ltor_masks_and_position_ids, split_ranges
from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.data.tokenizer import NullTokenizer
from megatron_lite.distributed.testing import run_distributed

EOD = 1000
TOK = NullTokenizer(EOD)  # eod id 1000; document i holds tokens 1 + i
SEQ = 16


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    docs = labelled_documents(120, eod=EOD)
    return write_documents(str(tmp_path_factory.mktemp("gpt") / "lab"), docs)


def make(prefix, ids, num_samples, seed=1234, cache_dir=None, split="1"):
    return GPTDataset(
        IndexedDataset(prefix), prefix, ids, num_samples, "train",
        seq_length=SEQ, seed=seed, tokenizer=TOK, split=split, cache_dir=cache_dir,
    )  # fmt: skip


def stream(ds):
    """The split's tokens in document_index order: what the samples are cut from."""
    return np.concatenate([ds.dataset[int(d)] for d in ds.document_index]).astype(np.int64)


def test_one_epoch_uses_every_token_once_in_sample_order(prefix):
    ids = np.arange(10, 90, dtype=np.int32)
    ds = make(prefix, ids, None)
    assert sorted(ds.document_index.tolist()) == ids.tolist()
    assert sorted(ds.shuffle_index.tolist()) == list(range(len(ds)))
    order = np.argsort(ds.shuffle_index)  # sample j of the stream is item order[j]
    pieces = [ds.sample_tokens(int(k)) for k in order]
    s = stream(ds)
    assert len(ds) == (len(s) - 1) // SEQ
    np.testing.assert_array_equal(np.concatenate([p[:-1] for p in pieces]), s[: len(ds) * SEQ])
    for j, p in enumerate(pieces):  # sample j is stream[j*SEQ : j*SEQ + SEQ + 1]
        np.testing.assert_array_equal(p, s[j * SEQ : j * SEQ + SEQ + 1])


def test_labels_are_tokens_shifted_by_one(prefix):
    ds = make(prefix, np.arange(120, dtype=np.int32), None)
    for i in range(0, len(ds), 7):
        item, text = ds[i], ds.sample_tokens(i)
        assert item["tokens"].shape == item["labels"].shape == (SEQ,)
        assert item["tokens"].dtype == item["labels"].dtype == torch.int64
        assert item["tokens"].tolist() == text[:-1].tolist()
        assert item["labels"].tolist() == text[1:].tolist()
        assert item["position_ids"].tolist() == list(range(SEQ))
        assert item["loss_mask"].tolist() == [1.0] * SEQ


def test_order_is_megatrons_randomstate_and_separate_last_epoch(prefix):
    ids = np.arange(30, dtype=np.int32)
    tokens = int(IndexedDataset(prefix).sequence_lengths[:30].sum())
    per_epoch = (tokens - 1) // SEQ
    wanted = 2 * per_epoch + per_epoch // 4  # 3 epochs, the last used ~25% (< 80%)
    ds = make(prefix, ids, wanted, seed=7)
    assert len(ds) >= wanted
    rng = np.random.RandomState(7)
    first, last = np.tile(ids, 2), ids.copy()
    rng.shuffle(first)
    rng.shuffle(last)
    np.testing.assert_array_equal(ds.document_index, np.concatenate([first, last]))
    before_last = (2 * tokens - 1) // SEQ
    head = np.arange(before_last, dtype=np.uint32)
    rng.shuffle(head)
    np.testing.assert_array_equal(ds.shuffle_index[:before_last], head)
    assert ds.shuffle_index.dtype == np.uint32
    assert set(ds.shuffle_index[before_last:].tolist()) == set(range(before_last, len(ds)))
    # needing > 80% of the last epoch shuffles all epochs together
    ds2 = make(prefix, ids, 2 * per_epoch + per_epoch * 9 // 10, seed=7)
    together = np.tile(ids, 3)
    np.random.RandomState(7).shuffle(together)
    np.testing.assert_array_equal(ds2.document_index, together)


def test_split_boundaries_follow_megatron_rounding():
    assert split_ranges(1000, "969,30,1") == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges(10, "2,1") == [(0, 7), (7, 10), None]
    assert split_ranges(7, "1,0,1")[1] is None


def config(tmp, prefix_or_blend, split="6,2,2", **data):
    data_path = prefix_or_blend if isinstance(prefix_or_blend, list) else [prefix_or_blend]
    return make_config(
        2, seq_length=SEQ, data_path=data_path, split=split, vocab_size=EOD,
        data_cache_path=str(tmp), **data,
        micro_batch_size=2, global_batch_size=4, train_iters=20, eval_interval=10, eval_iters=2,
    )  # fmt: skip


def test_no_sample_crosses_splits(tmp_path, prefix):
    cfg = config(tmp_path, prefix)
    sizes = train_valid_test_num_samples(cfg)
    assert sizes == [80, 24, 8]
    datasets = build_train_valid_test_datasets(cfg, TOK, sizes)
    for ds, (lo, hi), n in zip(datasets, split_ranges(120, "6,2,2"), sizes):
        assert len(ds) >= n
        for i in range(len(ds)):
            docs = {int(t) - 1 for t in ds.sample_tokens(i) if t != EOD}
            assert docs and all(lo <= d < hi for d in docs), (lo, hi, docs)


def test_cache_is_written_and_reused(tmp_path, prefix):
    ds = make(prefix, np.arange(50, dtype=np.int32), 100, cache_dir=str(tmp_path))
    assert ds.built_anew
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 4 and all(f.startswith(ds.cache.base) for f in files)
    assert ds.cache.base.endswith("-GPTDataset-train")  # {md5}-GPTDataset-train-{name}
    assert {f[len(ds.cache.base) + 1 :] for f in files} == {
        "description.txt",
        "document_index.npy",
        "sample_index.npy",
        "shuffle_index.npy",
    }
    desc = json.loads(open(ds.cache.description_path).read())
    assert desc["random_seed"] == 1234 and desc["sequence_length"] == SEQ
    mtimes = {f: os.stat(tmp_path / f).st_mtime_ns for f in files}
    again = make(prefix, np.arange(50, dtype=np.int32), 100, cache_dir=str(tmp_path))
    assert not again.built_anew
    assert isinstance(again.sample_index, np.memmap)
    for name in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(getattr(ds, name), getattr(again, name))
    assert {f: os.stat(tmp_path / f).st_mtime_ns for f in files} == mtimes
    other = make(prefix, np.arange(50, dtype=np.int32), 100, seed=5, cache_dir=str(tmp_path))
    assert other.built_anew and len(os.listdir(tmp_path)) == 8


def test_masks_and_position_ids_as_megatron():
    tokens = np.array([5, 6, EOD, 7, 8, 9, EOD, 4])
    out = ltor_masks_and_position_ids(tokens, EOD, True, True, True)
    assert out["loss_mask"].tolist() == [1, 1, 0, 1, 1, 1, 0, 1]
    assert out["position_ids"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    mask = out["attention_mask"][0]  # True = masked
    assert mask.shape == (8, 8) and mask.dtype == torch.bool
    allowed = ~mask
    assert allowed[4].tolist() == [False, False, False, True, True, False, False, False]
    assert allowed[2].tolist() == [True, True, True] + [False] * 5
    assert allowed[7].tolist() == [False] * 7 + [True]
    plain = ltor_masks_and_position_ids(tokens, EOD, False, False, False)
    assert "attention_mask" not in plain and plain["loss_mask"].sum() == 8
    assert plain["position_ids"].tolist() == list(range(8))


def test_mock_data_has_the_same_interface(tmp_path):
    cfg = config(tmp_path, [], split="1,1,1", mock_data=True)
    train, valid, test = build_train_valid_test_datasets(cfg, TOK, [10, 4, 4])
    item = train[3]
    assert set(item) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert item["tokens"].shape == (SEQ,) and int(item["tokens"].max()) <= EOD
    assert item["labels"][:-1].tolist() == item["tokens"][1:].tolist()
    again = build_train_valid_test_datasets(cfg, TOK, [10, 4, 4])[0]
    assert again[3]["tokens"].tolist() == item["tokens"].tolist()
    assert os.listdir(tmp_path) == []  # mock data caches nothing


def test_blending_follows_weights_within_one_percent(tmp_path):
    a = write_documents(str(tmp_path / "a"), labelled_documents(80, seed=1, eod=EOD))
    b_docs = [
        np.where(d == EOD, EOD, d + 500).astype(np.uint16)
        for d in labelled_documents(80, seed=2, eod=EOD)
    ]
    b = write_documents(str(tmp_path / "b"), b_docs)
    cfg = config(tmp_path / "cache", ["0.7", a, "0.3", b], split="1")
    train, valid, test = build_train_valid_test_datasets(cfg, TOK, [600, 0, 0])
    assert valid is None and test is None
    assert len(train) >= 600
    share = np.bincount(train.dataset_index, minlength=2) / len(train)
    assert abs(share[0] - 0.7) < 0.01 and abs(share[1] - 0.3) < 0.01
    from_b = [bool((train[i]["tokens"][train[i]["tokens"] != EOD] > 500).all()) for i in range(60)]
    assert from_b == [bool(d) for d in train.dataset_index[:60]]
    assert train.built_anew
    again = build_train_valid_test_datasets(cfg, TOK, [600, 0, 0])[0]
    assert not again.built_anew
    np.testing.assert_array_equal(again.dataset_sample_index, train.dataset_sample_index)


def _build_on_rank(prefix, cache_root, ranks_per_node):
    import torch.distributed as dist

    rank = dist.get_rank()
    os.environ["LOCAL_RANK"] = str(rank % ranks_per_node)
    node_cache = os.path.join(cache_root, f"node{rank // ranks_per_node}")  # not shared
    cfg = config(node_cache, prefix)
    train, valid, _ = build_train_valid_test_datasets(cfg, TOK, [40, 8, 4])
    return train.built_anew, valid.built_anew, train[5]["tokens"].tolist()


def test_cache_built_by_one_rank_per_node_others_wait(tmp_path, prefix):
    results = run_distributed(_build_on_rank, 4, prefix, str(tmp_path), 2, timeout=60)
    built = [(t, v) for t, v, _ in results]
    assert built == [(True, True), (False, False), (True, True), (False, False)]
    assert all(r[2] == results[0][2] for r in results)
    assert len(os.listdir(tmp_path / "node0")) == len(os.listdir(tmp_path / "node1")) == 12


def test_split_rounding_to_no_documents_is_skipped(tmp_path, prefix):
    cfg = config(tmp_path, prefix, split="1,0,0.001")  # test: round(0.999 * 120) = 120 -> empty
    train, valid, test = build_train_valid_test_datasets(cfg, TOK, [40, 8, 4])
    assert valid is None and test is None and len(train) >= 40


def test_too_short_split_repeats_for_samples_and_is_an_error_for_one_pass(tmp_path):
    """As megatron-core (tests/test_data_megatron_core.py): asked for samples, a split shorter than
    one sample repeats; for one pass over it (no sample count) or from a single token, nothing can
    be cut, and that is a clear error."""
    short = write_documents(str(tmp_path / "s"), [np.array([1, 2, EOD], np.uint16)] * 4)
    ds = make(short, np.arange(4, dtype=np.int32), 10)
    assert len(ds) >= 10 and ds.sample_tokens(0).tolist()[:6] == [1, 2, EOD, 1, 2, EOD]
    with pytest.raises(ValueError, match=r"train split of .*s has 12 tokens in 4 documents"):
        make(short, np.arange(4, dtype=np.int32), None)
    one = write_documents(str(tmp_path / "one"), [np.array([EOD], np.uint16)] * 2)
    with pytest.raises(ValueError, match=r"has 1 tokens in 1 documents"):
        make(one, np.arange(1, dtype=np.int32), 10)


def test_per_split_data_paths_take_every_document_of_their_files(tmp_path):
    """--train-data-path (a blend) / --valid-data-path / --test-data-path, as Megatron: each split
    draws only from its own files, all of their documents, with no --split applied."""
    a = write_documents(str(tmp_path / "a"), labelled_documents(40, seed=1, eod=EOD))
    b_docs = [np.where(d == EOD, EOD, d + 500) for d in labelled_documents(40, seed=2, eod=EOD)]
    b = write_documents(str(tmp_path / "b"), [d.astype(np.uint16) for d in b_docs])
    c_docs = [np.where(d == EOD, EOD, d + 200) for d in labelled_documents(30, seed=3, eod=EOD)]
    c = write_documents(str(tmp_path / "c"), [d.astype(np.uint16) for d in c_docs])
    cfg = config(tmp_path / "cache", [], split="1,0,0")
    cfg.data.train_data_path, cfg.data.valid_data_path, cfg.data.test_data_path = (
        ["0.5", a, "0.5", b], [c], [a]
    )  # fmt: skip
    train, valid, test = build_train_valid_test_datasets(cfg, TOK, [200, 24, 8])
    assert len(train) >= 200 and len(valid) >= 24 and len(test) >= 8
    share = np.bincount(train.dataset_index, minlength=2) / len(train)
    assert abs(share[0] - 0.5) < 0.01
    valid_docs = {int(t) for i in range(len(valid)) for t in valid[i]["tokens"] if t != EOD}
    assert valid_docs and all(200 < t <= 230 for t in valid_docs)  # only c's tokens
    assert valid.document_index.min() == 0 and valid.document_index.max() == 29  # all of c
    test_docs = {int(t) for i in range(len(test)) for t in test[i]["tokens"] if t != EOD}
    assert test_docs and max(test_docs) <= 40  # only a's
    with pytest.raises(Exception, match="not both"):
        DataConfig(data_path=[a], train_data_path=[a], tokenizer_type="NullTokenizer", vocab_size=9)
    with pytest.raises(Exception, match="need --train-data-path"):
        DataConfig(valid_data_path=[c], tokenizer_type="NullTokenizer", vocab_size=9)
