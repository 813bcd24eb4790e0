"""tools/generate.py: the native checkpoint (KV cache) and its export give the same greedy tokens and
latent steps, and the cached decoding equals the parallel forward re-run per token (--no-cache)."""
import json

import megatron_alcot.evaluation.generate as generate_tool
from test_convert_hf import build_native, load_tool, model_cfg, save_native, to_hf_tool, tokenizer_model  # noqa: F401


def run_json(args, capsys):
    assert generate_tool.main(args + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_native_vs_export(tmp_path, tokenizer_model, capsys):  # noqa: F811
    cfg = model_cfg("alcot")
    ckpt = save_native(build_native(cfg), cfg, str(tmp_path / "ckpt"), tokenizer_model)
    hf = to_hf_tool.convert_to_hf(ckpt, str(tmp_path / "hf"), log=lambda *a: None)
    common = ["--prompt", "the quick brown fox", "--max-new-tokens", "8", "--greedy"]
    a = run_json(["--load", ckpt] + common, capsys)
    b = run_json(["--hf", hf] + common, capsys)
    assert [t["id"] for t in a["tokens"]] == [t["id"] for t in b["tokens"]]
    assert [t["latent_steps"] for t in a["tokens"]] == [t["latent_steps"] for t in b["tokens"]]
    assert len(a["tokens"]) >= 1 and all(0 <= t["latent_steps"] <= 3 for t in a["tokens"])
    assert run_json(["--load", ckpt, "--no-cache"] + common, capsys) == a
    sampled = ["--load", ckpt, "--prompt", "the fox", "--max-new-tokens", "6", "--temperature", "0.8",
               "--top-k", "20", "--top-p", "0.9", "--seed", "0"]
    c = run_json(sampled, capsys)
    assert run_json(sampled + ["--no-cache"], capsys) == c == run_json(sampled, capsys)
    assert generate_tool.main(["--load", ckpt, "--prompt", "the fox", "--max-new-tokens", "4",
                               "--temperature", "0.8", "--top-k", "5", "--seed", "0"]) == 0
    text = capsys.readouterr().out
    assert "legend" in text and "[" in text
