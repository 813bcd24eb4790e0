"""An append-only integer array that keeps at most ``buffer_items`` in memory and spills the rest
to a scratch file, so that index building uses bounded memory however many sequences there are.

    >>> arr = SpillArray(numpy.int32, "/tmp/x.lengths", buffer_items=4)
    >>> arr.extend(numpy.arange(10)); len(arr)
    10
    >>> numpy.concatenate(list(arr.chunks()))
    array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], dtype=int32)
    >>> arr.close()                                   # deletes the scratch file
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy


class SpillArray:
    def __init__(self, dtype, scratch_path: str, buffer_items: int = 1 << 20) -> None:
        self.dtype = numpy.dtype(dtype)
        self.scratch_path = scratch_path
        self.buffer_items = buffer_items
        self._parts: list[numpy.ndarray] = []
        self._buffered = 0
        self._spilled = 0
        self._file = None

    def __len__(self) -> int:
        return self._spilled + self._buffered

    def append(self, value: int) -> None:
        self.extend(numpy.asarray([value], dtype=self.dtype))

    def extend(self, values) -> None:
        values = numpy.asarray(values, dtype=self.dtype)
        if values.size == 0:
            return
        self._parts.append(values.copy() if values.base is not None else values)
        self._buffered += values.size
        if self._buffered >= self.buffer_items:
            self._spill()

    def _spill(self) -> None:
        if self._file is None:
            self._file = open(self.scratch_path, "w+b")
        for part in self._parts:
            self._file.write(part.tobytes())
        self._spilled += self._buffered
        self._parts, self._buffered = [], 0

    def chunks(self, chunk_items: int = 1 << 20) -> Iterator[numpy.ndarray]:
        """Yield the contents in order, at most ``chunk_items`` spilled items at a time."""
        if self._file is not None:
            self._file.flush()
            itemsize = self.dtype.itemsize
            self._file.seek(0)
            remaining = self._spilled
            while remaining:
                n = min(chunk_items, remaining)
                data = self._file.read(n * itemsize)
                yield numpy.frombuffer(data, dtype=self.dtype)
                remaining -= n
            self._file.seek(0, os.SEEK_END)
        yield from self._parts

    def close(self) -> None:
        """Drop the contents and delete the scratch file."""
        if self._file is not None:
            self._file.close()
            self._file = None
            try:
                os.unlink(self.scratch_path)
            except FileNotFoundError:
                pass
        self._parts, self._buffered, self._spilled = [], 0, 0
