"""A pipeline stage of the LLaMA model: a contiguous slice of layers, plus the embedding on the
first stage and the final norm, LM head and latent-method parameters on the last stage.

    stage = LlamaModel(cfg, parallel_cfg, pre_process=True, post_process=True)
    lap = stage.latent.first_lap(stage, tokens)                  # first stage, lap 0
    hidden, kv = stage.run_lap(lap, past=[kv_0, ..., kv_{k-1}])   # lap k through my layers
    logits = stage.lm_head(h)                                     # last stage, vocab-parallel

``run_lap`` computes only the active tokens (compacted rows, see ``compaction.py``) and returns the
full-shape hidden state (inactive tokens keep their input) and this lap's keys/values
(``attention.LapKV``). It takes earlier laps' keys/values as explicit inputs, so a schedule can
cut autograd at lap boundaries; with PP = 1 ``model(tokens, ...)`` runs every lap in one graph
(``latent.base.run_laps``).

Sequence parallelism: the lap state stays replicated (full sequence); after compaction the rows
are padded to a multiple of TP and split across TP ranks for the norms and residuals, and the
column/row-parallel linears all-gather / reduce-scatter them. The layer norms' weight gradients
are then partial per rank (``param.sequence_parallel``) and are summed over TP by the trainer.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron_alcot.model.attention import LapContext, LapKV
from megatron_alcot.model.lap_attention import LapMask
from megatron_alcot.model.compaction import Compaction
from megatron_alcot.model.transformer_layer import (RMSNorm, TransformerLayer, init_parameters,
                                                   skip_init)
from megatron_alcot.model.output import LapState, masked_mean
from megatron_alcot.model.rotary import RotaryEmbedding
from megatron_alcot.model.spec import LayerSpec, build_layer_spec
from megatron_alcot.parallel import parallel_state
from megatron_alcot.parallel.tensor_parallel import gemm, mappings
from megatron_alcot.parallel.tensor_parallel.cross_entropy import (mask_padded_vocab,
                                                                   vocab_parallel_cross_entropy)
from megatron_alcot.parallel.tensor_parallel.fused_linear_cross_entropy import (chunk_rows_for,
                                                                              fused_linear_cross_entropy)
from megatron_alcot.parallel.tensor_parallel.layers import ColumnParallelLinear, VocabParallelEmbedding


class LanguageEmbedding(nn.Module):
    """``word_embeddings`` (vocab-parallel); output replicated ``[b, s, h]``."""

    def __init__(self, cfg, padded_vocab: int):
        super().__init__()
        self.dropout = cfg.hidden_dropout
        self.word_embeddings = VocabParallelEmbedding(
            padded_vocab, cfg.hidden_size, init_method=skip_init,
            params_dtype=getattr(torch, cfg.params_dtype))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(tokens)
        return F.dropout(x, self.dropout) if self.dropout > 0 and self.training else x


class TransformerBlock(nn.Module):
    """``layers`` keyed by their GLOBAL index (state-dict names do not depend on PP) and, on the
    last stage, ``final_layernorm``."""

    def __init__(self, cfg, spec: LayerSpec, layer_range: Tuple[int, int], post_process: bool,
                 sequence_parallel: bool):
        super().__init__()
        self.layers = nn.ModuleDict({str(i): TransformerLayer(cfg, spec, sequence_parallel)
                                     for i in range(*layer_range)})
        if post_process:
            self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon,
                                           getattr(torch, cfg.params_dtype))


class LlamaModel(nn.Module):
    """One pipeline stage (with PP = 1 the whole model); ``forward`` runs every lap."""

    def __init__(self, cfg, parallel_cfg=None, pre_process: bool = True, post_process: bool = True,
                 layer_range: Optional[Tuple[int, int]] = None, seed: int = 1234):
        super().__init__()
        from megatron_alcot.model.latent.base import build_method
        self.config = cfg
        self.pre_process, self.post_process = pre_process, post_process
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.sequence_parallel = bool(parallel_cfg is not None and parallel_cfg.sequence_parallel
                                      and self.tp > 1)
        self.layer_range = tuple(layer_range) if layer_range is not None else (0, cfg.num_layers)
        self.padded_vocab_size = cfg.padded_vocab_size(self.tp)
        self.spec = build_layer_spec(cfg)     # the kernels, chosen once for every layer
        self.embedding = LanguageEmbedding(cfg, self.padded_vocab_size) if pre_process else None
        self.decoder = TransformerBlock(cfg, self.spec, self.layer_range, post_process, self.sequence_parallel)
        self.output_layer = None          # the LM head is the embedding (tied, same stage)
        if post_process and (cfg.untie_embeddings_and_output_weights or not pre_process):
            self.output_layer = ColumnParallelLinear(
                cfg.hidden_size, self.padded_vocab_size, bias=False, gather_output=False,
                init_method=skip_init, params_dtype=getattr(torch, cfg.params_dtype),
                gemm_backend=self.spec.gemm)
            if not cfg.untie_embeddings_and_output_weights:
                # Tied weights split over stages: this copy starts equal to the embedding and its
                # gradient must be summed with the first stage's (the embedding group).
                self.output_layer.weight.shared_embedding = True
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rotary_base)
        self.latent = build_method(cfg, pre_process, post_process)
        init_parameters(self, cfg, seed)

    # --- last stage ---------------------------------------------------------------------------
    @property
    def output_weight(self) -> torch.Tensor:
        """This rank's ``[V_padded/tp, h]`` LM-head weight (the embedding when tied)."""
        if self.output_layer is not None:
            return self.output_layer.weight
        return self.embedding.word_embeddings.weight

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        """Replicated ``[..., h]`` -> vocab-parallel logits ``[..., V_padded/tp]``; the columns of
        vocabulary padding hold ``PADDED_LOGIT`` so they take no probability mass."""
        w = self.output_weight
        logits = self.spec.gemm.linear(mappings.copy_to_tensor_model_parallel_region(h.to(w.dtype)), w)
        return mask_padded_vocab(logits, self.config.vocab_size)

    def lm_loss(self, h: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor):
        """``(masked-mean CE, per-token CE)`` of the LM head on ``h [..., h]``.

        With ``cross_entropy_loss_fusion`` and autograd on, the head and the loss run fused over
        row chunks (``fused_linear_cross_entropy``: no ``[n, V]`` logits, per-token CE detached);
        otherwise through the logits and the vocab-parallel cross entropy.
        """
        w = self.output_weight
        if self.config.cross_entropy_loss_fusion and torch.is_grad_enabled() and (
                h.requires_grad or w.requires_grad):
            mask = loss_mask.float()
            weights = mask / mask.sum().clamp_min(1.0)
            chunk = chunk_rows_for(h.device, w.shape[0], labels.numel())
            return fused_linear_cross_entropy(mappings.copy_to_tensor_model_parallel_region(h), w,
                                              labels, weights, self.config.vocab_size, chunk,
                                              gemm_backend=self.spec.gemm)
        per_token = vocab_parallel_cross_entropy(self.lm_head(h), labels)
        return masked_mean(per_token, loss_mask.float()), per_token

    # --- one lap ------------------------------------------------------------------------------
    def run_lap(self, lap: LapState, past: Sequence[LapKV] = (),
                compact: bool = True) -> Tuple[torch.Tensor, LapKV]:
        """Lap ``lap.k`` of the active tokens through this stage's layers.

        ``past``: this stage's LapKV of the laps whose keys the lap may see (laps < k for
        ALCoT). Returns (hidden ``[b, s, h]``, this lap's LapKV). ``compact=False`` computes every
        token and masks (the reference for compaction).
        """
        comp = Compaction.build(lap.active, compact, lap.sizes)
        layers = list(self.decoder.layers.values())
        if comp.n == 0:
            empty = lap.hidden.new_zeros(comp.batch, 0, 0, 0)
            return lap.hidden, LapKV(comp.order, comp.valid, [empty] * len(layers), [empty] * len(layers))
        b, s = lap.active.shape
        positions = lap.position_ids
        if positions is None:
            positions = torch.arange(s, device=lap.hidden.device).expand(b, s)
        cos, sin = self.rotary(comp.gather(positions))
        mask = None
        if past or not comp.all_executed:
            mask = LapMask.from_blocks(comp.order, comp.valid, [p.order for p in past] + [comp.order],
                                       [p.valid for p in past] + [comp.valid])
        rows = comp.gather(lap.hidden)
        padded_rows = comp.n
        if not comp.dense and self.spec.gemm.for_call(rows, rows) == "onednn":
            padded_rows = gemm.bucket_rows(comp.n)   # a few GEMM shapes, not one per row count
        if self.sequence_parallel:
            padded_rows = -(-padded_rows // self.tp) * self.tp
        if padded_rows > comp.n:
            rows = F.pad(rows, (0, 0, 0, padded_rows - comp.n))
        if self.sequence_parallel:
            rows = mappings.scatter_to_sequence_parallel_region(rows, 0)
        ctx = LapContext(comp, cos, sin, mask, padded_rows)
        keys, values = [], []
        for i, layer in enumerate(layers):
            rows, k, v = layer(rows, ctx, [p.keys[i] for p in past], [p.values[i] for p in past])
            keys.append(k)
            values.append(v)
        if self.sequence_parallel:
            rows = mappings.gather_from_sequence_parallel_region(rows, 0, False)
        return comp.scatter(lap.hidden, rows[: comp.n]), LapKV(comp.order, comp.valid, keys, values)

    # --- PP = 1 convenience ---------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None,
                loss_mask: Optional[torch.Tensor] = None, **kwargs):
        """All laps, one graph: see :func:`megatron_alcot.model.latent.base.run_laps`."""
        if not (self.pre_process and self.post_process):
            raise RuntimeError("model(tokens) needs the whole model on one stage; with pipeline "
                               "parallelism the lap schedule drives run_lap on each stage")
        from megatron_alcot.model.latent.base import run_laps
        return run_laps(self, tokens, labels=labels, loss_mask=loss_mask, **kwargs)
