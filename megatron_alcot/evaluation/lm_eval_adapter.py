"""lm-evaluation-harness model ``megatron_alcot``: evaluate native checkpoints without exporting.

    python tools/lm_eval.py --model megatron_alcot --model_args load=ckpts,max_length=2048 --tasks ... \
            --include_path tests/tools/lm_eval_tasks     # lm-eval's CLI with this adapter registered

    import lm_eval
    from lm_eval.tasks import TaskManager
    from megatron_alcot.evaluation.lm_eval_adapter import MegatronAlcotLM
    lm = MegatronAlcotLM(load="ckpts", max_length=128)
    lm_eval.simple_evaluate(model=lm, tasks=["local_ppl"], task_manager=TaskManager(include_path=...))

Model args: ``load`` (checkpoint dir), ``iteration``, ``max_length`` (window; default the model's
max positions), ``tokenizer_model`` (override the checkpoint's), ``prefix_token_id`` (default EOD;
what precedes a document in training data, see ``perplexity.py``), ``max_gen_toks`` (256).

``loglikelihood_rolling`` uses ``perplexity.rolling_windows``, the harness's own scheme, so the
HF export run with ``lm_eval --model hf ...,prefix_token_id=<eod>,max_length=<same>`` gives the same
numbers. ``loglikelihood`` scores a continuation given its context (context left-truncated to fit
the window); ``generate_until`` decodes greedily (or with ``temperature``) until a stop string.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from megatron_alcot.evaluation import generate_tokens
from megatron_alcot.evaluation.perplexity import NativeScorer, document_loglikelihood, native_tokenizer


@register_model("megatron_alcot")
class MegatronAlcotLM(LM):
    """An lm-eval ``LM`` over a native checkpoint (merged to one process, CPU or current device)."""

    def __init__(self, load: str, iteration: Optional[int] = None, max_length: Optional[int] = None,
                 tokenizer_model: Optional[str] = None, prefix_token_id: Optional[int] = None,
                 max_gen_toks: int = 256, batch_size=1, device=None, **unused):
        super().__init__()
        from megatron_alcot.evaluation.perplexity import load_native_model
        model, cfg, meta = load_native_model(load, None if iteration is None else int(iteration))
        self.tok = native_tokenizer(meta, tokenizer_model)
        if self.tok is None:
            raise ValueError(f"the checkpoint in {load} names no tokenizer; pass tokenizer_model=PATH")
        self.scorer = NativeScorer(model, cfg, eod=self.tok.eod, bos=self.tok.bos)
        self.max_length = int(max_length or cfg.max_positions)
        self.prefix = int(prefix_token_id) if prefix_token_id is not None else int(self.tok.eod)
        self.max_gen_toks = int(max_gen_toks)

    # --- the three request types ------------------------------------------------------------
    def loglikelihood_rolling(self, requests) -> List[float]:
        out = []
        for req in requests:
            (text,) = req.args[:1]
            ll, _ = document_loglikelihood(self.scorer, self.tok.tokenize(text), self.max_length, self.prefix)
            out.append(ll)
        return out

    def loglikelihood(self, requests) -> List[tuple]:
        out = []
        for req in requests:
            context, continuation = req.args[:2]
            ctx = self.tok.tokenize(context) if context else [self.prefix]
            cont = self.tok.tokenize(continuation)
            seq = (ctx + cont)[-(self.max_length + 1):]
            logp, _ = self.scorer.forward(torch.tensor([seq[:-1]]))
            n = len(cont)
            lp = logp[0, -n:]
            target = torch.tensor(cont)
            ll = float(lp.gather(-1, target[:, None]).sum())
            greedy = bool((lp.argmax(-1) == target).all())
            out.append((ll, greedy))
        return out

    def generate_until(self, requests) -> List[str]:
        out = []
        for req in requests:
            context, kwargs = req.args[0], dict(req.args[1] if len(req.args) > 1 else {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.get("temperature", 0.0) or 0.0) if kwargs.get("do_sample") else 0.0
            prompt = (self.tok.tokenize(context) or [self.prefix])[-self.max_length:]

            def stop(ids):
                return any(s in self.tok.detokenize(ids) for s in until)

            ids, _ = generate_tokens(self.scorer, prompt, max_new, temperature=temperature,
                                     eos=self.tok.eod, stop=stop if until else None)
            if ids and ids[-1] == self.tok.eod:
                ids = ids[:-1]
            text = self.tok.detokenize(ids)
            for s in until:
                text = text.split(s)[0]
            out.append(text)
        return out
