"""Tensor parallelism: Megatron-style layers, autograd collectives, vocab-parallel cross entropy,
TP-aware RNG and shard/merge helpers.

    from megatron_alcot.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear
"""
from megatron_alcot.parallel.tensor_parallel.cross_entropy import (
    chunked_target_logprob, chunked_target_prob, vocab_parallel_cross_entropy,
    vocab_parallel_target_logprob, vocab_parallel_target_prob)
from megatron_alcot.parallel.tensor_parallel.layers import (
    ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, parallel_lm_logits)
from megatron_alcot.parallel.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region, scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region)
from megatron_alcot.parallel.tensor_parallel.random import (
    RNGStatesTracker, get_rng_tracker, model_parallel_seed)
from megatron_alcot.parallel.tensor_parallel.sharding import (
    merge_shards, merge_state_dicts, repad_vocab, shard_state_dict, shard_tensor,
    tensor_parallel_meta)
from megatron_alcot.parallel.tensor_parallel.utils import (
    divide, init_method_normal, padded_vocab_init, param_is_tensor_parallel,
    scaled_init_method_normal, set_tensor_model_parallel_attributes)

__all__ = [
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "parallel_lm_logits",
    "vocab_parallel_cross_entropy", "vocab_parallel_target_prob", "vocab_parallel_target_logprob",
    "chunked_target_prob", "chunked_target_logprob",
    "copy_to_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region",
    "scatter_to_tensor_model_parallel_region", "gather_from_tensor_model_parallel_region",
    "scatter_to_sequence_parallel_region", "gather_from_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "RNGStatesTracker", "get_rng_tracker", "model_parallel_seed",
    "shard_tensor", "merge_shards", "shard_state_dict", "merge_state_dicts", "repad_vocab",
    "tensor_parallel_meta",
    "divide", "init_method_normal", "scaled_init_method_normal", "padded_vocab_init",
    "param_is_tensor_parallel", "set_tensor_model_parallel_attributes",
]
