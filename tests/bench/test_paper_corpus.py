"""The paper bench's corpus builders: HTML and fortune-file extraction, paragraph grouping, and a
JSONL that is the same bytes for the same sources and seed."""
import json

from bench.paper import corpus


def test_html_text_keeps_visible_text_with_block_breaks(tmp_path):
    page = tmp_path / "p.html"
    page.write_text("<html><head><style>p {color: red}</style><script>var x = 1;</script></head>"
                    "<body><h1>Title</h1><p>First   paragraph.</p><div>Second <b>bold</b> one.</div></body></html>")
    text = corpus._html_text(str(page))
    paras = [p.strip() for p in text.split("\n\n") if p.strip()]
    assert paras == ["Title", "First paragraph.", "Second bold one."]


def test_fortunes_split_at_percent_lines(tmp_path):
    f = tmp_path / "fortunes"
    f.write_text("A saying.\n%\nTwo\nlines.\n%\n\n%\nLast one.\n")
    assert corpus._fortunes(str(f)).split("\n\n") == ["A saying.", "Two\nlines.", "Last one."]


def test_group_paragraphs_targets_size_and_cuts_huge_paragraphs():
    docs = list(corpus.group_paragraphs("a" * 10 + "\n\n" + "b" * 10 + "\n\n" + "c" * 10, target=15))
    assert docs == ["a" * 10 + "\n\n" + "b" * 10, "c" * 10]
    huge = "\n".join(["x" * 30] * 10)
    parts = list(corpus.group_paragraphs(huge, target=10, max_chars=100))
    assert all(len(p) <= 100 for p in parts) and "".join(parts).replace("\n", "") == "x" * 300


def test_build_corpus_is_deterministic(tmp_path, monkeypatch):
    texts = [("one", "\n\n".join(f"paragraph {i} " + "w" * 400 for i in range(6))),
             ("two", "\n\n".join(f"entry {i} " + "v" * 400 for i in range(6)))]
    monkeypatch.setitem(corpus.CORPORA, "handbook", ((), lambda: iter(texts)))
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    stats = corpus.build_debian_corpus(str(a), seed=3, install=False, corpus="handbook")
    corpus.build_debian_corpus(str(b), seed=3, install=False, corpus="handbook")
    assert a.read_bytes() == b.read_bytes()
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    assert stats["documents"] == len(rows) and {r["source"] for r in rows} == {"one", "two"}


def test_each_corpus_gets_its_own_runs_and_pages():
    from bench.paper_table import ROOT, build_parser, resolve_dirs

    def dirs(*argv):
        opts = build_parser().parse_args(list(argv))
        resolve_dirs(opts)
        return opts.output_dir, opts.docs_dir

    default = dirs()
    assert default == (f"{ROOT}/bench_out/paper", f"{ROOT}/docs")
    handbook = dirs("--corpus", "handbook")
    assert handbook == (f"{ROOT}/bench_out/paper_handbook", f"{ROOT}/docs/paper_table_handbook")
    mine = dirs("--input", "/data/mine.jsonl")
    assert mine == (f"{ROOT}/bench_out/paper_mine", f"{ROOT}/bench_out/paper_mine/docs")
    assert dirs("--input", "x.jsonl", "--output-dir", "o", "--docs-dir", "d") == ("o", "d")
