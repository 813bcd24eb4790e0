"""Megatron-LM's indexed dataset: ``PREFIX.bin`` (token ids) + ``PREFIX.idx`` (index), byte-compatible.

Writing (atomic: nothing appears under the final names until ``finalize``)::

    builder = IndexedDatasetBuilder("data/corpus_text_document.bin", dtype=optimal_dtype(32000))
    builder.add_document([5, 6, 7, 2])                  # one document = one sequence
    builder.add_document([1, 2, 3, 4, 5], lengths=[2, 3])   # one document made of two sequences
    builder.add_item([9, 9]); builder.add_item([8]); builder.end_document()
    builder.add_index("other_prefix")                   # append a whole dataset (same dtype)
    builder.finalize("data/corpus_text_document.idx")

Reading (memory-mapped; the files are checked for consistency when opened)::

    ds = IndexedDataset("data/corpus_text_document")
    len(ds), ds[0], ds.get(1, offset=1, length=2), ds.sequence_lengths, ds.document_indices

``.idx`` layout (little-endian, no padding): magic ``MMIDIDX\\0\\0`` (9 bytes), version u64 = 1,
dtype code u8, sequence count S u64, document-index count D u64 (documents + 1), then
int32[S] sequence lengths, int64[S] byte pointers into ``.bin``, int64[D] document indices
(starting at 0, ending at S). ``.bin`` is the sequences' tokens back to back in that dtype.
"""
from __future__ import annotations

import os
import shutil
import struct
from typing import Iterable, Optional, Sequence, Union

import numpy

from megatron_alcot.utils.atomic import commit, fsync_path, remove_quietly, temp_path_for
from megatron_alcot.data._spill_array import SpillArray

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_SIZE = len(INDEX_MAGIC) + 8 + 1 + 8 + 8  # 34 bytes; the arrays follow immediately

DTYPE_CODES = {
    1: numpy.uint8,
    2: numpy.int8,
    3: numpy.int16,
    4: numpy.int32,
    5: numpy.int64,
    6: numpy.float64,
    7: numpy.float32,
    8: numpy.uint16,
}
_CODE_OF_DTYPE = {numpy.dtype(v): k for k, v in DTYPE_CODES.items()}


class IndexedDatasetError(ValueError):
    """A .bin/.idx pair is missing, malformed or inconsistent. The message names the file."""


def optimal_dtype(vocab_size: Optional[int]):
    """Token dtype Megatron uses for a vocabulary: uint16 below 65500 ids, else int32.

    >>> optimal_dtype(32000), optimal_dtype(128256)
    (<class 'numpy.uint16'>, <class 'numpy.int32'>)
    """
    if vocab_size is not None and vocab_size < 65500:
        return numpy.uint16
    return numpy.int32


def dtype_code(dtype) -> int:
    """The .idx code of a numpy dtype (8 for uint16, 4 for int32, ...)."""
    try:
        return _CODE_OF_DTYPE[numpy.dtype(dtype)]
    except KeyError:
        raise IndexedDatasetError(
            f"dtype {numpy.dtype(dtype)} cannot be stored in a Megatron .idx; use one of "
            f"{', '.join(str(numpy.dtype(d)) for d in DTYPE_CODES.values())}") from None


def get_idx_path(path_prefix: str) -> str:
    return path_prefix + ".idx"


def get_bin_path(path_prefix: str) -> str:
    return path_prefix + ".bin"


def _prefix_hint(path_prefix: str) -> str:
    if path_prefix.endswith((".bin", ".idx")):
        return f"; pass the prefix without the extension ({path_prefix[:-4]!r})"
    return ""


# --------------------------------------------------------------------------------------------- reader
class _Index:
    """Parsed and checked ``.idx``: the three arrays are views of a read-only memory map."""

    def __init__(self, idx_path: str, multimodal: bool = False) -> None:
        self.path = idx_path
        try:
            file_size = os.path.getsize(idx_path)
            with open(idx_path, "rb") as f:
                header = f.read(HEADER_SIZE)
        except FileNotFoundError:
            raise IndexedDatasetError(f"{idx_path}: index file not found{_prefix_hint(idx_path[:-4])}") from None
        except OSError as e:
            raise IndexedDatasetError(f"{idx_path}: cannot read index file ({e.strerror})") from None

        if len(header) < HEADER_SIZE and INDEX_MAGIC.startswith(header[: len(INDEX_MAGIC)]):
            raise IndexedDatasetError(
                f"{idx_path}: truncated index: {file_size} bytes, shorter than the {HEADER_SIZE}-byte header; "
                "rebuild it with tools/preprocess_data.py")
        if header[: len(INDEX_MAGIC)] != INDEX_MAGIC:
            raise IndexedDatasetError(
                f"{idx_path}: not a Megatron index file (magic {header[:9]!r}, expected {INDEX_MAGIC!r}); "
                "was it written by tools/preprocess_data.py?")
        version, code, seq_count, doc_count = struct.unpack("<QBQQ", header[len(INDEX_MAGIC):])
        if version != INDEX_VERSION:
            raise IndexedDatasetError(
                f"{idx_path}: index version {version} is not supported (only version {INDEX_VERSION})")
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(
                f"{idx_path}: unknown token dtype code {code} in the header "
                f"(known codes: {sorted(DTYPE_CODES)}); the file is corrupted")
        self.dtype = DTYPE_CODES[code]
        self.dtype_code = code
        self.sequence_count = seq_count
        self.document_count = doc_count

        expected = HEADER_SIZE + 12 * seq_count + 8 * doc_count
        modes_size = seq_count if multimodal else 0
        if file_size < expected + modes_size:
            raise IndexedDatasetError(
                f"{idx_path}: truncated or corrupted index: the header announces {seq_count} sequences and "
                f"{doc_count} document indices ({expected + modes_size} bytes) but the file has {file_size} "
                "bytes; rebuild it")
        if file_size != expected + modes_size and not (not multimodal and file_size == expected + seq_count):
            raise IndexedDatasetError(
                f"{idx_path}: corrupted index: {file_size - expected - modes_size} unexpected bytes after "
                f"the arrays (expected {expected + modes_size} bytes in all)")

        if file_size:
            self._mmap = numpy.memmap(idx_path, mode="r", dtype=numpy.uint8)
            buf = memoryview(self._mmap)
        else:  # pragma: no cover - caught above
            buf = memoryview(b"")
        offset = HEADER_SIZE
        self.sequence_lengths = numpy.frombuffer(buf, numpy.int32, seq_count, offset)
        offset += 4 * seq_count
        self.sequence_pointers = numpy.frombuffer(buf, numpy.int64, seq_count, offset)
        offset += 8 * seq_count
        self.document_indices = numpy.frombuffer(buf, numpy.int64, doc_count, offset)
        offset += 8 * doc_count
        self.sequence_modes = numpy.frombuffer(buf, numpy.int8, seq_count, offset) if multimodal else None
        self._check_arrays()

    def _check_arrays(self) -> None:
        path, s = self.path, self.sequence_count
        docs = self.document_indices
        if self.document_count < 1 or docs[0] != 0:
            raise IndexedDatasetError(f"{path}: corrupted index: document indices must start with 0")
        if docs[-1] != s:
            raise IndexedDatasetError(
                f"{path}: corrupted index: the last document index is {int(docs[-1])} but there are {s} "
                "sequences")
        if self.document_count > 1 and (numpy.diff(docs) < 0).any():
            raise IndexedDatasetError(f"{path}: corrupted index: document indices are not increasing")
        if s and (self.sequence_lengths < 0).any():
            raise IndexedDatasetError(f"{path}: corrupted index: negative sequence length")
        if s:
            itemsize = numpy.dtype(self.dtype).itemsize
            expected = numpy.zeros(s, dtype=numpy.int64)
            numpy.cumsum(self.sequence_lengths[:-1], out=expected[1:])
            expected *= itemsize
            if not numpy.array_equal(expected, self.sequence_pointers):
                bad = int(numpy.flatnonzero(expected != self.sequence_pointers)[0])
                raise IndexedDatasetError(
                    f"{path}: corrupted index: sequence {bad} points to byte {int(self.sequence_pointers[bad])} "
                    f"but the lengths before it put it at byte {int(expected[bad])}")

    @property
    def bin_size(self) -> int:
        """Bytes the .bin must hold according to this index."""
        if not self.sequence_count:
            return 0
        itemsize = numpy.dtype(self.dtype).itemsize
        return int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * itemsize


class IndexedDataset:
    """Memory-mapped reader of a ``PREFIX.bin``/``PREFIX.idx`` pair; item ``i`` is sequence ``i``.

        >>> ds = IndexedDataset("data/corpus_text_document")     # prefix, no extension
        >>> ds[0]                         # numpy view of the tokens of sequence 0
        >>> ds[2:5]                       # list of arrays
        >>> ds.get(0, offset=10, length=129)
        >>> ds.sequence_lengths, ds.sequence_pointers, ds.document_indices, ds.dtype

    Raises IndexedDatasetError naming the file when either file is missing, has a wrong magic,
    version or dtype code, is truncated, or when the .bin size disagrees with the index.
    Pickling re-opens the files (for DataLoader workers).
    """

    def __init__(self, path_prefix: str, mmap: bool = True, multimodal: bool = False) -> None:
        self._open(path_prefix, mmap, multimodal)

    def _open(self, path_prefix: str, mmap: bool, multimodal: bool) -> None:
        self.path_prefix = path_prefix
        self.mmap = mmap
        self.multimodal = multimodal
        self.index = _Index(get_idx_path(path_prefix), multimodal)
        bin_path = get_bin_path(path_prefix)
        try:
            bin_size = os.path.getsize(bin_path)
        except FileNotFoundError:
            raise IndexedDatasetError(
                f"{bin_path}: data file not found (its index {get_idx_path(path_prefix)} exists); "
                "the dataset is incomplete, rebuild it") from None
        if bin_size != self.index.bin_size:
            raise IndexedDatasetError(
                f"{bin_path}: size {bin_size} bytes does not match its index, which needs "
                f"{self.index.bin_size} bytes ({self.index.sequence_count} sequences of "
                f"{numpy.dtype(self.index.dtype)}); the file is truncated or belongs to another index")
        self._bin_path = bin_path
        self._bin = None
        if mmap and bin_size:
            self._bin = numpy.memmap(bin_path, mode="r", dtype=numpy.uint8)

    def __getstate__(self):
        return (self.path_prefix, self.mmap, self.multimodal)

    def __setstate__(self, state) -> None:
        self._open(*state)

    # -- sizes and arrays
    def __len__(self) -> int:
        return self.index.sequence_count

    @property
    def dtype(self):
        return self.index.dtype

    @property
    def sequence_lengths(self) -> numpy.ndarray:
        return self.index.sequence_lengths

    @property
    def sequence_pointers(self) -> numpy.ndarray:
        return self.index.sequence_pointers

    @property
    def document_indices(self) -> numpy.ndarray:
        return self.index.document_indices

    @property
    def sequence_modes(self) -> Optional[numpy.ndarray]:
        return self.index.sequence_modes

    # -- reading
    def _read(self, count: int, byte_offset: int) -> numpy.ndarray:
        if count == 0:
            return numpy.empty(0, dtype=self.dtype)
        if self._bin is not None:
            return numpy.frombuffer(memoryview(self._bin), self.dtype, count, byte_offset)
        nbytes = count * numpy.dtype(self.dtype).itemsize
        with open(self._bin_path, "rb") as f:
            data = os.pread(f.fileno(), nbytes, byte_offset)
        return numpy.frombuffer(data, self.dtype, count)

    def _check_index(self, idx: int) -> int:
        n = len(self)
        i = int(idx)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {idx} out of range for {self.path_prefix} ({n} sequences)")
        return i

    def __getitem__(self, idx: Union[int, numpy.integer, slice]):
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("slices of an IndexedDataset must be contiguous (step 1)")
            if stop <= start:
                return []
            lengths = self.sequence_lengths[start:stop]
            flat = self._read(int(lengths.sum()), int(self.sequence_pointers[start]))
            return numpy.split(flat, numpy.cumsum(lengths)[:-1])
        if isinstance(idx, (int, numpy.integer)):
            i = self._check_index(idx)
            return self._read(int(self.sequence_lengths[i]), int(self.sequence_pointers[i]))
        raise TypeError(f"index must be an int or a slice, got {type(idx).__name__}")

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> numpy.ndarray:
        """Tokens ``offset : offset+length`` of sequence ``idx`` (to its end when length is None)."""
        i = self._check_index(idx)
        seq_len = int(self.sequence_lengths[i])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence {i} "
                             f"of length {seq_len} in {self.path_prefix}")
        itemsize = numpy.dtype(self.dtype).itemsize
        return self._read(length, int(self.sequence_pointers[i]) + offset * itemsize)

    @staticmethod
    def exists(path_prefix: str) -> bool:
        return os.path.isfile(get_idx_path(path_prefix)) and os.path.isfile(get_bin_path(path_prefix))


# --------------------------------------------------------------------------------------------- writer
class IndexedDatasetBuilder:
    """Writes a dataset under temporary names; ``finalize(idx_path)`` renames both files into place.

    Memory stays bounded: sequence lengths and document boundaries spill to scratch files next to
    the output once they pass ``buffer_items`` entries. Use it as a context manager to delete the
    temporary files if anything fails before ``finalize``::

        with IndexedDatasetBuilder("out.bin", numpy.uint16) as b:
            b.add_document(tokens)
            b.finalize("out.idx")
    """

    def __init__(self, bin_path: str, dtype=numpy.int32, buffer_items: int = 1 << 20) -> None:
        self.dtype = numpy.dtype(dtype).type
        self._code = dtype_code(dtype)
        self.bin_path = bin_path
        self._bin_tmp = temp_path_for(bin_path)
        self._data_file = open(self._bin_tmp, "wb", buffering=1 << 20)
        self._lengths = SpillArray(numpy.int32, self._bin_tmp + ".lengths", buffer_items)
        self._doc_ends = SpillArray(numpy.int64, self._bin_tmp + ".docs", buffer_items)
        self._open_document = False
        self._finished = False

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._finished:
            self.abort()

    @property
    def num_sequences(self) -> int:
        return len(self._lengths)

    @property
    def num_documents(self) -> int:
        return len(self._doc_ends)

    def _as_tokens(self, tokens) -> numpy.ndarray:
        arr = numpy.asarray(tokens)
        if arr.dtype != self.dtype:
            if arr.size and arr.dtype.kind in "iu":
                info = numpy.iinfo(self.dtype)
                lo, hi = int(arr.min()), int(arr.max())
                if lo < info.min or hi > info.max:
                    raise IndexedDatasetError(
                        f"{self.bin_path}: token id {hi if hi > info.max else lo} does not fit the dataset "
                        f"dtype {numpy.dtype(self.dtype)}; build it with optimal_dtype(vocab_size)")
            arr = arr.astype(self.dtype)
        return arr.reshape(-1)

    def add_item(self, tokens: Iterable[int]) -> None:
        """Append one sequence to the current document; close it with ``end_document()``."""
        arr = self._as_tokens(tokens)
        self._data_file.write(arr.tobytes())
        self._lengths.append(arr.size)
        self._open_document = True

    def end_document(self) -> None:
        self._doc_ends.append(len(self._lengths))
        self._open_document = False

    def add_document(self, tokens: Iterable[int], lengths: Optional[Sequence[int]] = None) -> None:
        """Append one document; ``lengths`` splits it into sequences (default: a single sequence)."""
        arr = self._as_tokens(tokens)
        lengths = [arr.size] if lengths is None else list(lengths)
        if sum(lengths) != arr.size:
            raise IndexedDatasetError(f"sequence lengths {lengths} do not add up to the {arr.size} tokens given")
        self._data_file.write(arr.tobytes())
        self._lengths.extend(lengths)
        self._doc_ends.append(len(self._lengths))

    def add_documents(self, tokens: numpy.ndarray, sequence_lengths: numpy.ndarray,
                      sequences_per_document: Optional[numpy.ndarray] = None) -> None:
        """Bulk append: many sequences at once, one per document unless ``sequences_per_document``."""
        arr = self._as_tokens(tokens)
        sequence_lengths = numpy.asarray(sequence_lengths, dtype=numpy.int64)
        if int(sequence_lengths.sum()) != arr.size:
            raise IndexedDatasetError("sequence lengths do not add up to the number of tokens given")
        base = len(self._lengths)
        if sequences_per_document is None:
            ends = base + numpy.arange(1, sequence_lengths.size + 1, dtype=numpy.int64)
        else:
            ends = base + numpy.cumsum(numpy.asarray(sequences_per_document, dtype=numpy.int64))
        self._data_file.write(arr.tobytes())
        self._lengths.extend(sequence_lengths)
        self._doc_ends.extend(ends)

    def add_index(self, path_prefix: str) -> None:
        """Append every document of the dataset at ``path_prefix`` (its dtype must match)."""
        other = IndexedDataset(path_prefix)
        if numpy.dtype(other.dtype) != numpy.dtype(self.dtype):
            raise IndexedDatasetError(
                f"{get_idx_path(path_prefix)}: token dtype {numpy.dtype(other.dtype)} differs from the dataset "
                f"being built ({numpy.dtype(self.dtype)}); datasets can only be merged when their dtypes agree")
        offset = len(self._lengths)
        step = 1 << 20
        for start in range(0, len(other), step):
            self._lengths.extend(other.sequence_lengths[start:start + step])
        docs = other.document_indices
        for start in range(1, docs.size, step):
            self._doc_ends.extend(docs[start:start + step] + offset)
        del other
        self._data_file.flush()
        with open(get_bin_path(path_prefix), "rb") as src:
            shutil.copyfileobj(src, self._data_file, 16 << 20)

    def finalize(self, idx_path: str) -> None:
        """Write the index and move ``.bin`` and ``.idx`` to their final names (bin first)."""
        if self._open_document:
            raise IndexedDatasetError("add_item() was called without a closing end_document()")
        idx_tmp = temp_path_for(idx_path)
        try:
            self._data_file.close()
            with open(idx_tmp, "wb", buffering=1 << 20) as f:
                self._write_index(f)
            fsync_path(self._bin_tmp)
            commit(self._bin_tmp, self.bin_path)
            commit(idx_tmp, idx_path)
        except BaseException:
            remove_quietly(idx_tmp)
            self.abort()
            raise
        self._finished = True
        self._lengths.close()
        self._doc_ends.close()

    def _write_index(self, f) -> None:
        s, d = len(self._lengths), len(self._doc_ends) + 1
        f.write(INDEX_MAGIC)
        f.write(struct.pack("<QBQQ", INDEX_VERSION, self._code, s, d))
        for chunk in self._lengths.chunks():
            f.write(chunk.astype("<i4", copy=False).tobytes())
        itemsize = numpy.dtype(self.dtype).itemsize
        position = 0
        for chunk in self._lengths.chunks():
            pointers = numpy.empty(chunk.size, dtype=numpy.int64)
            pointers[0] = 0
            numpy.cumsum(chunk[:-1], dtype=numpy.int64, out=pointers[1:])
            pointers = pointers * itemsize + position
            position += int(chunk.sum(dtype=numpy.int64)) * itemsize
            f.write(pointers.astype("<i8", copy=False).tobytes())
        f.write(struct.pack("<q", 0))
        for chunk in self._doc_ends.chunks():
            f.write(chunk.astype("<i8", copy=False).tobytes())

    def abort(self) -> None:
        """Delete everything written so far (safe to call twice)."""
        if self._finished:
            return
        self._finished = True
        try:
            self._data_file.close()
        finally:
            remove_quietly(self._bin_tmp)
            self._lengths.close()
            self._doc_ends.close()
