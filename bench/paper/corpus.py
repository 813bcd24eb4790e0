"""The benchmark's English corpus, built from Debian text packages, plus its tokenizer and .bin/.idx.

    docs = build_debian_corpus("out/corpus.jsonl", seed=1234)      # installs packages when missing
    info = prepare_data(ctx_dir, "out/corpus.jsonl", split="98,2,0", vocab_size=8192)
    info["data_prefix"], info["tokenizer_model"], info["train_documents"], info["valid_documents"]

Sources (public domain / GPL / PSF, installed by package name with apt-get when absent): the King
James Bible (``bible-kjv`` + ``bible-kjv-text``), the GCIDE dictionary (``dict-gcide``, read with
``errors="replace"``: it holds a few non-UTF-8 lines), the Linux kernel documentation
(``linux-doc-6.1``, reST ``_sources/*.txt``), the Python 3.11 documentation (``python3.11-doc``)
and Perl's pods (``perl-doc``). A second corpus (``corpus="handbook"``, 5 MB) shares no package
with it: the Debian Administrator's Handbook (``debian-handbook``, English HTML), the fortune
cookie files (``fortunes``) and the Jargon File (``jargon-text``). Each text is cut at blank lines
into paragraphs that are grouped into documents of about ``TARGET_CHARS`` (1-4 KB); the documents of
all sources are shuffled with ``random.Random(seed)``, so the JSONL is the same bytes for the same
installed packages and seed.

The tokenizer is trained on the documents of the training split only: the documents that
``--split`` gives to training, computed with the data package's own split arithmetic, so no
validation text ever reaches the tokenizer.
"""
from __future__ import annotations

import gzip
import json
import os
import random
import re
import shutil
import subprocess
from html.parser import HTMLParser
from typing import Dict, Iterator, List, Tuple

PACKAGES = ("bible-kjv", "bible-kjv-text", "dict-gcide", "linux-doc-6.1", "python3.11-doc", "perl-doc")
HANDBOOK_PACKAGES = ("debian-handbook", "fortunes", "jargon-text")
TARGET_CHARS, MAX_CHARS, MIN_CHARS = 2000, 4000, 300
GCIDE_MAX_CHARS = 16_000_000   # the dictionary alone is 40 MB; cap it so prose and docs dominate


def _installed(package: str) -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return r.returncode == 0 and "install ok installed" in r.stdout


def ensure_packages(packages=PACKAGES, log=print) -> List[str]:
    """apt-get install the packages that are missing; returns the ones that are installed after."""
    missing = [p for p in packages if not _installed(p)]
    if missing:
        log(f"  installing {' '.join(missing)} with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                       env=env, check=False)
    return [p for p in packages if _installed(p)]


def _package_files(package: str, suffix: str, contains: str = "") -> List[str]:
    r = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True)
    return sorted(f for f in r.stdout.splitlines()
                  if f.endswith(suffix) and contains in f and os.path.isfile(f))


def group_paragraphs(text: str, target: int = TARGET_CHARS, max_chars: int = MAX_CHARS) -> Iterator[str]:
    """Cut ``text`` at blank lines and group consecutive paragraphs into ~``target``-char documents.

        list(group_paragraphs("a\\n\\nb", target=1)) == ["a", "b"]
    """
    buf: List[str] = []
    size = 0
    for para in text.replace("\r\n", "\n").split("\n\n"):
        para = para.strip("\n")
        if not para.strip():
            continue
        while len(para) > max_chars:           # one huge paragraph: cut it at a line boundary
            cut = para.rfind("\n", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            if buf:
                yield "\n\n".join(buf)
                buf, size = [], 0
            yield para[:cut]
            para = para[cut:].lstrip("\n")
        buf.append(para)
        size += len(para) + 2
        if size >= target:
            yield "\n\n".join(buf)
            buf, size = [], 0
    if buf:
        yield "\n\n".join(buf)


def _read(path: str) -> str:
    opener = gzip.open if path.endswith((".gz", ".dz")) else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read()


def _kjv_text() -> str:
    if not shutil.which("bible"):
        return ""
    r = subprocess.run(["bible", "gen1:1-rev22:21"], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, errors="replace")
    return r.stdout


def source_texts() -> Iterator[Tuple[str, str]]:
    """``(source, text)`` for every file of every installed source package, in a fixed order."""
    yield "kjv", _kjv_text()
    for path in _package_files("dict-gcide", ".dict.dz"):
        yield "gcide", _read(path)[:GCIDE_MAX_CHARS]
    for package, name in (("linux-doc-6.1", "linux-doc"), ("python3.11-doc", "python-doc")):
        for path in _package_files(package, ".txt", "/_sources/"):
            yield name, _read(path)
    for path in _package_files("perl-doc", ".pod"):
        yield "perl-doc", _read(path)


class _HTMLText(HTMLParser):
    """Visible text of an HTML page, with a blank line at every block element."""

    BLOCKS = {"p", "div", "li", "pre", "h1", "h2", "h3", "h4", "tr", "dt", "dd", "table"}

    def __init__(self):
        super().__init__()
        self.parts: List[str] = []
        self.hidden = 0

    def handle_starttag(self, tag, attrs):
        self.hidden += tag in ("script", "style")
        if tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        self.hidden -= tag in ("script", "style")

    def handle_data(self, data):
        if not self.hidden:
            self.parts.append(data)


def _html_text(path: str) -> str:
    parser = _HTMLText()
    parser.feed(_read(path))
    return re.sub(r"[ \t]+", " ", "".join(parser.parts))


def _fortunes(path: str) -> str:
    # Fortune files separate their entries with lines holding a single "%".
    return "\n\n".join(e.strip("\n") for e in re.split(r"\n%\n", _read(path)) if e.strip())


def handbook_texts() -> Iterator[Tuple[str, str]]:
    """``(source, text)`` of the second corpus: the Debian Administrator's Handbook (English HTML),
    the fortune cookie files and the Jargon File, in a fixed order."""
    for path in _package_files("debian-handbook", ".html", "/html/en-US/"):
        yield "debian-handbook", _html_text(path)
    for path in _package_files("fortunes", "", "/fortunes/"):
        if not path.endswith((".dat", ".u8")) and not os.path.islink(path):
            yield "fortunes", _fortunes(path)
    for path in _package_files("jargon-text", ".txt.gz"):
        yield "jargon", _read(path)


CORPORA = {"debian": (PACKAGES, source_texts), "handbook": (HANDBOOK_PACKAGES, handbook_texts)}


def build_debian_corpus(output: str, seed: int = 1234, install: bool = True, log=print,
                        corpus: str = "debian") -> Dict:
    """Write the shuffled JSONL corpus (``{"text", "source"}`` per line) atomically; returns stats.
    ``corpus``: ``debian`` (the default, 67 MB) or ``handbook`` (5 MB, other packages, other prose)."""
    packages, texts = CORPORA[corpus]
    if install:
        ensure_packages(packages, log=log)
    docs: List[Tuple[str, str]] = []
    for source, text in texts():
        docs.extend((source, d) for d in group_paragraphs(text) if len(d) >= MIN_CHARS)
    if not docs:
        raise RuntimeError("no Debian text package is installed and apt-get could not install any; "
                           f"install {' '.join(packages)} or pass --input corpus.jsonl")
    random.Random(seed).shuffle(docs)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    per_source: Dict[str, int] = {}
    with open(output + ".tmp", "w", encoding="utf-8") as f:
        for source, text in docs:
            f.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
            per_source[source] = per_source.get(source, 0) + len(text.encode("utf-8"))
    os.replace(output + ".tmp", output)
    return {"documents": len(docs), "bytes": os.path.getsize(output), "bytes_per_source": per_source}


def split_document_ranges(split: str, num_documents: int) -> List[Tuple[int, int]]:
    """``[(beg, end)]`` of train/valid/test documents under ``--split`` (the data package's rule)."""
    from megatron_alcot.data.utils import split_matrix, split_range
    return [split_range(b, num_documents) if b is not None else (0, 0) for b in split_matrix(split)]


def write_lines(src: str, dst: str, beg: int, end: int) -> int:
    """Copy lines ``beg..end-1`` of a JSONL file (skipping blank lines) to ``dst``."""
    n = 0
    with open(src, encoding="utf-8") as fin, open(dst + ".tmp", "w", encoding="utf-8") as fout:
        for line in fin:
            if not line.strip():
                continue
            if beg <= n < end:
                fout.write(line)
            n += 1
    os.replace(dst + ".tmp", dst)
    return n


def count_documents(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def prepare_data(out_dir: str, jsonl: str, split: str, vocab_size: int, seed: int = 1234,
                 log=print) -> Dict:
    """Tokenizer (training documents only) and ``{out_dir}/data/corpus_text_document.{bin,idx}``.

    Reuses what is already there (a rerun with the same corpus, split and vocabulary is free)."""
    from megatron_alcot.data import preprocess_data, tokenizer_training
    os.makedirs(os.path.join(out_dir, "data"), exist_ok=True)
    n_docs = count_documents(jsonl)
    (tb, te), (vb, ve), (sb, se) = split_document_ranges(split, n_docs)
    tag = f"v{vocab_size}_s{split.replace(',', '-')}"
    train_jsonl = os.path.join(out_dir, "data", f"tokenizer_train_{tag}.jsonl")
    tok_prefix = os.path.join(out_dir, "data", f"tokenizer_{tag}")
    if not os.path.exists(tok_prefix + ".model"):
        write_lines(jsonl, train_jsonl, tb, te)
        tokenizer_training.train([train_jsonl], tok_prefix, vocab_size, input_sentence_size=300_000,
                                 num_threads=2, seed=seed)
        os.remove(train_jsonl)
    prefix = os.path.join(out_dir, "data", f"corpus_{tag}")
    if not os.path.exists(prefix + "_text_document.idx"):
        code = preprocess_data.main([
            "--input", jsonl, "--output-prefix", prefix, "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", tok_prefix + ".model", "--append-eod", "--workers", "2"])
        if code:
            raise RuntimeError(f"tools/preprocess_data.py failed with exit code {code}")
    from megatron_alcot.data.indexed_dataset import IndexedDataset
    ds = IndexedDataset(prefix + "_text_document")
    if len(ds) != n_docs:
        raise RuntimeError(f"{jsonl} has {n_docs} documents but the .idx has {len(ds)}; the split "
                           "ranges would not match the tokenizer's training documents")
    sizes = ds.sequence_lengths if hasattr(ds, "sequence_lengths") else None
    info = {"data_prefix": prefix + "_text_document", "tokenizer_model": tok_prefix + ".model",
            "documents": n_docs, "train_documents": [tb, te], "valid_documents": [vb, ve],
            "test_documents": [sb, se], "split": split, "vocab_size": vocab_size}
    if sizes is not None:
        import numpy as np
        sizes = np.asarray(sizes, dtype=np.int64)
        info.update(train_tokens=int(sizes[tb:te].sum()), valid_tokens=int(sizes[vb:ve].sum()))
    return info
