"""The embedded default corpus: English text that every Python installation carries.

Sources, in this order: the ``pydoc_data.topics`` help topics (sorted by name), then the
docstrings of the standard library's public modules and of the classes, functions and methods
they define (modules sorted by dotted name, members by name). Texts are cleaned with
``inspect.cleandoc``, kept if at least ``min_chars`` long, and de-duplicated (first occurrence
wins). The output is one JSON object per line, ``{"text": ...}``, about 1.7 MB with Python 3.11.

    >>> write_corpus("corpus.jsonl")                   # runs in a fresh interpreter, atomic write
    CorpusStats(documents=..., bytes=...)
    $ python tools/build_corpus.py --output corpus.jsonl

Determinism: the bytes depend only on the Python version and its standard library files, not on
hash seeds or import timing; a distribution that strips modules (e.g. no ``tkinter``) gives a
slightly different corpus. Modules are imported in a child interpreter so that the caller's
process does not pick up their side effects.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from typing import Iterator, List

from megatron_alcot.utils.atomic import atomic_output

# Never imported: GUIs, modules that print/open a browser/write files on import, the test suite,
# modules whose import depends on the environment (distutils may be replaced by setuptools).
SKIPPED_MODULES = frozenset({
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3",
    "distutils", "readline", "rlcompleter", "ensurepip", "pydoc_data", "__main__", "site",
    "sitecustomize", "usercustomize", "encodings", "venv", "pip", "setuptools", "_distutils_hack",
})
MIN_CHARS = 120


@dataclass
class CorpusStats:
    documents: int
    bytes: int


def _stdlib_module_names() -> List[str]:
    """Public top-level standard-library modules and their public submodules, sorted."""
    names = set()
    for top in sorted(getattr(sys, "stdlib_module_names", ())):
        if top.startswith("_") or top in SKIPPED_MODULES:
            continue
        names.add(top)
        module = _import_quietly(top)
        path = getattr(module, "__path__", None)
        if not path:
            continue
        for info in pkgutil.walk_packages(path, prefix=top + ".", onerror=lambda name: None):
            parts = info.name.split(".")
            if any(p.startswith("_") or p in ("test", "tests", "idle_test") for p in parts[1:]):
                continue
            names.add(info.name)
    return sorted(names)


def _import_quietly(name: str):
    """Import a module with its output and warnings swallowed; None when it cannot be imported."""
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except BaseException:  # ImportError, SystemExit, platform errors: skip the module
        return None


def _docstring(obj) -> str:
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def _module_texts(module) -> Iterator[str]:
    yield _docstring(module)
    for attr in sorted(vars(module)):
        if attr.startswith("_"):
            continue
        obj = vars(module)[attr]
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        yield _docstring(obj)
        if inspect.isclass(obj):
            for member in sorted(vars(obj)):
                if member.startswith("_") and member != "__init__":
                    continue
                value = vars(obj)[member]
                if isinstance(value, (staticmethod, classmethod)):
                    value = value.__func__
                if inspect.isroutine(value) or inspect.isdatadescriptor(value):
                    yield _docstring(value)


def iter_corpus_texts(min_chars: int = MIN_CHARS) -> Iterator[str]:
    """Yield the corpus documents in their fixed order (imports standard-library modules)."""
    seen = set()

    def keep(text: str) -> bool:
        text_key = text.strip()
        if len(text_key) < min_chars or text_key in seen:
            return False
        seen.add(text_key)
        return True

    import pydoc_data.topics

    for key in sorted(pydoc_data.topics.topics):
        text = pydoc_data.topics.topics[key].strip("\n")
        if keep(text):
            yield text
    for name in _stdlib_module_names():
        module = _import_quietly(name)
        if module is None:
            continue
        for text in _module_texts(module):
            if keep(text):
                yield text


def write_corpus_here(output: str, min_chars: int = MIN_CHARS) -> CorpusStats:
    """Collect in this process and write ``output`` atomically (see ``write_corpus``)."""
    docs = size = 0
    with atomic_output(output, "wb") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for text in iter_corpus_texts(min_chars):
            line = json.dumps({"text": text}, ensure_ascii=False).encode("utf-8") + b"\n"
            f.write(line)
            docs += 1
            size += len(line)
    return CorpusStats(docs, size)


def write_corpus(output: str, min_chars: int = MIN_CHARS) -> CorpusStats:
    """Build the corpus into ``output`` (JSONL) using a fresh child interpreter; returns its size."""
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    python_path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=python_path)
    cmd = [sys.executable, "-m", "megatron_alcot.data.corpus", "--output", output, "--min-chars", str(min_chars)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the corpus into {output} failed:\n{result.stderr.strip()}")
    return CorpusStats(*json.loads(result.stdout.strip().splitlines()[-1]))


def ensure_corpus(output: str) -> str:
    """Build the corpus at ``output`` unless a file is already there; returns the path."""
    if not os.path.exists(output):
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        write_corpus(output)
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Collect the embedded corpus (run in a fresh interpreter).")
    parser.add_argument("--output", required=True)
    parser.add_argument("--min-chars", type=int, default=MIN_CHARS)
    args = parser.parse_args(argv)
    stats = write_corpus_here(args.output, args.min_chars)
    print(json.dumps([stats.documents, stats.bytes]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
