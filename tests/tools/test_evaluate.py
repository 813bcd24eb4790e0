"""tools/evaluate.py on a native checkpoint vs its export, and lm-eval (CLI on the export, the
megatron_alcot LM adapter on the native checkpoint): the same perplexity by construction."""
import json
import math
import os
import subprocess
import sys

import pytest

import megatron_alcot.evaluation.evaluate as evaluate_tool
from test_convert_hf import ROOT, build_native, load_tool, model_cfg, save_native, to_hf_tool, tokenizer_model  # noqa: F401

TASKS = os.path.join(ROOT, "tests", "tools", "lm_eval_tasks")
DATA = os.path.join(TASKS, "ppl.jsonl")
WINDOW = 16  # shorter than the longest document, so rolling windows with overlap are exercised


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_model):  # noqa: F811
    d = tmp_path_factory.mktemp("eval")
    cfg = model_cfg("alcot")
    ckpt = save_native(build_native(cfg), cfg, str(d / "ckpt"), tokenizer_model, tp=2)
    hf = to_hf_tool.convert_to_hf(ckpt, str(d / "hf"), log=lambda *a: None)
    return ckpt, hf, d


def run_evaluate(args, capsys):
    assert evaluate_tool.main(args) == 0
    return json.loads(capsys.readouterr().out)


def test_native_and_export_agree(exported, capsys):
    ckpt, hf, d = exported
    a = run_evaluate(["--load", ckpt, "--input", DATA, "--seq-length", str(WINDOW)], capsys)
    b = run_evaluate(["--hf", hf, "--input", DATA, "--seq-length", str(WINDOW)], capsys)
    assert a["tokens"] == b["tokens"] > 3 * WINDOW // 2
    assert math.isclose(a["token_perplexity"], b["token_perplexity"], rel_tol=1e-5)
    assert a["latent_steps_histogram"] == b["latent_steps_histogram"]
    assert 0 < a["mean_latent_steps"] < 3 and sum(a["latent_steps_histogram"].values()) == a["tokens"]


def test_bad_jsonl_is_reported_with_line(exported, tmp_path, capsys):
    ckpt, _, _ = exported
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the fox"}\nnot json\n')
    assert evaluate_tool.main(["--load", ckpt, "--input", str(bad)]) == 1
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_lm_eval_adapter_matches_evaluate(exported, capsys):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from megatron_alcot.evaluation.lm_eval_adapter import MegatronAlcotLM
    ckpt, _, _ = exported
    ref = run_evaluate(["--load", ckpt, "--input", DATA, "--seq-length", str(WINDOW)], capsys)
    lm = MegatronAlcotLM(load=ckpt, max_length=WINDOW)
    texts = [json.loads(line)["text"] for line in open(DATA)]
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    assert math.isclose(sum(lm.loglikelihood_rolling(reqs)), ref["loglikelihood"], rel_tol=1e-6)
    (ll, greedy), = lm.loglikelihood([Instance("loglikelihood", {}, ("the quick", " brown fox"), 0)])
    assert ll < 0 and isinstance(greedy, bool)
    out, = lm.generate_until([Instance("generate_until", {}, ("the quick", {"until": ["\n"], "max_gen_toks": 5}), 0)])
    assert isinstance(out, str)


@pytest.mark.slow
def test_lm_eval_cli_on_export_matches_native(exported, capsys):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    ckpt, hf, d = exported
    ref = run_evaluate(["--load", ckpt, "--input", DATA, "--seq-length", str(WINDOW)], capsys)
    out_dir = d / "lm_eval_out"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={hf},trust_remote_code=True,dtype=float32,max_length={WINDOW},prefix_token_id={ref['prefix_token']}",
           "--tasks", "local_ppl", "--include_path", TASKS, "--device", "cpu", "--batch_size", "1",
           "--output_path", str(out_dir)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [os.path.join(r, f) for r, _, fs in os.walk(out_dir) for f in fs if f.startswith("results")]
    res = json.load(open(results[0]))["results"]["local_ppl"]
    assert math.isclose(res["word_perplexity,none"], ref["word_perplexity"], rel_tol=1e-4)
    assert math.isclose(res["byte_perplexity,none"], ref["byte_perplexity"], rel_tol=1e-4)


@pytest.mark.slow
def test_lm_eval_cli_with_the_native_adapter_matches_evaluate(exported, capsys):
    """``tools/lm_eval.py --model megatron_alcot``: lm-eval's own CLI on the native checkpoint."""
    pytest.importorskip("lm_eval")
    ckpt, _, d = exported
    ref = run_evaluate(["--load", ckpt, "--input", DATA, "--seq-length", str(WINDOW)], capsys)
    out_dir = d / "lm_eval_native_out"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "lm_eval.py"), "--model", "megatron_alcot", "--model_args",
           f"load={ckpt},max_length={WINDOW},prefix_token_id={ref['prefix_token']}",
           "--tasks", "local_ppl", "--include_path", TASKS, "--device", "cpu", "--batch_size", "1",
           "--output_path", str(out_dir)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [os.path.join(r, f) for r, _, fs in os.walk(out_dir) for f in fs if f.startswith("results")]
    res = json.load(open(results[0]))["results"]["local_ppl"]
    assert math.isclose(res["word_perplexity,none"], ref["word_perplexity"], rel_tol=1e-6)
    assert math.isclose(res["byte_perplexity,none"], ref["byte_perplexity"], rel_tol=1e-6)


def test_data_path_split_selects_the_trainers_documents(exported, tmp_path, capsys):
    import numpy
    from megatron_alcot.data.indexed_dataset import IndexedDatasetBuilder
    from megatron_alcot.data.utils import split_matrix, split_range
    ckpt, _, _ = exported
    prefix = str(tmp_path / "docs")
    with IndexedDatasetBuilder(prefix + ".bin", numpy.uint16) as b:
        for i in range(20):
            b.add_document([(7 * i + j) % 290 + 3 for j in range(5 + i % 4)] + [2])
        b.finalize(prefix + ".idx")
    docs, (beg, end) = evaluate_tool.split_documents(prefix, "80,15,5", "valid")
    assert (beg, end) == split_range(split_matrix("80,15,5")[1], 20) == (16, 19) and len(docs) == 3
    r = run_evaluate(["--load", ckpt, "--data-path", prefix, "--split", "80,15,5", "--seq-length", "8"], capsys)
    assert r["document_range"] == [16, 19] and r["documents"] == 3 and r["tokens"] == sum(map(len, docs))
    assert evaluate_tool.main(["--load", ckpt, "--data-path", prefix, "--split", "100,0,0"]) == 1
    assert "gives the valid split no documents" in capsys.readouterr().err
    with pytest.raises(ValueError, match="exactly one of load"):
        evaluate_tool.evaluate(data_path=prefix)
