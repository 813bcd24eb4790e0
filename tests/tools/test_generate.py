"""tools/generate.py: native checkpoint and export give the same greedy tokens and latent steps."""
import json

from test_convert_hf import build_native, load_tool, model_cfg, save_native, to_hf_tool, tokenizer_model  # noqa: F401

generate_tool = load_tool("tools/generate.py")


def test_generate_native_vs_export(tmp_path, tokenizer_model, capsys):  # noqa: F811
    cfg = model_cfg("alcot")
    ckpt = save_native(build_native(cfg), cfg, str(tmp_path / "ckpt"), tokenizer_model)
    hf = to_hf_tool.convert_to_hf(ckpt, str(tmp_path / "hf"), log=lambda *a: None)
    common = ["--prompt", "the quick brown fox", "--max-new-tokens", "8", "--greedy", "--json"]
    assert generate_tool.main(["--load", ckpt] + common) == 0
    a = json.loads(capsys.readouterr().out)
    assert generate_tool.main(["--hf", hf] + common) == 0
    b = json.loads(capsys.readouterr().out)
    assert [t["id"] for t in a["tokens"]] == [t["id"] for t in b["tokens"]]
    assert [t["latent_steps"] for t in a["tokens"]] == [t["latent_steps"] for t in b["tokens"]]
    assert len(a["tokens"]) >= 1 and all(0 <= t["latent_steps"] <= 3 for t in a["tokens"])
    assert generate_tool.main(["--load", ckpt, "--prompt", "the fox", "--max-new-tokens", "4",
                               "--temperature", "0.8", "--top-k", "5", "--seed", "0"]) == 0
    text = capsys.readouterr().out
    assert "legend" in text and "[" in text
