"""Smoke run of bench/paper_table.py on a tiny corpus, and the analysis functions against
scipy / hand-computed values."""
import importlib.util
import json
import math
import os
import random
import re
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from bench.paper import analysis  # noqa: E402

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which "
         "but have an they you were her she there been one all we their has would when if so no will "
         "river stone light under small house garden winter morning letter number system kernel file "
         "memory thread value return module function class object method list string table").split()


def _tiny_corpus(path, docs=160, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(docs):
            paras = []
            for _ in range(rng.randint(2, 5)):
                sent = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))).capitalize() + "."
                        for _ in range(rng.randint(2, 6))]
                paras.append(" ".join(sent))
            f.write(json.dumps({"text": "\n\n".join(paras)}) + "\n")


def _paper_table():
    spec = importlib.util.spec_from_file_location("paper_table", os.path.join(ROOT, "bench", "paper_table.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tables(md: str) -> str:
    return md.split("## Run record")[0]


def test_smoke_pipeline_report_comes_from_results_and_is_deterministic(tmp_path):
    corpus = tmp_path / "tiny.jsonl"
    _tiny_corpus(corpus)
    main = _paper_table().main
    common = ["--preset", "smoke", "--input", str(corpus), "--split", "90,10,0", "--jobs", "1",
              "--methods", "vanilla", "alcot3", "--seed", "3", "--vocab-size", "512"]
    assert main(common + ["--output-dir", str(tmp_path / "a"), "--docs-dir", str(tmp_path / "docs_a")]) == 0
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    md = (tmp_path / "docs_a" / "paper_table.md").read_text()
    for name in ("vanilla", "alcot3"):
        rec = results["runs"][name]
        assert f"| {rec['valid_ppl']:.2f} |" in md            # the table prints the recorded number
        assert rec["train_flops"] > 0 and rec["tokens_seen"] == 6 * 4 * 32
    assert results["runs"]["alcot3"]["train_flops"] > results["runs"]["vanilla"]["train_flops"]
    assert set(results["sweep"]) == {"alcot3", "sweep_l0.3_b1"}
    rho = results["difficulty"]["spearman_steps_vs_vanilla_loss"]
    assert rho is None or math.isnan(rho) or -1 <= rho <= 1
    for png in ("ppl_vs_flops", "gap_over_training", "depth_histograms", "sweep", "difficulty"):
        assert (tmp_path / "docs_a" / f"paper_{png}.png").stat().st_size > 1000
    # Validation documents are the tail of the split; the tokenizer never saw them.
    assert results["data"]["valid_documents"] == [144, 160]
    # Same seed, fresh runs -> the same tables.
    assert main(common + ["--output-dir", str(tmp_path / "b"), "--docs-dir", str(tmp_path / "docs_b")]) == 0
    assert _tables((tmp_path / "docs_b" / "paper_table.md").read_text()) == _tables(md)


def test_spearman_against_hand_computed_and_scipy():
    # Ranks of y with a tie: [1, 2, 3.5, 5, 3.5]; Pearson of ranks = 8 / sqrt(10 * 9.5).
    rho, p, n = analysis.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7])
    assert n == 5 and rho == pytest.approx(8 / math.sqrt(95), abs=1e-12)
    from scipy.stats import spearmanr
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, 500)                               # many ties, like latent steps
    y = rng.normal(size=500) + 0.3 * x
    y[::50] = np.nan                                          # non-finite pairs are dropped
    keep = np.isfinite(y)
    ref = spearmanr(x[keep], y[keep])
    rho, p, n = analysis.spearman(x, y)
    assert n == keep.sum() and rho == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    assert math.isnan(analysis.spearman([1, 1, 1], [1, 2, 3])[0])   # constant input: undefined


def test_binning_and_histogram_by_hand():
    rows = analysis.binned_mean([0.0, 0.05, 0.5, 0.99, 1.0], [3, 2, 1, 0, 1], edges=(0, 0.1, 0.6, 1.0))
    assert rows[0] == (0, 0.1, 2, 2.5)
    assert rows[1] == (0.1, 0.6, 1, 1.0)
    assert rows[2] == (0.6, 1.0, 2, 0.5)                       # the last bin includes 1.0
    empty = analysis.binned_mean([0.5], [1], edges=(0, 0.1, 1))
    assert empty[0][2] == 0 and math.isnan(empty[0][3])
    hist = analysis.depth_histogram([0, 1, 1, 3, 2], [1, 1, 1, 1, 0], max_steps=3)
    assert hist == [0.25, 0.5, 0.0, 0.25]


def test_difficulty_analysis_monotone_and_mismatch():
    loss = np.array([0.1, 0.5, 1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    steps = np.array([0, 0, 1, 2, 3, 3], dtype=np.int16)
    mask = np.ones(6, dtype=np.float32)
    labels = np.arange(6, dtype=np.int32)
    alcot = {"loss": loss * 1.1, "steps": steps, "mask": mask, "labels": labels}
    vanilla = {"loss": loss, "steps": np.zeros(6, np.int16), "mask": mask, "labels": labels}
    d = analysis.difficulty_analysis(alcot, vanilla, edges=(0, 0.5, 1.0))
    assert d["tokens"] == 6 and d["spearman_steps_vs_vanilla_loss"] == pytest.approx(
        analysis.spearman(steps, loss)[0]) and d["spearman_steps_vs_vanilla_loss"] > 0.9
    low = np.exp(-loss) < 0.5                                  # p(target) < 0.5 -> the hard tokens
    assert d["bins_vanilla_prob"][0][2] == low.sum()
    assert d["bins_vanilla_prob"][0][3] == pytest.approx(steps[low].mean())
    with pytest.raises(ValueError, match="differ"):
        analysis.difficulty_analysis(dict(alcot, labels=labels[::-1].copy()), vanilla)


def test_report_marks_a_loss_for_alcot():
    from bench.paper import report
    runs = {"vanilla": {"label": "vanilla", "valid_ppl": 100.0, "train_flops": 1.0},
            "alcot3": {"label": "ALCoT", "valid_ppl": 104.0, "train_flops": 3.0}}
    assert "not better" in report._verdict(104.0, 100.0)
    assert any(re.search(r"4\.0% higher", line) for line in report.findings({"runs": runs}))
