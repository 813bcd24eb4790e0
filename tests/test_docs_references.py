"""Every document the repository cites is in the repository, and docs/architecture.md matches the tree.

* A citation ``docs/NAME.md`` (or ``NAME.md`` from inside docs/) names a file that exists, and
  ``docs/NAME.md §N.M`` a numbered section of it (``## N. Title`` / ``### N.M Title``); a bare
  ``§N`` inside a page of docs/ is a section of that page.
* Nothing cites design notes that a clone does not contain.
* Relative markdown links point at files that exist.
* The layout block of docs/architecture.md §1 names every package folder, and every file and folder
  it names exists.
"""
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs")
SKIP_DIRS = {".git", ".venv", "__pycache__", "build", "dist", "quickstart_out", "bench_out", ".pytest_cache"}
TEXT_SUFFIXES = (".py", ".md", ".sh", ".txt", ".yaml", ".yml", ".toml", ".cfg")

SECTION = r"§\s*(\d+(?:\.\d+)*)"
DOC_CITATION = re.compile(r"(?<![\w/.-])((?:docs/)?[\w-]+\.md)\)?\s*" + SECTION + r"|(?<![\w/.-])(docs/[\w-]+\.md)")
BARE_SECTION = re.compile(SECTION)
# Notes that live outside the repository (spelled in pieces so this file does not cite them).
EXTERNAL = re.compile(r"\b" + "DES" + r"IGN\b(?:'s)?|\b" + "refer" + r"ence/\w+\.md")
MD_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
HEADING = re.compile(r"^#{2,6}\s+(\d+(?:\.\d+)*)\.?\s", re.M)


def _text_files():
    for root, dirs, files in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(files):
            if name.endswith(TEXT_SUFFIXES) or name == "Makefile":
                path = os.path.join(root, name)
                if os.path.abspath(path) != os.path.abspath(__file__):
                    yield path


def _lines(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read().splitlines()


def _sections(doc_path):
    with open(doc_path, encoding="utf-8") as f:
        return set(HEADING.findall(f.read()))


def _resolve(name, citing):
    """The cited document: ``docs/x.md`` from the root, ``x.md`` next to the citing page or in docs/."""
    if name.startswith("docs/"):
        return os.path.join(REPO, name)
    for base in (os.path.dirname(citing), DOCS):
        if os.path.exists(os.path.join(base, name)):
            return os.path.join(base, name)
    return None


def _where(path, lineno):
    return f"{os.path.relpath(path, REPO)}:{lineno}"


def test_citations_name_documents_and_sections_that_exist():
    problems = []
    for path in _text_files():
        in_docs = os.path.dirname(path) == DOCS and path.endswith(".md")
        for lineno, line in enumerate(_lines(path), 1):
            for m in EXTERNAL.finditer(line):
                problems.append(f"{_where(path, lineno)}: cites {m.group(0)!r}, which is not in the "
                                "repository; cite a section of docs/method.md, docs/architecture.md or "
                                "docs/data_format.md instead")
            for m in DOC_CITATION.finditer(line):
                name, section = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), None)
                if not name.startswith("docs/") and not in_docs:
                    continue            # a bare NAME.md outside docs/ is not a citation of a page
                doc = _resolve(name, path)
                if doc is None or not os.path.exists(doc):
                    problems.append(f"{_where(path, lineno)}: cites {name}, which does not exist")
                elif section and section not in _sections(doc):
                    problems.append(f"{_where(path, lineno)}: cites {name} §{section}; its numbered "
                                    f"sections are {sorted(_sections(doc))}")
            if in_docs:
                cited = {m.start(2) for m in DOC_CITATION.finditer(line) if m.group(2)}
                for m in BARE_SECTION.finditer(line):
                    if m.start(1) not in cited and m.group(1) not in _sections(path):
                        problems.append(f"{_where(path, lineno)}: §{m.group(1)} is not a numbered "
                                        "section of this page")
    assert not problems, "\n".join(problems)


def test_markdown_links_point_at_files_that_exist():
    problems = []
    for path in _text_files():
        if not path.endswith(".md"):
            continue
        for lineno, line in enumerate(_lines(path), 1):
            for target in MD_LINK.findall(line):
                if re.match(r"[a-z]+:", target):
                    continue            # http:, https:, mailto:
                if not os.path.exists(os.path.join(os.path.dirname(path), target)):
                    problems.append(f"{_where(path, lineno)}: link to {target}, which does not exist")
    assert not problems, "\n".join(problems)


def _layout_entries():
    """Paths named in the code block of docs/architecture.md §1 (two spaces of indent per level)."""
    text = "\n".join(_lines(os.path.join(DOCS, "architecture.md")))
    m = re.search(r"^## 1\. Layout\n.*?^```\n(.*?)^```", text, re.M | re.S)
    assert m, "docs/architecture.md has no '## 1. Layout' section with a code block"
    entries, parents = [], []
    for line in m.group(1).splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        assert indent % 2 == 0, f"layout line {line!r}: indent by two spaces per level"
        name = line.split()[0]
        depth = indent // 2
        assert depth <= len(parents), f"layout line {line!r} is indented deeper than its folder"
        parents = parents[:depth]
        path = "/".join(parents + [name.rstrip("/")])
        entries.append(path)
        if name.endswith("/"):
            parents.append(name.rstrip("/"))
    return entries


def test_architecture_layout_matches_the_tree():
    entries = _layout_entries()
    missing = [e for e in entries if not os.path.exists(os.path.join(REPO, e))]
    assert not missing, f"docs/architecture.md §1 names paths that do not exist: {missing}"
    packages = []
    for root, dirs, files in os.walk(os.path.join(REPO, "megatron_alcot")):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        if any(f.endswith(".py") for f in files):
            packages.append(os.path.relpath(root, REPO).replace(os.sep, "/"))
    unnamed = [p for p in packages if p not in entries]
    assert not unnamed, f"package folders missing from docs/architecture.md §1: {unnamed}"


@pytest.mark.parametrize("page", ["method.md", "architecture.md", "data_format.md"])
def test_cited_pages_number_their_sections(page):
    assert _sections(os.path.join(DOCS, page)), f"docs/{page} has no numbered sections to cite"
