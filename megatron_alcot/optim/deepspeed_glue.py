"""DeepSpeed as the second engine: ZeRO-1/2/3 with a client ``torch.optim.AdamW``.

    >>> engine, optimizer = initialize_deepspeed(
    ...     model, None, {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}},
    ...     lr=3e-4, weight_decay=0.1, clip_grad=1.0, micro_batch_size=4, global_batch_size=32)
    >>> loss = engine(tokens, labels=labels).loss
    >>> engine.backward(loss); engine.step()        # steps the optimizer every N micro-batches
    >>> sched = OptimizerParamScheduler(optimizer, ...)   # sets group["lr"] like for our optimizers

``ds_config`` is a DeepSpeed config (dict or JSON path). The keyword arguments fill what the
training flags own: ``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps`` (global
batch / (micro batch × DP)), ``train_batch_size``, ``gradient_clipping`` and, when given,
``zero_optimization.stage`` and ``bf16.enabled``; a value the config already holds must agree.
The optimizer is always the client AdamW with the base optimizer's decay/no-decay groups
(``optimizer_params``, default: :func:`optimizer.param_groups` of ``model``): a config
``"optimizer"`` section would select DeepSpeed's compiled Adam (a JIT build per machine) and is
rejected.

bf16: DeepSpeed casts every parameter to bf16, the ALCoT routers included (its flat ZeRO buffers
hold one dtype), at every ZeRO stage; the fp32 master copies live in its optimizer. The routers
are still evaluated in fp32 (``model/latent/router.py`` upcasts the stored weights with autocast off),
but from bf16-rounded weights: g at initialisation is sigmoid(bf16(logit 0.9)) = 0.9005, not 0.9.
Our own ``--bf16`` (fp32 parameters, bf16 autocast) keeps the routers' weights in fp32.

Supported here: ZeRO stage 0-3 (with this project's model, stage 3 goes through
:class:`Zero3Root`: each module's parameters are gathered for its forward and for the backward of
each of its calls and released after; the LM head/embedding and the routers stay gathered through
forward and backward; the engine returns the output as an :class:`OutputDict`. DeepSpeed keeps a
parameter gathered when it is used again within ``stage3_max_reuse_distance`` elements, default
1e9, and a layer is used again one lap later: set it lower for small models),
fp32 or bf16, with TP = PP = 1.
CPU/NVMe offload (``offload_optimizer`` / ``offload_param``) is refused with a clear error:
DeepSpeed would need its compiled ``cpu_adam`` instead of the client torch AdamW. DeepSpeed runs
data parallelism only; its own rules still apply: ZeRO-2/3 do not combine with its pipeline
engine, and our lap schedules are not its pipeline engine, so PP > 1 is refused;
TP > 1 would need DeepSpeed to reduce norms over our TP groups and is refused too. Use ``--use-distributed-optimizer`` (``distributed_optimizer.py``) for
ZeRO with TP/PP. ``deepspeed`` is optional: it is imported only inside :func:`initialize_deepspeed`.

Gradient accumulation is DeepSpeed's: ``engine.backward`` divides each micro-batch loss by
``gradient_accumulation_steps`` and ``engine.step()`` updates only on the last micro-batch, so the
caller must not divide by the number of micro-batches itself (``training/train_step.py`` does not
on this path). A non-finite gradient norm makes DeepSpeed skip the update and clear the gradients
(``engine.was_step_applied()`` is then False).

The trainer drives the engine through :class:`DeepSpeedModel`, the engine behind the same
gradient-sync interface as DDP and ZeRO (``optim.grad_sync``). Checkpoints of the engine's state
are ``checkpointing/deepspeed_checkpoint.py``'s.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
from typing import ContextManager, Optional, Tuple, Union

import torch

from megatron_alcot.model.latent.router import Routers
from megatron_alcot.model.llama import LlamaModel
from megatron_alcot.optim.optimizer import param_groups
from megatron_alcot.parallel import parallel_state


def _set(config: dict, path: Tuple[str, ...], value) -> None:
    """Fill ``config[path]`` with ``value``; a different value already there is an error."""
    node = config
    for key in path[:-1]:
        node = node.setdefault(key, {})
    old = node.get(path[-1])
    if old is not None and old != value:
        raise ValueError(f"DeepSpeed config {'.'.join(path)} = {old!r} disagrees with the training "
                         f"flags ({value!r}); drop it from the config or change the flag")
    node[path[-1]] = value


def build_deepspeed_config(ds_config: Union[str, dict, None], *, micro_batch_size: int,
                           global_batch_size: Optional[int] = None, dp_size: Optional[int] = None,
                           clip_grad: float = 0.0, zero_stage: Optional[int] = None,
                           bf16: Optional[bool] = None) -> dict:
    """The DeepSpeed config dict with the batch, clipping, stage and precision fields filled in."""
    if isinstance(ds_config, (str, os.PathLike)):
        with open(ds_config) as f:
            config = json.load(f)
    else:
        config = copy.deepcopy(ds_config or {})
    if "optimizer" in config:
        raise ValueError("the DeepSpeed config has an \"optimizer\" section; remove it: the client "
                         "torch AdamW is used (DeepSpeed's own Adam needs a JIT build)")
    dp = dp_size if dp_size is not None else parallel_state.get_data_parallel_world_size()
    global_batch_size = global_batch_size if global_batch_size is not None else micro_batch_size * dp
    if global_batch_size % (micro_batch_size * dp):
        raise ValueError(f"global batch {global_batch_size} is not a multiple of micro batch "
                         f"{micro_batch_size} × data-parallel size {dp}")
    _set(config, ("train_micro_batch_size_per_gpu",), micro_batch_size)
    _set(config, ("gradient_accumulation_steps",), global_batch_size // (micro_batch_size * dp))
    _set(config, ("train_batch_size",), global_batch_size)
    _set(config, ("gradient_clipping",), float(clip_grad))
    if zero_stage is not None:
        _set(config, ("zero_optimization", "stage"), int(zero_stage))
    if bf16 is not None:
        _set(config, ("bf16", "enabled"), bool(bf16))
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage}")
    zero = config.get("zero_optimization", {})
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in (None, "none"):
            raise ValueError(f"DeepSpeed config zero_optimization.{key}.device = {device!r}: offload is not "
                             "supported here (DeepSpeed then needs its compiled cpu_adam optimizer, and "
                             "the client torch AdamW is used); remove the offload section")
    if config.get("fp16", {}).get("enabled") and config.get("bf16", {}).get("enabled"):
        raise ValueError("the DeepSpeed config enables both fp16 and bf16; choose one")
    return config


class OutputDict(dict):
    """A dict read like the model's output dataclass (``out.loss``): ZeRO-3 finds the tensors of
    a module's output (to hook its backward) in dicts, lists and tuples, not in dataclasses."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Zero3Root(torch.nn.Module):
    """The module handed to ZeRO-3 for this project's model. ZeRO-3 gathers a module's own
    parameters in its forward pre-hook and releases them after; the parameters the model reads
    outside their module's forward (the LM head and embedding weights, the routers) are
    registered as external parameters of this root, so they stay gathered for the whole forward
    and backward. The latent laps call each layer several times per forward:
    :meth:`track_backward_per_call` makes ZeRO-3 release a layer after the backward of each call
    (its pre-backward hook gathers it again for the next). Optimizer state, gradients and the
    parameters between steps stay sharded."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def __getattr__(self, name):
        """Other attributes (``config``, ...) are the wrapped model's, for code that unwraps the
        engine once (``engine.module``)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    def outside_forward_parameters(self):
        """The parameters the model reads outside their own module's forward: the LM head and
        embedding weights (``lm_head``, the tied head, the target probability, PonderLM's
        embedding mix) and the routers (``Routers.continue_prob``)."""
        params = {}
        for module in self.model.modules():
            if isinstance(module, Routers):
                params.update((id(p), p) for p in module.parameters())
            if isinstance(module, LlamaModel):
                for child in (module.output_layer, module.embedding):
                    if child is not None:
                        params.update((id(p), p) for p in child.parameters())
        return list(params.values())

    def register_external(self) -> None:
        import deepspeed  # noqa: PLC0415
        for param in self.outside_forward_parameters():
            deepspeed.zero.register_external_parameter(self, param)

    def track_backward_per_call(self) -> None:
        """Let ZeRO-3 release a module's parameters after the backward of each of its calls.

        DeepSpeed counts, per module, the inputs whose gradients are still to come
        (``ds_grads_remaining``) and releases the module's parameters when the count reaches 0;
        it restarts the count at every forward call. A latent lap calls each layer again, so the
        count only matches the last call, and after that call's backward the layer stayed
        gathered for the rest of the backward. Each call's outputs carry a node that, when the
        backward of that call begins, sets the count to that call's own number of inputs."""
        for module in self.model.modules():
            module.register_forward_hook(_mark_call_inputs)

    def forward(self, *args, **kwargs):
        for module in self.model.modules():          # a forward without backward leaves counts
            if "ds_grads_remaining" in module.__dict__:
                module.ds_grads_remaining = 0
        out = self.model(*args, **kwargs)
        return OutputDict(vars(out)) if dataclasses.is_dataclass(out) else out


class _ResetGradsRemaining(torch.autograd.Function):
    """Identity on a module's output; its backward sets ``module.ds_grads_remaining`` to the
    number of inputs of the call that produced the output (see Zero3Root.track_backward_per_call)."""

    @staticmethod
    def forward(ctx, x, module, count):
        ctx.module, ctx.count = module, count
        return x.detach()

    @staticmethod
    def backward(ctx, grad):
        ctx.module.ds_grads_remaining = ctx.count
        return grad, None, None


def _mark_call_inputs(module, args, out):
    count = module.__dict__.get("ds_grads_remaining", 0)
    if not count:
        return None
    mark = lambda t: _ResetGradsRemaining.apply(t, module, count) \
        if torch.is_tensor(t) and t.requires_grad else t  # noqa: E731
    if torch.is_tensor(out):
        return mark(out)
    if isinstance(out, (tuple, list)):
        return type(out)(mark(t) for t in out)
    if isinstance(out, dict):
        return type(out)((k, mark(t)) for k, t in out.items())
    return None


def _holds_llama_model(model: torch.nn.Module) -> bool:
    """Whether ``model`` is or wraps this project's model (see :class:`Zero3Root`)."""
    return any(isinstance(m, LlamaModel) for m in model.modules())


def _default_single_process_env() -> None:
    """DeepSpeed initializes torch.distributed itself when nobody did; give it a world of one.
    That process group (and DeepSpeed's cached groups) then lives as long as the process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:
        import socket  # noqa: PLC0415
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))


def initialize_deepspeed(model: torch.nn.Module, optimizer_params=None,
                         ds_config: Union[str, dict, None] = None, *, lr: float,
                         weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8,
                         clip_grad: float = 0.0, micro_batch_size: int = 1,
                         global_batch_size: Optional[int] = None, zero_stage: Optional[int] = None,
                         bf16: Optional[bool] = None):
    """``deepspeed.initialize`` with a client AdamW; returns ``(engine, optimizer)``."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if tp > 1 or pp > 1:
        raise ValueError(f"the DeepSpeed engine runs with tensor- and pipeline-parallel size 1 "
                         f"(got TP {tp}, PP {pp}); use --use-distributed-optimizer for ZeRO with TP/PP")
    try:
        import deepspeed  # noqa: PLC0415 - optional dependency
    except ImportError as exc:
        raise ImportError("DeepSpeed is not installed: pip install deepspeed together with the "
                          "pinned torch (torch==<installed version>), or train without a DeepSpeed "
                          "config (--use-distributed-optimizer gives ZeRO-1/2 without it)") from exc
    config = build_deepspeed_config(ds_config, micro_batch_size=micro_batch_size,
                                    global_batch_size=global_batch_size, clip_grad=clip_grad,
                                    zero_stage=zero_stage, bf16=bf16)
    zero3 = config.get("zero_optimization", {}).get("stage", 0) == 3
    root = Zero3Root(model) if zero3 and _holds_llama_model(model) else model
    _default_single_process_env()
    groups = optimizer_params if optimizer_params is not None else \
        param_groups(model.named_parameters(), weight_decay)
    try:
        client = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                   fused=True)
    except (RuntimeError, TypeError, ValueError):
        client = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                   foreach=True)
    engine, optimizer, _, _ = deepspeed.initialize(model=root, optimizer=client, config=config)
    if isinstance(root, Zero3Root):
        root.register_external()
        root.track_backward_per_call()
    return engine, optimizer


class DeepSpeedModel:
    """A DeepSpeed engine behind the trainer's gradient-sync interface (``optim.grad_sync``).

        model = DeepSpeedModel(engine)
        model.zero_grad_buffer()
        for batch in micro_batches:
            model.engine.backward(model(batch["tokens"], labels=batch["labels"]).loss)
            model.engine.step()                  # steps and clears at the accumulation boundary
        model.finish_grad_sync()

    DeepSpeed owns the accumulation: its micro-step count sets the boundary, ``engine.backward``
    reduces there and ``engine.step()`` updates and clears the gradients. So ``no_sync`` holds
    nothing back, and ``zero_grad_buffer`` / ``finish_grad_sync`` only hold at a boundary (where
    DeepSpeed's partitioned gradients are empty, and ``zero_grad_buffer`` drops the module's
    ``.grad``): in the middle of an accumulation they raise. ``module`` is ``engine.module``."""

    def __init__(self, engine):
        self.engine = engine
        self.module = engine.module

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def no_sync(self) -> ContextManager[None]:
        return contextlib.nullcontext()

    def zero_grad_buffer(self) -> None:
        self._require_boundary("zero_grad_buffer")
        self.engine.zero_grad()

    def finish_grad_sync(self) -> None:
        self._require_boundary("finish_grad_sync")

    def _require_boundary(self, what: str) -> None:
        accumulation = self.engine.gradient_accumulation_steps()
        pending = self.engine.micro_steps % accumulation
        if pending:
            raise RuntimeError(f"{what}: DeepSpeed holds {pending} of {accumulation} micro-batches of "
                               "an unfinished accumulation; run engine.backward and engine.step for "
                               "all micro-batches of the iteration first")
