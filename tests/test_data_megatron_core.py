"""Our GPTDataset builds megatron-core's samples: the same document, sample and shuffle indices
and tokens from the same .bin/.idx, seed, split and sequence length (megatron-core 0.16.1 from
PyPI builds its own on the CPU), a split too small for one sample included (both repeat it)."""

import numpy as np
import pytest
from data_util import labelled_documents, write_documents

from megatron_lite.data.gpt_dataset import GPTDataset
from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.data.tokenizer import NullTokenizer

mcore_gpt = pytest.importorskip("megatron.core.datasets.gpt_dataset")
EOD, SEQ = 1000, 16


class _McoreTokenizer:
    """The tokenizer attributes megatron-core's GPTDataset reads."""

    eod, pad, vocab_size = EOD, -1, EOD + 1
    unique_identifiers = {"class": "NullTokenizer"}


def _both(prefix, ids, num_samples, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset as McoreIndexed
    from megatron.core.datasets.utils import Split

    cfg = mcore_gpt.GPTDatasetConfig(
        random_seed=1234,
        sequence_length=SEQ,
        split="1",
        tokenizer=_McoreTokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        path_to_cache=str(tmp_path / "mcore_cache"),
    )
    theirs = mcore_gpt.GPTDataset(McoreIndexed(prefix), prefix, ids, num_samples, Split.train, cfg)
    ours = GPTDataset(
        IndexedDataset(prefix), prefix, ids, num_samples, "train", seq_length=SEQ, seed=1234,
        tokenizer=NullTokenizer(EOD), split="1", cache_dir=str(tmp_path / "ours"),
    )  # fmt: skip
    return ours, theirs


@pytest.mark.parametrize(
    "ids,num_samples",
    [(range(0, 60), None), (range(5, 45), 500), (range(10, 30), 37)],
    ids=["one-epoch", "many-epochs", "separate-last-epoch"],
)
def test_samples_equal_megatron_cores(tmp_path, ids, num_samples):
    prefix = write_documents(str(tmp_path / "lab"), labelled_documents(60, eod=EOD))
    ours, theirs = _both(prefix, np.array(list(ids), dtype=np.int32), num_samples, tmp_path)
    np.testing.assert_array_equal(ours.document_index, theirs.document_index)
    np.testing.assert_array_equal(ours.sample_index, theirs.sample_index)
    np.testing.assert_array_equal(ours.shuffle_index, theirs.shuffle_index)
    assert len(ours) == len(theirs)
    for i in range(0, len(ours), max(1, len(ours) // 25)):
        np.testing.assert_array_equal(ours[i]["tokens"], theirs[i]["tokens"].numpy())
        np.testing.assert_array_equal(ours[i]["labels"], theirs[i]["labels"].numpy())


def test_a_two_token_split_repeats_as_in_megatron_core(tmp_path):
    docs = [np.array([7, EOD], dtype=np.uint16), *labelled_documents(10, eod=EOD)]
    prefix = write_documents(str(tmp_path / "tiny"), docs)
    ours, theirs = _both(prefix, np.array([0], dtype=np.int32), 4, tmp_path)
    assert len(ours) == len(theirs) >= 4
    for i in range(len(ours)):
        np.testing.assert_array_equal(ours[i]["tokens"], theirs[i]["tokens"].numpy())
    assert ours[0]["tokens"].tolist() == [7, EOD] * (SEQ // 2)
