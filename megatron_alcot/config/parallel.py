"""ParallelConfig: how the world is cut into tensor-, pipeline- and data-parallel groups.

    >>> ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2).data_parallel_size(8)
    2
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_alcot.config.fields import ConfigError, check_choice, flag

PIPELINE_SCHEDULES = ("1f1b", "gpipe")
DISTRIBUTED_BACKENDS = ("auto", "gloo", "nccl")


@dataclass
class ParallelConfig:
    """How the world is cut: TP × PP × DP (DP is whatever is left of the world size)."""

    tensor_model_parallel_size: int = flag(
        "--tensor-model-parallel-size", default=1, help="ranks that split every layer's weights (TP)")
    pipeline_model_parallel_size: int = flag(
        "--pipeline-model-parallel-size", default=1, help="pipeline stages, each a run of layers (PP)")
    pipeline_layer_split: Optional[str] = flag(
        "--pipeline-layer-split", default=None, metavar="N,N,...",
        help='layers per pipeline stage, e.g. "3,5", summing to --num-layers (default: as even as possible)')
    pipeline_schedule: str = flag(
        "--pipeline-schedule", default="1f1b", choices=PIPELINE_SCHEDULES,
        help="order of the forward and backward laps of the micro-batches on each stage")
    pipeline_max_in_flight: Optional[int] = flag(
        "--pipeline-max-in-flight", default=None,
        help="micro-batches alive on a stage at once (default: 2 × pipeline stages)")
    num_layers_per_virtual_pipeline_stage: Optional[int] = flag(
        "--num-layers-per-virtual-pipeline-stage", default=None,
        help="Megatron-LM's interleaved schedule: not implemented, an error (the lap ring already keeps "
             "up to PP micro-batches in flight)")
    sequence_parallel: bool = flag(
        "--sequence-parallel", default=False,
        help="split norms, dropout and residuals along the sequence across the tensor-parallel ranks")
    use_distributed_optimizer: bool = flag(
        "--use-distributed-optimizer", default=False,
        help="ZeRO: shard the optimizer state (and with --zero-stage 2 the gradients) over data-parallel ranks")
    zero_stage: int = flag(
        "--zero-stage", default=1, choices=(1, 2),
        help="with --use-distributed-optimizer: 1 shards the optimizer state, 2 the gradients too")
    deepspeed_config: Optional[str] = flag(
        "--deepspeed-config", default=None, metavar="PATH",
        help="train through the DeepSpeed engine with this JSON config (ZeRO 1-3; data parallelism only)")
    distributed_backend: str = flag(
        "--distributed-backend", default="auto", choices=DISTRIBUTED_BACKENDS,
        help="torch.distributed backend (auto: nccl on CUDA, gloo on CPU)")
    distributed_timeout_minutes: int = flag(
        "--distributed-timeout-minutes", default=10,
        help="collective timeout: a rank that waits longer stops the job with an error")

    def validate(self, world_size: int = 1) -> None:
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        if tp < 1 or pp < 1:
            raise ConfigError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
        if world_size % (tp * pp):
            raise ConfigError(
                f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} × "
                f"--pipeline-model-parallel-size {pp}; launch a multiple of {tp * pp} processes")
        check_choice(self, "pipeline_schedule")
        if self.pipeline_max_in_flight is not None and self.pipeline_max_in_flight < 1:
            raise ConfigError(f"--pipeline-max-in-flight {self.pipeline_max_in_flight}: give at least 1 "
                              "(or leave it out: twice as many micro-batches as pipeline stages)")
        if self.num_layers_per_virtual_pipeline_stage is not None:
            raise ConfigError("--num-layers-per-virtual-pipeline-stage: interleaved virtual pipeline stages "
                              "are not implemented; the lap ring already keeps up to PP micro-batches in "
                              "flight. Leave the flag out (--pipeline-schedule 1f1b is the default)")
        if self.sequence_parallel and tp == 1:
            raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if self.zero_stage not in (1, 2):
            raise ConfigError(f"--zero-stage {self.zero_stage}: use 1 (optimizer state sharded) or 2 "
                              "(gradients too); DeepSpeed offers stage 3")
        if self.distributed_backend not in DISTRIBUTED_BACKENDS:
            raise ConfigError(f"--distributed-backend {self.distributed_backend!r}: use auto, gloo or nccl")

    def validate_layer_split(self, num_layers: int) -> None:
        """``--pipeline-layer-split``: one count >= 1 per stage, summing to ``--num-layers``.

            >>> ParallelConfig(pipeline_model_parallel_size=2, pipeline_layer_split="3,5").validate_layer_split(8)
        """
        if self.pipeline_layer_split is None:
            return
        split, pp = self.pipeline_layer_split, self.pipeline_model_parallel_size
        try:
            counts = [int(x) for x in split.replace(" ", "").split(",")]
        except ValueError:
            raise ConfigError(f"--pipeline-layer-split {split!r}: give one layer count per stage, "
                              "comma-separated, e.g. 3,5") from None
        if len(counts) != pp:
            raise ConfigError(f"--pipeline-layer-split {split} has {len(counts)} entries; give one per "
                              f"stage (--pipeline-model-parallel-size {pp})")
        if min(counts) < 1 or sum(counts) != num_layers:
            raise ConfigError(f"--pipeline-layer-split {split}: every stage needs >= 1 layer and the "
                              f"counts must sum to --num-layers {num_layers}")

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)
