"""``python -m megatron_alcot.quickstart --quick`` end to end: every artefact exists and the reported
numbers are what the saved checkpoints give when measured again."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_alcot import quickstart


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("quickstart"))
    assert quickstart.main(["--output-dir", out, "--quick"]) == 0
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    return quickstart.Context(out=out, opts=quickstart.parse_args(["--output-dir", out, "--quick"])), results


def test_artefacts_exist(run):
    ctx, results = run
    files = ["corpus.jsonl", "tokenizer.model", "data/corpus_text_document.bin", "data/corpus_text_document.idx",
             "checkpoints/alcot/latest_checkpointed_iteration.txt",
             "checkpoints/vanilla/latest_checkpointed_iteration.txt",
             "hf/alcot/config.json", "hf/alcot/model.safetensors", "hf/alcot/modeling_llama_alcot.py",
             "hf/alcot/tokenizer.model", "loss_curves.png", "results.json", "summary.md"]
    missing = [f for f in files if not os.path.isfile(ctx.path(f))]
    assert not missing
    assert [s.name for s in quickstart.STAGES] == list(results["stages"])
    for t in results["stages"].values():
        assert t["wall_s"] >= 0 and t["cpu_s"] >= 0 and t["idle_estimate_s"] >= 0
    for method in ("alcot", "vanilla"):
        assert results[method]["iterations"] == quickstart.QUICK["train_iters"]
        assert len(results[method]["train_lm_loss"]) == quickstart.QUICK["train_iters"]
    summary = open(ctx.path("summary.md")).read()
    for method in ("alcot", "vanilla"):
        assert f"{results['heldout'][method]['token_perplexity']:.2f}" in summary
    assert quickstart.marked_text(results["generation"]) in summary


def test_heldout_numbers_are_recomputed_from_checkpoints(run):
    ctx, results = run
    for method in ("alcot", "vanilla"):
        again = quickstart.evaluate_checkpoint(ctx, method)
        reported = results["heldout"][method]
        assert again["tokens"] == reported["tokens"] > 0
        assert math.isclose(again["token_perplexity"], reported["token_perplexity"], rel_tol=1e-9)
        assert again["latent_steps_histogram"] == reported["latent_steps_histogram"]
        assert again["mean_latent_steps"] == reported["mean_latent_steps"]
    assert results["heldout"]["vanilla"]["latent_steps_histogram"] == {"0": results["heldout"]["vanilla"]["tokens"]}
    hist = results["heldout"]["alcot"]["latent_steps_histogram"]
    assert sum(int(k) * c for k, c in hist.items()) / sum(hist.values()) == pytest.approx(
        results["heldout"]["alcot"]["mean_latent_steps"])


def test_export_and_generation_are_recomputed(run):
    ctx, results = run
    export = results["export"]
    assert export["class"] == "LlamaAlcotForCausalLM" and export["latent_steps_equal"]
    again = quickstart.compare_export(ctx, ctx.path("hf", "alcot"))
    assert again["max_abs_logit_diff"] == export["max_abs_logit_diff"] <= 1e-3
    gen = results["generation"]
    assert len(gen["ids"]) == len(gen["latent_steps"]) == len(gen["pieces"]) >= 1
    assert all(0 <= s <= 3 for s in gen["latent_steps"])
    assert quickstart.run_generation(ctx) == gen
    reference = quickstart.run_generation(ctx, use_cache=False)      # parallel forward re-run per token
    assert (reference["ids"], reference["latent_steps"]) == (gen["ids"], gen["latent_steps"])
    assert torch.tensor(gen["prompt_ids"]).numel() == ctx.opts.prompt_tokens


@pytest.mark.slow
def test_quick_run_from_a_non_editable_install(tmp_path):
    """``pip install .`` (not editable) and the quickstart runs from the installed package alone: it
    needs nothing from the checkout (no tools/ scripts by path)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src, site, work = tmp_path / "src", tmp_path / "site", tmp_path / "work"
    shutil.copytree(os.path.join(repo, "megatron_alcot"), src / "megatron_alcot",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(repo, "setup.py"), src)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(src)], check=True, timeout=300)
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    code = ("import sys, megatron_alcot\n"
            f"assert megatron_alcot.__file__.startswith({str(site)!r}), megatron_alcot.__file__\n"
            "from megatron_alcot.quickstart import main\n"
            "sys.exit(main(['--output-dir', 'out', '--quick']))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(work / "out" / "results.json") as f:
        results = json.load(f)
    assert results["alcot"]["iterations"] == quickstart.QUICK["train_iters"]
    assert os.path.isfile(work / "out" / "hf" / "alcot" / "model.safetensors")
