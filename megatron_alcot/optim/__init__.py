"""Optimizer construction, LR schedules, gradient clipping and loss scaling.

    from megatron_alcot.optim import build_optimizer, OptimizerParamScheduler
    opt = build_optimizer(model, optim_cfg, train_cfg)
    sched = OptimizerParamScheduler.from_config(opt, optim_cfg, train_iters)
"""
from megatron_alcot.optim.clip_grads import clip_grad_norm, get_grad_norm  # noqa: F401
from megatron_alcot.optim.grad_scaler import (ConstantGradScaler, DynamicGradScaler,  # noqa: F401
                                              build_grad_scaler)
from megatron_alcot.optim.lr_schedule import OptimizerParamScheduler, lr_at  # noqa: F401
from megatron_alcot.optim.optimizer import (MegatronOptimizer, StepResult,  # noqa: F401
                                            build_optimizer, param_groups)
