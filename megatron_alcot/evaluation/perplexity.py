"""Perplexity, latent steps per token and the depth histogram, for native checkpoints and HF exports.

    from megatron_alcot.evaluation.perplexity import NativeScorer, HFScorer, evaluate_token_documents
    scorer = NativeScorer.from_checkpoint("ckpts")             # or HFScorer.from_pretrained("hf_out")
    result = evaluate_token_documents(scorer, docs_tokens, window=2048, prefix_token=scorer.eod)
    result["token_perplexity"], result["mean_latent_steps"], result["latent_steps_histogram"]

Windows ("rolling", lm-evaluation-harness's ``loglikelihood_rolling`` scheme with one token of
context, so the two agree by construction): a document ``x_1..x_n`` is preceded by a prefix token
(default: the EOD token, which is what precedes a document in Megatron's packed training data; no
BOS is added, as in preprocessing). Every token is predicted exactly once. The targets are cut into
consecutive chunks of ``window`` tokens; the first chunk is scored from ``[prefix, x_1..]``; each
later chunk from the ``window`` tokens that end just before its last target (so a short last chunk
still sees a full window of context). Log-probabilities are a log-softmax over the true vocabulary
(padding columns of the native LM head are dropped), in fp32.

Latent steps are those of the positions that predict each token (ℓ_t of the input position t).
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from megatron_alcot.hf import export_max_latent_steps


# ----------------------------------------------------------------------------- windows
def rolling_windows(num_tokens: int, window: int) -> List[Tuple[int, int, int]]:
    """``(start, end, score_from)`` over ``seq = [prefix] + tokens``: feed ``seq[start:end]`` and
    score its last ``end - score_from`` positions, which predict ``tokens[score_from:end]``."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out, done = [], 0
    while done < num_tokens:
        end = min(done + window, num_tokens)
        out.append((max(0, end - window), end, done))
        done = end
    return out


class Scorer:
    """``score(tokens) -> (logprob of each next token [n-1], latent steps [n])`` for one sequence."""

    vocab_size: int
    eod: Optional[int] = None
    bos: Optional[int] = None
    max_latent_steps: int = 0

    def forward(self, tokens: torch.Tensor):
        """``tokens [1, n]`` -> (log-probs ``[1, n, V]`` fp32, num_steps ``[1, n]``)."""
        raise NotImplementedError

    @torch.no_grad()
    def score(self, seq: Sequence[int]):
        x = torch.tensor([list(seq)], dtype=torch.long)
        logp, steps = self.forward(x)
        target = x[0, 1:]
        return logp[0, :-1].gather(-1, target[:, None]).squeeze(-1), steps[0]


def document_loglikelihood(scorer: Scorer, tokens: Sequence[int], window: int, prefix_token: int):
    """(sum of log p over the document's tokens, per-token latent steps list)."""
    seq = [int(prefix_token)] + [int(t) for t in tokens]
    total, steps = 0.0, []
    for start, end, score_from in rolling_windows(len(tokens), window):
        # window input seq[start:end] plus the target of its last position, seq[end]
        lp, st = scorer.score(seq[start:end + 1])
        keep = end - score_from
        total += float(lp[-keep:].double().sum())
        steps += [int(s) for s in st[: end - start][-keep:]]
    return total, steps


def evaluate_token_documents(scorer: Scorer, docs: Iterable[Sequence[int]], window: int,
                             prefix_token: Optional[int] = None, texts: Optional[Sequence[str]] = None) -> dict:
    """JSON-able results over tokenised documents (``texts`` add word/byte perplexity)."""
    prefix = prefix_token if prefix_token is not None else scorer.eod
    if prefix is None or prefix < 0:
        raise ValueError("no prefix token: the tokenizer has no EOD; pass --prefix-token ID")
    total_ll, total_tokens, docs_n = 0.0, 0, 0
    hist = [0] * (scorer.max_latent_steps + 1)
    per_doc = []
    for tokens in docs:
        if len(tokens) == 0:
            continue
        ll, steps = document_loglikelihood(scorer, tokens, window, prefix)
        total_ll += ll
        total_tokens += len(tokens)
        docs_n += 1
        for s in steps:
            if s >= len(hist):
                hist += [0] * (s + 1 - len(hist))
            hist[s] += 1
        per_doc.append(ll)
    if total_tokens == 0:
        raise ValueError("no tokens to evaluate (all documents are empty)")
    steps_sum = sum(k * c for k, c in enumerate(hist))
    result = {
        "documents": docs_n, "tokens": total_tokens, "window": window, "prefix_token": int(prefix),
        "scheme": "rolling (lm-eval loglikelihood_rolling, one-token context)",
        "loglikelihood": total_ll, "nll_per_token": -total_ll / total_tokens,
        "token_perplexity": math.exp(-total_ll / total_tokens),
        "mean_latent_steps": steps_sum / total_tokens,
        "latent_steps_histogram": {str(k): c for k, c in enumerate(hist)},
    }
    if texts is not None:
        import re
        words = sum(len(re.split(r"\s+", t)) for t in texts)
        nbytes = sum(len(t.encode("utf-8")) for t in texts)
        result.update(word_perplexity=math.exp(-total_ll / words), byte_perplexity=math.exp(-total_ll / nbytes),
                      bits_per_byte=-total_ll / nbytes / math.log(2), words=words, bytes=nbytes)
    return result


# ----------------------------------------------------------------------------- scorers
class NativeScorer(Scorer):
    """A native model (TP = PP = 1 in this process), loaded from any checkpoint layout."""

    def __init__(self, model, model_cfg, eod: Optional[int] = None, bos: Optional[int] = None):
        self.model = model.eval()
        self.cfg = model_cfg
        self.vocab_size = model_cfg.vocab_size
        self.max_latent_steps = model_cfg.max_latent_steps
        self.eod, self.bos = eod, bos

    @classmethod
    def from_checkpoint(cls, load_dir: str, iteration: Optional[int] = None, eod=None, bos=None):
        model, cfg, meta = load_native_model(load_dir, iteration)
        if eod is None or bos is None:
            tok = native_tokenizer(meta)
            if tok is not None:
                eod = tok.eod if eod is None else eod
                bos = tok.bos if bos is None else bos
        return cls(model, cfg, eod, bos)

    @torch.no_grad()
    def forward(self, tokens):
        out = self.model(tokens)
        logits = out.logits[..., : self.vocab_size].float()
        return torch.log_softmax(logits, dim=-1), out.num_steps


class HFScorer(Scorer):
    """A Hugging Face export (plain LLaMA or llama_alcot)."""

    def __init__(self, model):
        self.model = model.eval()
        cfg = model.config
        self.vocab_size = cfg.vocab_size
        self.max_latent_steps = export_max_latent_steps(cfg)
        eos = cfg.eos_token_id
        self.eod = eos[0] if isinstance(eos, (list, tuple)) else eos
        self.bos = cfg.bos_token_id

    @classmethod
    def from_pretrained(cls, hf_dir: str, dtype=torch.float32):
        from transformers import AutoModelForCausalLM
        return cls(AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=dtype))

    @torch.no_grad()
    def forward(self, tokens):
        out = self.model(tokens)
        steps = getattr(out, "num_steps", None)
        if steps is None:
            steps = torch.zeros_like(tokens)
        return torch.log_softmax(out.logits[..., : self.vocab_size].float(), dim=-1), steps


def load_native_model(load_dir: str, iteration: Optional[int] = None):
    """``(model, model_cfg, metadata)``: every shard merged into one TP = PP = 1 model on CPU."""
    from megatron_alcot.checkpointing import load_full_state_dict
    from megatron_alcot.checkpointing.metadata import model_section
    from megatron_alcot.config import ModelConfig
    from megatron_alcot.model import build_model
    sd, meta = load_full_state_dict(load_dir, iteration)
    cfg = ModelConfig.from_dict(model_section(meta.get("config") or {}))
    model = build_model(cfg)
    own = model.state_dict()
    for name, t in sd.items():
        if name in own and own[name].shape[0] > t.shape[0] and name in (
                "embedding.word_embeddings.weight", "output_layer.weight"):
            sd[name] = torch.cat([t, t.new_zeros(own[name].shape[0] - t.shape[0], *t.shape[1:])])
    model.load_state_dict(sd, strict=True)
    return model.eval(), cfg, meta


def native_tokenizer(meta: dict, tokenizer_model: Optional[str] = None):
    """The checkpoint's tokenizer (from its data config), or None when it names none."""
    data = (meta.get("config") or {}).get("data") or {}
    ttype, path = data.get("tokenizer_type"), tokenizer_model or data.get("tokenizer_model")
    if ttype in (None, "NullTokenizer") or not path:
        return None
    from megatron_alcot.data.tokenizers import build_tokenizer
    return build_tokenizer(ttype, tokenizer_model=path)
