"""Test oracle: reads a Megatron ``.idx/.bin`` pair following the published layout byte by byte.

Written independently of ``megatron_alcot.data.indexed_dataset`` (struct + plain reads, no mmap),
so a shared misreading of the format cannot hide in both. Returns plain Python lists.

    >>> idx = read_index("prefix.idx"); docs = read_sequences("prefix")
"""
import struct

DTYPES = {1: ("B", 1), 2: ("b", 1), 3: ("h", 2), 4: ("i", 4), 5: ("q", 8), 6: ("d", 8), 7: ("f", 4), 8: ("H", 2)}


def read_index(idx_path):
    with open(idx_path, "rb") as f:
        data = f.read()
    assert data[0:9] == b"MMIDIDX\x00\x00", "magic"
    (version,) = struct.unpack_from("<Q", data, 9)
    assert version == 1, "version"
    (code,) = struct.unpack_from("<B", data, 17)
    (seq_count,) = struct.unpack_from("<Q", data, 18)
    (doc_count,) = struct.unpack_from("<Q", data, 26)
    pos = 34
    lengths = list(struct.unpack_from(f"<{seq_count}i", data, pos))
    pos += 4 * seq_count
    pointers = list(struct.unpack_from(f"<{seq_count}q", data, pos))
    pos += 8 * seq_count
    doc_idx = list(struct.unpack_from(f"<{doc_count}q", data, pos))
    pos += 8 * doc_count
    assert pos == len(data), f"{len(data) - pos} trailing bytes"
    assert doc_idx[0] == 0 and doc_idx[-1] == seq_count
    return {"dtype_code": code, "lengths": lengths, "pointers": pointers, "document_indices": doc_idx}


def read_sequences(prefix):
    idx = read_index(prefix + ".idx")
    fmt, size = DTYPES[idx["dtype_code"]]
    with open(prefix + ".bin", "rb") as f:
        data = f.read()
    out = []
    expected_pointer = 0
    for length, pointer in zip(idx["lengths"], idx["pointers"]):
        assert pointer == expected_pointer, "pointers must be the running byte offset"
        out.append(list(struct.unpack_from(f"<{length}{fmt}", data, pointer)))
        expected_pointer += length * size
    assert expected_pointer == len(data), ".bin size"
    return out
