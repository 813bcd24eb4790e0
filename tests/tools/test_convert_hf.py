"""convert_to_hf / convert_from_hf: transformers loads each export offline and matches the native
model (TP 1 and TP 2 checkpoints), greedy generation matches, HF -> native -> HF is lossless, and
errors leave no partial output."""
import importlib.util
import json
import os
import random

import pytest
import torch

import megatron_alcot.hf.convert_from_hf as from_hf_tool
import megatron_alcot.hf.convert_to_hf as to_hf_tool
from megatron_alcot.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
V = 300


def load_tool(relpath):
    spec = importlib.util.spec_from_file_location(os.path.basename(relpath)[:-3], os.path.join(ROOT, relpath))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod



WORDS = ("the quick brown fox jumps over a lazy dog while seven wise owls watch from old oak trees "
         "and rivers run to the sea under grey skies").split()


def make_text(rng, n=14):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def train_tokenizer(directory):
    import sentencepiece as spm
    rng = random.Random(0)
    corpus = os.path.join(directory, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("\n".join(make_text(rng) for _ in range(400)))
    prefix = os.path.join(directory, "tok")
    spm.SentencePieceTrainer.train(input=corpus, model_prefix=prefix, vocab_size=V, model_type="bpe",
                                   byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   minloglevel=2)
    return prefix + ".model"


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory):
    return train_tokenizer(str(tmp_path_factory.mktemp("tok")))


def model_cfg(method="alcot", **kw):
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, vocab_size=V,
                ffn_hidden_size=96, seq_length=32, rotary_base=500000.0, latent_method=method, latent_threshold=0.3,
                untie_embeddings_and_output_weights=True)
    base.update(kw)
    return ModelConfig(**base)


def build_native(cfg, seed=0):
    from megatron_alcot.model import build_model
    model = build_model(cfg, seed=1234 + seed).eval()
    with torch.no_grad():  # non-trivial routers and padding rows so halting and stripping matter
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if name.startswith("latent.routers.") and name.endswith("weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def save_native(model, cfg, ckpt_dir, tokenizer_model, tp=1, iteration=3):
    """A native checkpoint at TP 1, or at TP 2 (shards written by the checkpoint module's resharder)."""
    from megatron_alcot.checkpointing import save_checkpoint
    from megatron_alcot.checkpointing.reshard import reshard_checkpoint
    config = {"model": cfg.to_dict(), "data": {"tokenizer_type": "Llama2Tokenizer", "tokenizer_model": tokenizer_model}}
    if tp == 1:
        save_checkpoint(ckpt_dir, iteration, model, consumed_samples=0, config_dict=config)
    else:
        save_checkpoint(ckpt_dir + "_tp1", iteration, model, consumed_samples=0, config_dict=config)
        reshard_checkpoint(ckpt_dir + "_tp1", ckpt_dir, tp, log=lambda *a: None)
        assert os.path.exists(os.path.join(ckpt_dir, f"iter_{iteration:07d}", "model_tp01_pp000.pt"))
    return ckpt_dir


def load_export(hf_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32).eval()


@pytest.mark.parametrize("method,tp", [("vanilla", 1), ("alcot", 1), ("alcot", 2), ("vanilla", 2)])
def test_export_matches_native(tmp_path, tokenizer_model, method, tp):
    cfg = model_cfg(method)
    native = build_native(cfg)
    ckpt = save_native(native, cfg, str(tmp_path / "ckpt"), tokenizer_model, tp=tp)
    hf_dir = str(tmp_path / "hf")
    to_hf_tool.convert_to_hf(ckpt, hf_dir, max_shard_size="60KB", log=lambda *a: None)
    files = os.listdir(hf_dir)
    assert "model.safetensors.index.json" in files and "tokenizer.model" in files
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    assert config["model_type"] == ("llama" if method == "vanilla" else "llama_alcot")
    assert config["rope_theta"] == 500000.0 and config["rope_parameters"]["rope_theta"] == 500000.0
    assert ("modeling_llama_alcot.py" in files) == (method != "vanilla")
    hf = load_export(hf_dir)
    assert type(hf).__name__ == ("LlamaForCausalLM" if method == "vanilla" else "LlamaAlcotForCausalLM")
    x = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        o, oh = native(x), hf(x)
    assert (o.logits[..., :V] - oh.logits).abs().max() <= 1e-4
    if method == "alcot":
        assert torch.equal(o.num_steps, oh.num_steps) and 0 < int(o.num_steps.sum()) < 3 * 32
        # greedy generate() of the export == native greedy decoding, token for token
        from megatron_alcot.evaluation import generate_tokens
        from megatron_alcot.evaluation.perplexity import NativeScorer
        prompt = x[0, :6].tolist()
        ids, steps = generate_tokens(NativeScorer(native, cfg), prompt, 10)
        gen = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                          return_dict_in_generate=True, eos_token_id=None)
        assert gen.sequences[0, 6:].tolist() == ids
        assert gen.latent_steps[0].tolist() == steps


def test_tokenizer_export_matches_sentencepiece(tmp_path, tokenizer_model):
    import sentencepiece as spm
    from transformers import AutoTokenizer
    cfg = model_cfg("vanilla")
    ckpt = save_native(build_native(cfg), cfg, str(tmp_path / "ckpt"), tokenizer_model)
    to_hf_tool.convert_to_hf(ckpt, str(tmp_path / "hf"), log=lambda *a: None)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
    text = make_text(random.Random(5), 30)
    assert tok(text)["input_ids"] == sp.encode(text)  # no BOS added, as in preprocessing
    assert tok.eos_token_id == 2 and tok.bos_token_id == 1


def test_base_only_exports_step0_as_plain_llama(tmp_path, tokenizer_model):
    cfg = model_cfg("alcot", untie_embeddings_and_output_weights=False)
    native = build_native(cfg)
    ckpt = save_native(native, cfg, str(tmp_path / "ckpt"), tokenizer_model)
    to_hf_tool.convert_to_hf(ckpt, str(tmp_path / "hf"), base_only=True, log=lambda *a: None)
    hf = load_export(str(tmp_path / "hf"))
    assert type(hf).__name__ == "LlamaForCausalLM"
    x = torch.randint(0, V, (1, 12))
    with torch.no_grad():
        o = native(x, halting="always")
        assert (o.logits[..., :V] - hf(x).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("tied,tp", [(False, 2), (True, 1)])
def test_hf_native_hf_lossless(tmp_path, tied, tp):
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    src = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                                       tie_word_embeddings=tied, rms_norm_eps=1e-6, max_position_embeddings=64))
    src.save_pretrained(str(tmp_path / "src"))
    from_hf_tool.convert_from_hf(str(tmp_path / "src"), str(tmp_path / "ckpt"), target_tp=tp, log=lambda *a: None)
    assert os.path.exists(tmp_path / "ckpt" / "iter_0000000" / f"model_tp{tp - 1:02d}_pp000.pt")
    to_hf_tool.convert_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "back"), log=lambda *a: None)
    a, b = load_file(str(tmp_path / "src" / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = json.load(open(tmp_path / "src" / "config.json")), json.load(open(tmp_path / "back" / "config.json"))
    for key in ("rms_norm_eps", "num_key_value_heads", "tie_word_embeddings", "head_dim", "intermediate_size"):
        assert ca[key] == cb[key], key
    assert cb["rope_theta"] == 500000.0


def test_import_llama_as_alcot_keeps_step0(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    from megatron_alcot.evaluation.perplexity import load_native_model
    torch.manual_seed(0)
    src = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2)).eval()
    src.save_pretrained(str(tmp_path / "src"))
    from_hf_tool.convert_from_hf(str(tmp_path / "src"), str(tmp_path / "ckpt"), latent_method="alcot",
                                 latent_max_steps=2, log=lambda *a: None)
    model, cfg, _ = load_native_model(str(tmp_path / "ckpt"))
    assert cfg.latent_method == "alcot" and cfg.latent_max_steps == 2
    x = torch.randint(0, V, (1, 10))
    with torch.no_grad():
        assert (model(x, halting="always").logits[..., :V] - src(x).logits).abs().max() <= 1e-4


def _no_leftovers(parent, name):
    return not [n for n in os.listdir(parent) if n.startswith(name)]


def test_errors_leave_no_partial_output(tmp_path, tokenizer_model):
    from megatron_alcot.checkpointing import CheckpointError
    cfg = model_cfg("alcot")
    ckpt = save_native(build_native(cfg), cfg, str(tmp_path / "ckpt"), tokenizer_model)
    out = str(tmp_path / "out")
    with pytest.raises(CheckpointError):
        to_hf_tool.convert_to_hf(ckpt, out, iteration=7)          # wrong iteration
    assert _no_leftovers(tmp_path, "out")
    other = train_tokenizer_small(tmp_path)
    with pytest.raises(to_hf_tool.ExportError, match="tokens but the checkpoint"):
        to_hf_tool.convert_to_hf(ckpt, out, tokenizer_model=other)
    assert _no_leftovers(tmp_path, "out")
    os.makedirs(out)
    with pytest.raises(to_hf_tool.ExportError, match="already exists"):
        to_hf_tool.convert_to_hf(ckpt, out)
    os.rmdir(out)
    meta_path = os.path.join(ckpt, "iter_0000003", "metadata.json")
    meta = json.load(open(meta_path))
    meta["config"]["model"]["latent_method"] = "telepathy"
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(to_hf_tool.ExportError, match="telepathy"):
        to_hf_tool.convert_to_hf(ckpt, out)
    assert _no_leftovers(tmp_path, "out")
    os.remove(os.path.join(ckpt, "iter_0000003", "model_tp00_pp000.pt"))
    with pytest.raises(CheckpointError):
        to_hf_tool.convert_to_hf(ckpt, out)                        # missing shard
    assert _no_leftovers(tmp_path, "out")
    assert to_hf_tool.main(["--load", ckpt, "--save", out]) == 1   # CLI: message, exit 1
    with pytest.raises(from_hf_tool.ImportError_):
        from_hf_tool.convert_from_hf(str(tmp_path / "nothing"), str(tmp_path / "ck2"))
    assert _no_leftovers(tmp_path, "ck2")


def train_tokenizer_small(tmp_path):
    import sentencepiece as spm
    corpus = tmp_path / "c2.txt"
    corpus.write_text("\n".join(make_text(random.Random(i)) for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tok2"), vocab_size=310,
                                   model_type="bpe", byte_fallback=True, num_threads=1, minloglevel=2)
    return str(tmp_path / "tok2.model")
