import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest

from megatron_alcot.data.indexed_dataset import (IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError,
                                                 optimal_dtype)
from megatron_reader import read_index, read_sequences

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DOCS = [  # (tokens, sequence lengths)
    ([5, 6, 7, 2], None),
    ([1, 2, 3, 4, 5], [2, 3]),
    ([40000], None),
]


def build(prefix, dtype=np.uint16, buffer_items=1 << 20):
    b = IndexedDatasetBuilder(prefix + ".bin", dtype, buffer_items=buffer_items)
    for tokens, lengths in DOCS:
        b.add_document(tokens, lengths)
    b.add_item([9, 9])
    b.add_item([8])
    b.end_document()
    b.finalize(prefix + ".idx")
    return prefix


EXPECTED_SEQUENCES = [[5, 6, 7, 2], [1, 2], [3, 4, 5], [40000], [9, 9], [8]]


@pytest.mark.parametrize("buffer_items", [1 << 20, 2])  # 2: lengths spill to scratch files
def test_round_trip_with_multi_sequence_documents(tmp_path, buffer_items):
    prefix = build(str(tmp_path / "ds"), buffer_items=buffer_items)
    ds = IndexedDataset(prefix)
    assert len(ds) == 6 and ds.dtype == np.uint16
    assert [ds[i].tolist() for i in range(len(ds))] == EXPECTED_SEQUENCES
    assert ds.sequence_lengths.tolist() == [4, 2, 3, 1, 2, 1]
    assert ds.sequence_pointers.tolist() == [0, 8, 12, 18, 20, 24]
    assert ds.document_indices.tolist() == [0, 1, 3, 4, 6]
    assert [a.tolist() for a in ds[1:4]] == EXPECTED_SEQUENCES[1:4]
    assert ds.get(0, offset=1, length=2).tolist() == [6, 7]
    assert ds.get(2, offset=1).tolist() == [4, 5]
    assert ds[-1].tolist() == [8]
    with pytest.raises(IndexError):
        ds[6]
    with pytest.raises(IndexError):
        ds.get(0, offset=3, length=2)
    assert [ds2.tolist() for ds2 in IndexedDataset(prefix, mmap=False)[0:6]] == EXPECTED_SEQUENCES
    again = pickle.loads(pickle.dumps(ds))
    assert again[4].tolist() == [9, 9]
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]  # no temp or scratch files left


def test_independent_reader_agrees(tmp_path):
    prefix = build(str(tmp_path / "ds"))
    assert read_sequences(prefix) == EXPECTED_SEQUENCES
    assert read_index(prefix + ".idx")["document_indices"] == [0, 1, 3, 4, 6]


def test_tiny_index_bytes_match_the_spec(tmp_path):
    prefix = str(tmp_path / "tiny")
    b = IndexedDatasetBuilder(prefix + ".bin", np.int32)
    b.add_document([7, 8, 9])
    b.add_document([1, 2], lengths=[1, 1])
    b.finalize(prefix + ".idx")
    expected = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + bytes([4]) + struct.pack("<Q", 3)
                + struct.pack("<Q", 3) + struct.pack("<3i", 3, 1, 1) + struct.pack("<3q", 0, 12, 16)
                + struct.pack("<3q", 0, 1, 3))
    assert open(prefix + ".idx", "rb").read() == expected
    assert open(prefix + ".bin", "rb").read() == struct.pack("<5i", 7, 8, 9, 1, 2)


def test_empty_dataset(tmp_path):
    prefix = str(tmp_path / "empty")
    IndexedDatasetBuilder(prefix + ".bin", np.uint16).finalize(prefix + ".idx")
    ds = IndexedDataset(prefix)
    assert len(ds) == 0 and ds.document_indices.tolist() == [0] and ds[0:0] == []


def test_optimal_dtype():
    assert optimal_dtype(32000) == np.uint16 and optimal_dtype(65499) == np.uint16
    assert optimal_dtype(65500) == np.int32 and optimal_dtype(128256) == np.int32


def test_merge_with_add_index(tmp_path):
    a = build(str(tmp_path / "a"))
    b = build(str(tmp_path / "b"))
    out = str(tmp_path / "ab")
    builder = IndexedDatasetBuilder(out + ".bin", np.uint16)
    builder.add_index(a)
    builder.add_index(b)
    builder.finalize(out + ".idx")
    ds = IndexedDataset(out)
    assert [x.tolist() for x in ds[0:len(ds)]] == EXPECTED_SEQUENCES * 2
    assert ds.document_indices.tolist() == [0, 1, 3, 4, 6, 7, 9, 10, 12]


def test_merge_rejects_other_dtype_and_cleans_up(tmp_path):
    a = build(str(tmp_path / "a"), dtype=np.int32)
    out = str(tmp_path / "out")
    with pytest.raises(IndexedDatasetError, match="dtype"):
        with IndexedDatasetBuilder(out + ".bin", np.uint16) as builder:
            builder.add_index(a)
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "a.idx"]


def test_token_that_does_not_fit_dtype(tmp_path):
    with IndexedDatasetBuilder(str(tmp_path / "x.bin"), np.uint16) as b:
        with pytest.raises(IndexedDatasetError, match="does not fit"):
            b.add_document(np.array([70000], dtype=np.int64))


def test_merge_tool_directory_form_and_dtype_error(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    build(str(shards / "s0"))
    build(str(shards / "s1"))
    out = str(tmp_path / "merged")
    tool = os.path.join(ROOT, "tools", "merge_datasets.py")
    r = subprocess.run([sys.executable, tool, "--input", str(shards), "--output-prefix", out],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert read_sequences(out) == EXPECTED_SEQUENCES * 2
    build(str(tmp_path / "wide"), dtype=np.int32)
    r = subprocess.run([sys.executable, tool, "--input", str(shards / "s0"), str(tmp_path / "wide"),
                        "--output-prefix", str(tmp_path / "bad")], capture_output=True, text=True)
    assert r.returncode == 2 and "different token dtypes" in r.stderr
    assert not os.path.exists(str(tmp_path / "bad.idx"))


# ---------------------------------------------------------------------------------- corrupted files
def _corrupt(tmp_path, mutate_idx=None, mutate_bin=None):
    prefix = build(str(tmp_path / "ds"))
    for path, mutate in ((prefix + ".idx", mutate_idx), (prefix + ".bin", mutate_bin)):
        if mutate:
            data = bytearray(open(path, "rb").read())
            open(path, "wb").write(bytes(mutate(data)))
    return prefix


@pytest.mark.parametrize("mutate_idx,mutate_bin,pattern", [
    (lambda d: b"XXIDIDX\x00\x00" + d[9:], None, "not a Megatron index"),
    (lambda d: d[:9] + struct.pack("<Q", 2) + d[17:], None, "version 2"),
    (lambda d: d[:17] + bytes([42]) + d[18:], None, "dtype code 42"),
    (lambda d: d[:-5], None, "truncated"),
    (lambda d: d[:20], None, "truncated"),
    (lambda d: d + b"\x00" * 3, None, "unexpected bytes"),
    (lambda d: d[:34 + 4 * 6] + struct.pack("<q", 2) + d[34 + 4 * 6 + 8:], None, "points to byte"),
    (lambda d: d[:-8] + struct.pack("<q", 5), None, "last document index"),
    (None, lambda d: d[:-2], "does not match its index"),
    (None, lambda d: d + b"\x00\x00", "does not match its index"),
])
def test_bad_files_are_detected_at_open(tmp_path, mutate_idx, mutate_bin, pattern):
    prefix = _corrupt(tmp_path, mutate_idx, mutate_bin)
    with pytest.raises(IndexedDatasetError, match=pattern) as info:
        IndexedDataset(prefix)
    assert str(tmp_path) in str(info.value)  # the message names the file


def test_missing_files(tmp_path):
    with pytest.raises(IndexedDatasetError, match="index file not found"):
        IndexedDataset(str(tmp_path / "nope"))
    with pytest.raises(IndexedDatasetError, match="without the extension"):
        IndexedDataset(str(tmp_path / "nope.bin"))
    prefix = build(str(tmp_path / "ds"))
    os.unlink(prefix + ".bin")
    with pytest.raises(IndexedDatasetError, match="data file not found"):
        IndexedDataset(prefix)


def test_failed_build_leaves_nothing(tmp_path):
    prefix = str(tmp_path / "ds")
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(prefix + ".bin", np.uint16) as b:
            b.add_document([1, 2, 3])
            raise RuntimeError("crash while writing")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- megatron-core oracle
@pytest.fixture(scope="module")
def mcore():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("megatron.core.datasets.indexed_dataset")


def test_megatron_core_reads_our_files(tmp_path, mcore):
    prefix = build(str(tmp_path / "ds"))
    theirs = mcore.IndexedDataset(prefix)
    assert [theirs[i].tolist() for i in range(len(theirs))] == EXPECTED_SEQUENCES
    assert theirs.document_indices.tolist() == [0, 1, 3, 4, 6]
    assert theirs.index.dtype == np.uint16


def test_we_read_megatron_core_files(tmp_path, mcore):
    import torch

    prefix = str(tmp_path / "theirs")
    b = mcore.IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    b.add_document(np.array([1, 2, 3, 4, 5]), [2, 3])
    b.add_item(torch.tensor([70000]))
    b.end_document()
    b.finalize(prefix + ".idx")
    ours = IndexedDataset(prefix)
    assert [x.tolist() for x in ours[0:3]] == [[1, 2], [3, 4, 5], [70000]]
    assert ours.document_indices.tolist() == [0, 2, 3] and ours.dtype == np.int32
    ours_prefix = build(str(tmp_path / "ours"), dtype=np.int32)
    assert open(ours_prefix + ".idx", "rb").read()[:18] == open(prefix + ".idx", "rb").read()[:18]
