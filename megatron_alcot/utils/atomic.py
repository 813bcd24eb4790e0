"""Atomic file replacement: write under a temporary name in the target directory, fsync, rename.

    >>> tmp = temp_path_for("out/data.bin")      # 'out/.data.bin.tmp-1234-ab12cd'
    >>> with open(tmp, "wb") as f:
    ...     f.write(b"...")
    >>> commit(tmp, "out/data.bin")              # fsync + rename; readers see old or new, never half

A crash leaves only ``.NAME.tmp-*`` files behind, never a partial file under the final name.
"""
from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from typing import Iterator


def temp_path_for(final_path: str) -> str:
    """A unique hidden temporary name next to ``final_path`` (same filesystem, so rename is atomic)."""
    directory, name = os.path.split(os.path.abspath(final_path))
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")


def fsync_path(path: str) -> None:
    """Flush a closed file's data to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str) -> None:
    """Make a rename inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(temp_path: str, final_path: str) -> None:
    """fsync ``temp_path`` and rename it over ``final_path``."""
    fsync_path(temp_path)
    os.replace(temp_path, final_path)
    fsync_dir(os.path.dirname(os.path.abspath(final_path)))


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@contextmanager
def atomic_output(final_path: str, mode: str = "wb") -> Iterator:
    """Open a temporary file that replaces ``final_path`` only if the block finishes without error.

        >>> with atomic_output("corpus.jsonl", "w") as f:
        ...     f.write('{"text": "hello"}\\n')
    """
    tmp = temp_path_for(final_path)
    encoding = None if "b" in mode else "utf-8"
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
        commit(tmp, final_path)
    except BaseException:
        remove_quietly(tmp)
        raise


@contextmanager
def atomic_directory(final_dir: str) -> Iterator[str]:
    """Build a directory under a temporary name next to ``final_dir`` and move it into place only if
    the block finishes; on any error the temporary directory is removed and ``final_dir`` is
    untouched. An existing ``final_dir`` is replaced (callers refuse it first if they must).

        >>> with atomic_directory("hf_out") as tmp:
        ...     write_everything_into(tmp)
    """
    import shutil
    import tempfile
    parent = os.path.dirname(os.path.abspath(final_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(final_dir) + ".tmp-", dir=parent)
    try:
        yield tmp
        if os.path.exists(final_dir):
            shutil.rmtree(final_dir)
        os.replace(tmp, final_dir)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
