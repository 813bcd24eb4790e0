"""Megatron-LM flags with no setting of their own here, so that Megatron launch scripts run as they are.

Each one states what always holds here (accepted, changes nothing), is converted to the setting it
means, or stops with an error naming the flag. ``arguments.py`` applies them after parsing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_alcot.config.fields import flag

TRANSFORMER_IMPLS = ("local", "transformer_engine")


@dataclass
class CompatFlags:
    """Megatron-LM flags with no setting of their own: each always holds, is converted, or is an error."""

    group_query_attention: bool = flag("--group-query-attention", default=False,
                                       help="needs --num-query-groups N, which sets the groups")
    normalization: str = flag("--normalization", default="RMSNorm",
                              help="only RMSNorm; anything else is an error")
    position_embedding_type: str = flag("--position-embedding-type", default="rope",
                                        help="only rope; anything else is an error")
    swiglu: bool = flag("--swiglu", default=False, help="always on here (SwiGLU MLP)")
    disable_bias_linear: bool = flag("--disable-bias-linear", default=False, help="always on here (no biases)")
    use_rope: bool = flag("--use-rotary-position-embeddings", default=False, help="always on here (RoPE)")
    no_position_embedding: bool = flag("--no-position-embedding", default=False,
                                       help="always on here (no learned position table)")
    use_flash_attn: bool = flag("--use-flash-attn", default=False,
                                help="the fastest attention core: same as --attention-backend auto")
    softmax_fp32: bool = flag("--attention-softmax-in-fp32", default=False,
                              help="always on here (softmax in fp32)")
    no_msf: bool = flag("--no-masked-softmax-fusion", default=False,
                        help="always holds here (no fused masked softmax kernel)")
    no_bsf: bool = flag("--no-bias-swiglu-fusion", default=False,
                        help="always holds here (no fused bias-SwiGLU kernel)")
    no_bdf: bool = flag("--no-bias-dropout-fusion", default=False,
                        help="always holds here (no fused bias-dropout kernel)")
    no_gaf: bool = flag("--no-gradient-accumulation-fusion", default=False,
                        help="always holds here (no fused weight-gradient kernel)")
    use_mcore: bool = flag("--use-mcore-models", default=False,
                           help="not supported: an error (the model is this project's own)")
    transformer_impl: str = flag("--transformer-impl", default="local", choices=TRANSFORMER_IMPLS,
                                 help="only local; transformer_engine is an error")
    log_throughput: bool = flag("--log-throughput", default=False,
                                help="always on here (tokens/s, TFLOP/s and MFU in every log line)")
    ckpt_format: str = flag("--ckpt-format", default="torch",
                            help="only torch (this project's sharded format); anything else is an error")
    lr_decay_samples: Optional[int] = flag(
        "--lr-decay-samples", default=None,
        help="converted to --lr-decay-iters (needs --train-samples, --global-batch-size)")
    lr_warmup_samples: Optional[int] = flag(
        "--lr-warmup-samples", default=None,
        help="converted to --lr-warmup-iters (needs --train-samples, --global-batch-size)")
