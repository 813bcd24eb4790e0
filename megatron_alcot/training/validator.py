"""When the training loop validates, and the validation pass itself.

    validator = Validator(eval_iters=10, eval_interval=1000, train_iters=50000,
                          run=lambda iteration: {...})          # e.g. validation_pass(...) below
    if validator.should_validate(iteration):                     # every --eval-interval, not the last
        history.evals.append(validator.validate(iteration))
    if validator.validates_at_end():                             # after the last iteration
        history.evals.append(validator.validate(iteration))

``--eval-iters 0`` turns validation off. The last iteration is validated once, after the loop, and
only when the run finished (an early exit does not validate).
"""
from __future__ import annotations

from typing import Callable

from megatron_alcot.training.evaluate import evaluate


class Validator:
    def __init__(self, eval_iters: int, eval_interval: int, train_iters: int,
                 run: Callable[[int], dict]):
        self.eval_iters, self.eval_interval, self.train_iters = eval_iters, eval_interval, train_iters
        self.run = run

    def should_validate(self, iteration: int) -> bool:
        return bool(self.eval_iters) and iteration % self.eval_interval == 0 \
            and iteration < self.train_iters

    def validates_at_end(self) -> bool:
        return bool(self.eval_iters) and self.train_iters > 0

    def validate(self, iteration: int) -> dict:
        return self.run(iteration)


def validation_pass(model, make_valid, *, eval_iters: int, num_microbatches: int, forward_step,
                    logger, pp: int, reads_data: bool, autocast_dtype) -> Callable[[int], dict]:
    """``run`` for :class:`Validator`: one pass over the validation split, logged; ``{}`` on every
    rank when there is no validation split."""
    def run(iteration: int) -> dict:
        it = make_valid()
        if it is None:
            return {}
        result = evaluate(model, it if reads_data else None, eval_iters=eval_iters,
                          num_microbatches=num_microbatches, forward_step=forward_step,
                          pipeline_model_parallel_size=pp, autocast_dtype=autocast_dtype)
        result["iteration"] = iteration
        logger.log_eval(result)
        return result
    return run
