"""Loss scaling for fp16: a constant scale or Megatron's dynamic scaler.

    >>> scaler = DynamicGradScaler(initial_scale=2.0**32, min_scale=1.0, growth_interval=1000,
    ...                            hysteresis=2)
    >>> (loss * scaler.scale).backward(); found_inf = ...; scaler.update(found_inf)

Dynamic: every overflow uses up one unit of ``hysteresis``; when it runs out the scale halves (not
below ``min_scale``). ``growth_interval`` overflow-free steps in a row double it and refill the
hysteresis.
"""
from __future__ import annotations


class ConstantGradScaler:
    def __init__(self, scale: float):
        self.scale = float(scale)

    @property
    def inv_scale(self) -> float:
        return 1.0 / self.scale

    def update(self, found_inf: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])


class DynamicGradScaler(ConstantGradScaler):
    def __init__(self, initial_scale: float = 2.0 ** 32, min_scale: float = 1.0,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 1000, hysteresis: int = 2):
        super().__init__(initial_scale)
        self.min_scale, self.growth_factor, self.backoff_factor = min_scale, growth_factor, backoff_factor
        self.growth_interval, self.hysteresis = growth_interval, hysteresis
        self._growth_tracker, self._hysteresis_tracker = 0, hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                self._growth_tracker = 0
                self._hysteresis_tracker = self.hysteresis
                self.scale *= self.growth_factor

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_tracker": self._growth_tracker,
                "hysteresis_tracker": self._hysteresis_tracker}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self._growth_tracker = int(state.get("growth_tracker", 0))
        self._hysteresis_tracker = int(state.get("hysteresis_tracker", self.hysteresis))


def build_grad_scaler(train_cfg):
    """None for fp32/bf16; constant for ``--fp16 --loss-scale S``; dynamic for plain ``--fp16``."""
    if not train_cfg.fp16:
        return None
    if train_cfg.loss_scale is not None:
        return ConstantGradScaler(train_cfg.loss_scale)
    return DynamicGradScaler(initial_scale=train_cfg.initial_loss_scale,
                             min_scale=train_cfg.min_loss_scale,
                             growth_interval=train_cfg.loss_scale_window,
                             hysteresis=train_cfg.hysteresis)
