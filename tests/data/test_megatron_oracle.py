"""Sample i equals Megatron-core's GPTDataset / BlendedDataset sample i (megatron-core 0.16.1)."""
import warnings

import numpy
import pytest
import torch

pytest.importorskip("megatron.core")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset as MegatronGPTDataset
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

from megatron_alcot.config import DataConfig
from megatron_alcot.data.builder import build_train_valid_test_datasets
from megatron_alcot.data.indexed_dataset import IndexedDatasetBuilder

EOD, VOCAB = 3, 500


class StubTokenizer:
    vocab_size, eod, pad = VOCAB, EOD, -1
    unique_identifiers = {"class": "StubTokenizer"}


def _write(prefix, n_docs, seed, max_len=70):
    rs = numpy.random.RandomState(seed)
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    for _ in range(n_docs):
        tokens = rs.randint(4, VOCAB, size=rs.randint(1, max_len)).astype(numpy.uint16)
        tokens[-1] = EOD
        b.add_document(tokens)
    b.finalize(prefix + ".idx")
    return prefix


def _megatron(data_path_blend, split, seq, seed, sizes, **flags):
    cfg = GPTDatasetConfig(random_seed=seed, sequence_length=seq, blend=data_path_blend, split=split,
                           tokenizer=StubTokenizer(), path_to_cache=None,
                           reset_position_ids=flags.get("reset_position_ids", False),
                           reset_attention_mask=flags.get("reset_attention_mask", False),
                           eod_mask_loss=flags.get("eod_mask_loss", False), create_attention_mask=False)
    return BlendedMegatronDatasetBuilder(MegatronGPTDataset, list(sizes), lambda: True, cfg).build()


def _assert_same(ours, theirs, check_all=True):
    assert len(ours) == len(theirs)
    idx = range(len(ours)) if check_all else numpy.linspace(0, len(ours) - 1, 200).astype(int)
    for i in idx:
        a, b = ours[int(i)], theirs[int(i)]
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(a[key], b[key]), (i, key)
        if "dataset_id" in b:
            assert int(a["dataset_id"]) == int(b["dataset_id"])


@pytest.mark.parametrize("num_samples,seq,seed", [
    ((40, 10, 5), 32, 1234),      # one epoch of train
    ((300, 60, 20), 32, 7),       # several epochs, last one well used
    ((113, 9, 3), 64, 99),        # separate final epoch (last epoch < 80% used)
])
def test_single_dataset_samples_equal_megatron(tmp_path, num_samples, seq, seed):
    prefix = _write(str(tmp_path / "a_text_document"), 120, seed=1)
    theirs = _megatron(([prefix], None), "90,7,3", seq, seed, num_samples)
    ours = build_train_valid_test_datasets(
        DataConfig(data_path=[prefix], split="90,7,3", data_cache_path=str(tmp_path / "ours")),
        seq, seed, num_samples, tokenizer=StubTokenizer())
    for o, t in zip(ours, theirs):
        numpy.testing.assert_array_equal(o.document_index, t.document_index)
        numpy.testing.assert_array_equal(o.sample_index, t.sample_index)
        assert o.sample_index.dtype == t.sample_index.dtype
        numpy.testing.assert_array_equal(o.shuffle_index, t.shuffle_index)
        assert o.shuffle_index.dtype == t.shuffle_index.dtype
        _assert_same(o, t)


def test_masks_and_resets_equal_megatron(tmp_path):
    prefix = _write(str(tmp_path / "a_text_document"), 80, seed=2, max_len=20)
    flags = dict(reset_position_ids=True, reset_attention_mask=False, eod_mask_loss=True)
    theirs = _megatron(([prefix], None), "1,0,0", 48, 5, (50, 0, 0), **flags)[0]
    cfg = DataConfig(data_path=[prefix], split="1,0,0", data_cache_path=str(tmp_path / "ours"), **flags)
    ours = build_train_valid_test_datasets(cfg, 48, 5, (50, 0, 0), tokenizer=StubTokenizer())[0]
    _assert_same(ours, theirs)


@pytest.mark.parametrize("weighted", [True, False])
def test_blend_samples_equal_megatron(tmp_path, weighted):
    a = _write(str(tmp_path / "a_text_document"), 90, seed=3)
    b = _write(str(tmp_path / "b_text_document"), 40, seed=4)
    c = _write(str(tmp_path / "c_text_document"), 60, seed=5)
    paths = ["0.5", a, "0.2", b, "0.3", c] if weighted else [a, b, c]
    blend = ([a, b, c], [0.5, 0.2, 0.3] if weighted else None)
    sizes = (400, 40, 20) if weighted else (100, 10, 5)
    theirs = _megatron(blend, "80,15,5", 32, 11, sizes)
    ours = build_train_valid_test_datasets(
        DataConfig(data_path=paths, split="80,15,5", data_cache_path=str(tmp_path / "ours")),
        32, 11, sizes, tokenizer=StubTokenizer())
    for o, t in zip(ours, theirs):
        numpy.testing.assert_array_equal(o.dataset_index, t.dataset_index)
        numpy.testing.assert_array_equal(o.dataset_sample_index, t.dataset_sample_index)
        _assert_same(o, t)
