"""Blending: weight parsing, Megatron's greedy blend, per-component sizes, per-split paths."""
import numpy
import pytest

from megatron_alcot.config import ConfigError, DataConfig
from megatron_alcot.data.blended_dataset import BlendedDataset, build_blending_indices
from megatron_alcot.data.builder import build_train_valid_test_datasets
from megatron_alcot.data.indexed_dataset import IndexedDatasetBuilder
from megatron_alcot.data.utils import normalize, parse_blend, size_per_dataset


def greedy_loop(weights, size):
    """Plain transcription of Megatron's C++ build_blending_indices (the reference)."""
    counts = [0] * len(weights)
    dataset_index, sample_index = [], []
    for i in range(size):
        x = max(float(i), 1.0)
        best = max(range(len(weights)), key=lambda d: (weights[d] * x - counts[d], -d))
        dataset_index.append(best)
        sample_index.append(counts[best])
        counts[best] += 1
    return numpy.array(dataset_index), numpy.array(sample_index)


@pytest.mark.parametrize("trial", range(30))
def test_blending_indices_equal_greedy_loop(trial):
    rs = numpy.random.RandomState(trial)
    num = rs.randint(1, 9)
    raw = rs.rand(num) if trial % 2 else rs.randint(1, 5, num).astype(float)
    weights = normalize(list(raw))
    size = rs.randint(1, 4000)
    di, si = build_blending_indices(weights, size)
    ref_di, ref_si = greedy_loop(weights, size)
    assert di.dtype == numpy.int16 and si.dtype == numpy.int64
    numpy.testing.assert_array_equal(di, ref_di)
    numpy.testing.assert_array_equal(si, ref_si)


def test_parse_blend():
    assert parse_blend(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    assert parse_blend(["30", "a", "70", "b"]) == (["a", "b"], [30.0, 70.0])
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_blend(["a"]) == (["a"], None)
    assert parse_blend(["1e-1", "a"]) == (["a"], [0.1])
    with pytest.raises(ConfigError, match="weight 'x' is not a number"):
        parse_blend(["0.3", "a", "x", "b"])
    with pytest.raises(ConfigError, match="must be a finite number >= 0"):
        parse_blend(["-1", "a", "2", "b"])
    with pytest.raises(ConfigError, match="sum to zero"):
        parse_blend(["0", "a", "0", "b"])
    with pytest.raises(ConfigError, match="odd length"):
        parse_blend(["0.3", "a", "b"])
    with pytest.raises(ConfigError, match="--train-data-path"):
        parse_blend(["1", "a", "nan", "b"], "--train-data-path")


def test_surplus_sizes():
    assert size_per_dataset([0.3, 0.7], 1000) == [300, 700]
    assert size_per_dataset([0.3, 0.7], 1000, 0.005) == [302, 704]


def _write(prefix, n_docs, seed):
    rs = numpy.random.RandomState(seed)
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.int32)
    for _ in range(n_docs):
        b.add_document(rs.randint(1, 100, size=rs.randint(5, 40)).astype(numpy.int32))
    b.finalize(prefix + ".idx")
    return prefix


def test_weighted_blend_builder(tmp_path):
    a = _write(str(tmp_path / "a"), 40, 0)
    b = _write(str(tmp_path / "b"), 30, 1)
    cfg = DataConfig(data_path=["0.25", a, "0.75", b], split="90,10,0", data_cache_path=str(tmp_path / "c"))
    train, valid, test = build_train_valid_test_datasets(cfg, 16, 1, (100, 20, 0))
    assert isinstance(train, BlendedDataset) and test is None
    assert len(train) == 25 + 75 and len(valid) == 5 + 15
    assert [d.num_samples for d in train.datasets] == [26, 76]    # ceil(ceil(n w) * 1.005)
    counts = numpy.bincount(train.dataset_index, minlength=2)
    assert list(counts) == [25, 75]
    s = train[7]
    assert int(s["dataset_id"]) == int(train.dataset_index[7]) and s["tokens"].shape == (16,)
    again = build_train_valid_test_datasets(cfg, 16, 1, (100, 20, 0))[0]
    assert isinstance(again.dataset_index, numpy.memmap)
    numpy.testing.assert_array_equal(again.dataset_index, train.dataset_index)


def test_unweighted_blend_and_per_split_paths(tmp_path):
    a = _write(str(tmp_path / "a"), 40, 0)
    b = _write(str(tmp_path / "b"), 30, 1)
    train = build_train_valid_test_datasets(DataConfig(data_path=[a, b], split="1,0,0"), 16, 1, (20, 0, 0))[0]
    assert len(train) == 20
    with pytest.raises(ConfigError, match="unweighted train blend"):
        build_train_valid_test_datasets(DataConfig(data_path=[a, b], split="1,0,0"), 16, 1, (10 ** 6, 0, 0))
    cfg = DataConfig(train_data_path=["1", a, "1", b], valid_data_path=[b])
    train, valid, test = build_train_valid_test_datasets(cfg, 16, 1, (30, 6, 4))
    assert len(train) == 30 and len(valid) >= 6 and test is None
    assert list(valid.documents) == list(range(30))
    with pytest.raises(ConfigError, match="--split .* cannot be combined"):
        build_train_valid_test_datasets(DataConfig(train_data_path=[a], split="90,10,0"), 16, 1, (1, 0, 0))
    with pytest.raises(ConfigError, match="--data-path cannot be combined"):
        build_train_valid_test_datasets(DataConfig(data_path=[a], train_data_path=[a]), 16, 1, (1, 0, 0))
