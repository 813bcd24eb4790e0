"""GPTDataset: Megatron's sample construction, checked by properties (no Megatron needed)."""
import json
import os

import numpy
import pytest
import torch

from megatron_alcot.config import ConfigError, DataConfig
from megatron_alcot.data.builder import build_train_valid_test_datasets
from megatron_alcot.data.gpt_dataset import (GPTDataset, build_document_index, build_gpt_indices,
                                             build_sample_index, ltor_masks_and_position_ids,
                                             num_epochs_for, separate_final_epoch)
from megatron_alcot.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron_alcot.data.utils import split_matrix, split_range

EOD = 0


def write_dataset(prefix, lengths, start=1):
    """Documents whose tokens count up through the whole corpus (so order is checkable); EOD last."""
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.int32)
    value = start
    for n in lengths:
        tokens = numpy.arange(value, value + n, dtype=numpy.int32)
        if n:
            tokens[-1] = EOD
        value += n
        builder.add_document(tokens, [n])
    builder.finalize(prefix + ".idx")
    return prefix


def sample_index_loop(sizes, document_index, seq_length, num_epochs, tokens_per_epoch, drop_last=True):
    """Plain-Python transcription of Megatron's C++ build_sample_idx, as the reference."""
    total = num_epochs * tokens_per_epoch
    num_samples = (total - 1) // seq_length if drop_last else int(
        numpy.ceil(numpy.float32(total - 1) / numpy.float32(seq_length)))
    rows = [(0, 0)]
    doc, offset = 0, 0
    while len(rows) <= num_samples:
        remaining = seq_length + 1
        while remaining != 0:
            length = int(sizes[document_index[doc]]) - offset
            remaining -= length
            if remaining <= 0:
                offset += remaining + length - 1
                remaining = 0
            else:
                if doc == len(document_index) - 1:
                    offset = int(sizes[document_index[doc]]) - 1
                    break
                doc += 1
                offset = 0
        rows.append((doc, offset))
    return numpy.array(rows)


@pytest.mark.parametrize("trial", range(40))
def test_sample_index_matches_sequential_loop(trial):
    rs = numpy.random.RandomState(trial)
    sizes = rs.randint(0, 30, size=rs.randint(2, 40)).astype(numpy.int32)
    sizes[0] = max(sizes[0], 2)
    docs = numpy.arange(len(sizes), dtype=numpy.int32)
    epochs, seq = rs.randint(1, 4), rs.randint(2, 25)
    doc_index = build_document_index(docs, epochs, numpy.random.RandomState(trial), False)
    for drop_last in (True, False):
        ours = build_sample_index(sizes, doc_index, seq, epochs, int(sizes.sum()), drop_last)
        ref = sample_index_loop(sizes, doc_index, seq, epochs, int(sizes.sum()), drop_last)
        assert ours.dtype == numpy.int32
        numpy.testing.assert_array_equal(ours, ref)


def test_epochs_and_separate_final_epoch():
    assert num_epochs_for(1000, 9, 100) == 1          # 901 tokens needed
    assert num_epochs_for(1000, 10, 100) == 2         # 1001 tokens needed
    assert num_epochs_for(1000, None, 100) == 1
    # 2 epochs, the second used for 1 of 9 samples -> shuffled apart
    assert separate_final_epoch(2, 1000, 10, 100) == (True, 9)
    assert separate_final_epoch(2, 1000, 18, 100)[0] is False
    sizes = numpy.full(10, 100, dtype=numpy.int32)
    docs = numpy.arange(3, 8, dtype=numpy.int32)
    idx = build_gpt_indices(sizes, docs, num_samples=6, seq_length=100, seed=7)   # 5 docs, 500 tokens
    d = idx["document_index"]
    assert d.dtype == numpy.int32 and len(d) == 10
    assert sorted(d[:5]) == list(docs) and sorted(d[5:]) == list(docs)   # epochs shuffled apart
    s = idx["shuffle_index"]
    assert s.dtype == numpy.uint32 and sorted(s[:4]) == list(range(4)) and sorted(s[4:]) == list(range(4, 9))


@pytest.fixture
def corpus(tmp_path):
    rs = numpy.random.RandomState(0)
    lengths = rs.randint(1, 60, size=50)
    return write_dataset(str(tmp_path / "corpus_text_document"), lengths), lengths


def _gpt(prefix, n, seq=32, seed=3, cache=None, **kw):
    low = IndexedDataset(prefix)
    return GPTDataset(low, prefix, numpy.arange(0, len(low), dtype=numpy.int32), n, "train", seq, seed,
                      eod=EOD, cache_dir=cache, **kw)


def test_every_token_in_order_with_one_token_overlap(corpus):
    prefix, lengths = corpus
    seq = 32
    ds = _gpt(prefix, 200, seq)                         # several epochs
    assert len(ds) >= 200
    low = IndexedDataset(prefix)
    stream = numpy.concatenate([low[int(d)] for d in ds.document_index]).astype(numpy.int64)
    order = numpy.argsort(ds.shuffle_index)             # sample j is at position order[j]
    for j in range(len(ds)):
        s = ds[int(order[j])]
        assert s["tokens"].shape == (seq,) and s["tokens"].dtype == torch.int64
        text = numpy.concatenate([s["tokens"].numpy(), s["labels"].numpy()[-1:]])
        numpy.testing.assert_array_equal(text, stream[j * seq: j * seq + seq + 1])
        numpy.testing.assert_array_equal(s["labels"].numpy()[:-1], s["tokens"].numpy()[1:])


def test_samples_are_fresh_tensors(corpus):
    ds = _gpt(corpus[0], 20)
    a = ds[3]
    a["loss_mask"].zero_(); a["tokens"].zero_(); a["position_ids"].zero_()
    b = ds[3]
    assert b["loss_mask"].sum() == 32 and b["tokens"].abs().sum() > 0 and b["position_ids"][-1] == 31
    assert b["loss_mask"].dtype == torch.float32 and b["position_ids"].dtype == torch.int64


def test_masks_and_position_resets():
    tokens = numpy.array([5, 6, EOD, 7, 8, 9, EOD, 4])
    loss, pos, seg = ltor_masks_and_position_ids(tokens, EOD, True, True, True)
    numpy.testing.assert_array_equal(loss, [1, 1, 0, 1, 1, 1, 0, 1])
    numpy.testing.assert_array_equal(pos, [0, 1, 2, 0, 1, 2, 3, 0])
    numpy.testing.assert_array_equal(seg, [0, 0, 0, 1, 1, 1, 1, 2])
    loss, pos, seg = ltor_masks_and_position_ids(tokens, EOD, False, False, False)
    assert loss.all() and seg is None and list(pos) == list(range(8))


def test_split_rounding_is_megatrons():
    assert split_matrix("969,30,1") == [(0, 0.969), (0.969, 0.999), (0.999, 1.0)]
    assert split_matrix("98,2") == [(0, 0.98), (0.98, 1.0), None]
    assert split_range((0.969, 0.999), 1000) == (969, 999)
    assert split_range((0.0, 0.5), 5) == (0, 2)        # round half to even, as Python/Megatron
    assert split_range((0.5, 1.0), 7) == (4, 7)
    for bad in ("a,b", "1,2,3,4", "0,0,0", "-1,2"):
        with pytest.raises(ConfigError, match="--split"):
            split_matrix(bad)


def test_empty_split_with_requested_samples_names_split_and_dataset(corpus):
    prefix, _ = corpus                                   # 50 sequences: 999,1,0 -> valid gets round(.05)=0
    cfg = DataConfig(data_path=[prefix], split="999,1,0")
    with pytest.raises(ConfigError, match=r"valid split of .*corpus_text_document.*--split"):
        build_train_valid_test_datasets(cfg, 16, 1, (10, 5, 0))
    train, valid, test = build_train_valid_test_datasets(cfg, 16, 1, (10, 0, 0))
    assert len(train) >= 10 and valid is None and test is None


def test_cache_reuse_and_hash(corpus, tmp_path):
    prefix, _ = corpus
    cache = str(tmp_path / "cache")
    first = _gpt(prefix, 50, cache=cache)
    files = sorted(os.listdir(cache))
    assert len(files) == 4 and all("-GPTDataset-train-" in f for f in files)
    desc = json.loads(open(os.path.join(cache, [f for f in files if f.endswith("description.txt")][0])).read())
    assert desc["seed"] == 3 and desc["num_samples"] == 50
    mtimes = {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in files}
    second = _gpt(prefix, 50, cache=cache)
    assert {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in files} == mtimes   # loaded, not rebuilt
    assert isinstance(second.sample_index, numpy.memmap)
    numpy.testing.assert_array_equal(first.sample_index, second.sample_index)
    _gpt(prefix, 50, seed=4, cache=cache)
    assert len(os.listdir(cache)) == 8                  # different description -> different hash
    assert not [f for f in os.listdir(cache) if ".tmp" in f]


def test_builder_default_cache_dir_next_to_prefix(corpus):
    prefix, _ = corpus
    train, valid, test = build_train_valid_test_datasets(DataConfig(data_path=[prefix], split="80,20,0"),
                                                         16, 1, (30, 8, 0))
    assert os.path.isdir(os.path.join(os.path.dirname(prefix), "cache", "GPTDataset_indices"))
    assert len(train) >= 30 and len(valid) >= 8 and test is None
    assert set(train.documents) == set(range(40)) and set(valid.documents) == set(range(40, 50))


def test_mock_data_is_deterministic():
    cfg = DataConfig(mock_data=True, vocab_size=512)
    a = build_train_valid_test_datasets(cfg, 64, 5, (8, 4, 0))
    b = build_train_valid_test_datasets(cfg, 64, 5, (8, 4, 0))
    assert a[2] is None
    for i in range(8):
        assert torch.equal(a[0][i]["tokens"], b[0][i]["tokens"])
    assert int(a[0][0]["tokens"].max()) < 512


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="--data-path"):
        build_train_valid_test_datasets(DataConfig(), 16, 1, (10, 0, 0))
    with pytest.raises(ConfigError, match="--data-path .*nope"):
        build_train_valid_test_datasets(DataConfig(data_path=[str(tmp_path / "nope")]), 16, 1, (10, 0, 0))


def _build_on_rank(rank, world_size, prefix, cache):
    ds = _gpt(prefix, 40, cache=cache)
    return [os.path.basename(p) for p in sorted(os.listdir(cache))], numpy.asarray(ds.shuffle_index).tolist(), \
        ds[5]["tokens"]


@pytest.mark.slow
def test_distributed_build_rank0_then_load(corpus, tmp_path):
    from dist_utils import run_distributed
    cache = str(tmp_path / "dist_cache")
    results = run_distributed(_build_on_rank, 2, corpus[0], cache)
    (files0, shuf0, tok0), (files1, shuf1, tok1) = results
    assert files0 == files1 and len(files0) == 4
    assert shuf0 == shuf1 and torch.equal(tok0, tok1)
