"""Sizes, recipes and the method list of the paper's comparison, as Megatron flag lists.

    spec = PRESETS["cpu"]
    argv = method_argv(spec, METHODS["alcot3"], data, seed=1234, iters=spec.iters, out_dir="bench_out/paper")
    # -> ["--num-layers", "4", ..., "--latent-method", "alcot", "--latent-max-steps", "3"]

Every method trains the same shape on the same samples in the same order (same ``--seed``, data and
batch), so they differ only in the method; ``vanilla_2x`` doubles the layers (about 2x the
non-embedding parameters) as the compute-matched reference.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List


@dataclass(frozen=True)
class SizePreset:
    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    iters: int
    lr: float
    vocab_size: int
    eval_iters: int
    eval_points: int               # validations during training (the gap-over-training curve)
    bf16: bool = False
    gpus: int = 0                  # 0: run here in-process; >0: the torchrun equivalent uses this many
    sweep: tuple = ()              # ((λ, β), ...) ALCoT ℓmax=3 sweep points
    description: str = ""


# The table's ALCoT loss: λ, β and the penalty's scope. "decided" also penalises the decision that
# halts a token (method.md's pseudo-code); with the framework's defaults (λ 0.03, "continued") the
# routers of this small model barely react to difficulty (the variants below show both). λ = 1 is
# the smallest sweep value whose difficulty tracking reached ρ >= 0.3 on all three corpora it was
# run on (Debian text, Python's docs, Debian handbook + fortunes + Jargon File); λ = 0.5 missed on one.
ALCOT_LAMBDA, ALCOT_BETA, ALCOT_SCOPE = 1.0, 1.0, "decided"
SWEEP_CPU = ((0.0, 1.0), (0.1, 1.0), (0.5, 1.0), (2.0, 1.0), (1.0, 2.0))
SWEEP_FULL = tuple((lam, beta) for lam in (0.0, 0.1, 0.3, 0.5, 1.0) for beta in (0.5, 1.0, 2.0))

PRESETS: Dict[str, SizePreset] = {
    "smoke": SizePreset("smoke", 2, 32, 2, 96, 32, 4, 4, 6, 2e-3, 1024, 2, 2, bf16=True,
                        sweep=((0.3, 1.0),), description="test-only: seconds"),
    "cpu": SizePreset("cpu", 4, 128, 4, 384, 128, 16, 16, 150, 2e-3, 4096, 12, 5, bf16=True,
                      sweep=SWEEP_CPU, description="the default: 4x128 model, 0.3M tokens per run"),
    "cpu-long": SizePreset("cpu-long", 4, 128, 4, 384, 128, 16, 16, 1000, 2e-3, 4096, 16, 8, bf16=True,
                           sweep=SWEEP_FULL, description="the same model on 2M tokens per run (hours on 2 cores)"),
    "410m": SizePreset("410m", 24, 1024, 16, 2752, 2048, 4, 256, 50000, 3e-4, 50304, 100, 10, bf16=True,
                       gpus=8, sweep=SWEEP_FULL, description="the paper's LLaMA-410M recipe (26.2B tokens)"),
    "1.4b": SizePreset("1.4b", 24, 2048, 32, 5504, 2048, 4, 256, 50000, 2e-4, 50304, 100, 10, bf16=True,
                       gpus=8, sweep=SWEEP_FULL, description="the paper's LLaMA-1.4B recipe (26.2B tokens)"),
}


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    flags: tuple
    layer_factor: int = 1


def alcot_loss_flags(lam: float = ALCOT_LAMBDA, beta: float = ALCOT_BETA, scope: str = ALCOT_SCOPE) -> tuple:
    return ("--latent-loss-scope", scope, "--latent-loss-weight", f"{lam:g}", "--latent-loss-beta", f"{beta:g}")


ALCOT_LOSS = alcot_loss_flags()
METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("vanilla", "vanilla", ("--latent-method", "vanilla")),
    Method("loop", "loop (K=3)", ("--latent-method", "loop", "--latent-max-steps", "3")),
    Method("pause", "pause (K=3)", ("--latent-method", "pause", "--latent-max-steps", "3")),
    Method("ponder", "PonderLM (K=3)", ("--latent-method", "ponder", "--latent-max-steps", "3")),
    Method("alcot3", "ALCoT ℓmax=3", ("--latent-method", "alcot", "--latent-max-steps", "3",
                                       *ALCOT_LOSS)),
    Method("alcot5", "ALCoT ℓmax=5", ("--latent-method", "alcot", "--latent-max-steps", "5",
                                       *ALCOT_LOSS)),
    Method("vanilla_2x", "vanilla, 2x layers", ("--latent-method", "vanilla"), layer_factor=2),
)}


def sweep_method(lam: float, beta: float) -> Method:
    return Method(f"sweep_l{lam:g}_b{beta:g}", f"ALCoT ℓmax=3 λ={lam:g} β={beta:g}",
                  ("--latent-method", "alcot", "--latent-max-steps", "3") + alcot_loss_flags(lam, beta))


@dataclass(frozen=True)
class Variant:
    """One run of ``--investigate``: a method, extra flags, and optional recipe overrides."""

    name: str
    label: str
    method: str
    flags: tuple = ()
    iters_factor: float = 1.0
    lr: float = 0.0                # 0: the preset's
    reference: str = "vanilla"     # the run it is compared with (same recipe)


INVESTIGATIONS: List[Variant] = [
    Variant("inv_vanilla_lr1e-3", "vanilla, lr 1e-3", "vanilla", lr=1e-3),
    Variant("inv_alcot_lr1e-3", "ALCoT, lr 1e-3", "alcot3", lr=1e-3, reference="inv_vanilla_lr1e-3"),
    Variant("inv_alcot_router0.5", "ALCoT, router init g=0.5", "alcot3",
            ("--latent-router-init-prob", "0.5")),
    Variant("inv_alcot_tau0.3", "ALCoT, τ=0.3", "alcot3", ("--latent-threshold", "0.3")),
    Variant("inv_alcot_readout_prob", "ALCoT, probability-mixture readout", "alcot3",
            ("--latent-readout", "prob")),
    Variant("inv_alcot_embed1", "ALCoT, no step-0 embedding scale", "alcot3",
            ("--latent-embed-scale", "0")),
    # ALCoT scales token embeddings by sqrt(2.5·h); vanilla (as in the paper) does not. This control
    # gives vanilla the same input scale, to separate the scale from the latent steps.
    Variant("inv_vanilla_embed_scaled", "vanilla with ALCoT's embedding scale sqrt(2.5·h)", "vanilla",
            ("--latent-embed-scale", "{embed_scale}")),
    Variant("inv_alcot_scope_continued",
            "ALCoT, penalty only where the token goes on (Σ_{k<ℓ_t} of docs/method.md §6)",
            "alcot3", ("--latent-loss-scope", "continued")),
    Variant("inv_alcot_default_loss", "ALCoT, the framework's default loss (λ=0.03, β=1, continued)", "alcot3",
            alcot_loss_flags(0.03, 1.0, "continued")),
    Variant("inv_vanilla_2xiters", "vanilla, 2x tokens", "vanilla", iters_factor=2.0),
    Variant("inv_alcot_2xiters", "ALCoT, 2x tokens", "alcot3", iters_factor=2.0,
            reference="inv_vanilla_2xiters"),
]
DEFAULT_INVESTIGATIONS = tuple(v.name for v in INVESTIGATIONS if v.iters_factor == 1.0)


def method_argv(spec: SizePreset, method: Method, data: dict, seed: int, iters: int,
                out_dir: str, lr: float = 0.0, extra: tuple = ()) -> List[str]:
    """The Megatron flag list of one run (what ``pretrain_alcot.py`` would be given)."""
    lr = lr or spec.lr
    interval = max(1, iters // spec.eval_points)
    argv = [
        "--num-layers", str(spec.num_layers * method.layer_factor), "--hidden-size", str(spec.hidden_size),
        "--num-attention-heads", str(spec.num_attention_heads), "--ffn-hidden-size", str(spec.ffn_hidden_size),
        "--seq-length", str(spec.seq_length), "--max-position-embeddings", str(spec.seq_length),
        "--untie-embeddings-and-output-weights",
        "--micro-batch-size", str(spec.micro_batch_size), "--global-batch-size", str(spec.global_batch_size),
        "--train-iters", str(iters), "--lr", f"{lr:g}", "--min-lr", f"{lr / 10:g}",
        "--lr-decay-style", "cosine", "--lr-warmup-fraction", "0.02", "--weight-decay", "0.1",
        "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--clip-grad", "1.0", "--seed", str(seed),
        "--data-path", data["data_prefix"], "--split", data["split"],
        "--data-cache-path", f"{out_dir}/data/cache",
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", data["tokenizer_model"],
        "--log-interval", str(max(1, min(100, iters // 10))), "--eval-interval", str(interval),
        "--eval-iters", str(spec.eval_iters), "--num-workers", "2" if spec.gpus else "0",
    ]
    if spec.bf16:
        argv.append("--bf16")
    return argv + list(method.flags) + list(extra)


def flag_value(argv, flag: str, default: str) -> str:
    """The value given to ``flag`` in a run's flag list, or ``default``."""
    return argv[argv.index(flag) + 1] if flag in argv else default


def with_iters(spec: SizePreset, iters: int) -> SizePreset:
    return replace(spec, iters=iters) if iters else spec
