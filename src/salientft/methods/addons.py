"""What a run may add on top of its method: GMT's gradient mask (docs/gmt.md).

An add-on is configured by the run (``TrainConfig.mask``), not by the method, which only says
whether it accepts it (``Method.accepts_mask``). ``train`` asks each add-on of the run for its
Trainer callbacks and for what it adds to ``metrics.json``, as it asks the method for its own.
"""
from __future__ import annotations


class GradientMaskAddon:
    """GMT's gradient mask: a Trainer callback that masks the gradients before each step, and the
    fraction of gradient entries it kept per logged step."""

    def __init__(self, config):
        self.config = config  # a GMTConfig

    def callbacks(self) -> list:
        from ..gmt import GradientMaskCallback

        return [GradientMaskCallback(self.config)]

    def metrics(self, log_history: list[dict]) -> dict:
        return {"kept_fraction": [{"step": h["step"], "kept_fraction": h["kept_fraction"]}
                                  for h in log_history if "kept_fraction" in h]}


def addons_of(config) -> list:
    """The add-ons a run (a TrainConfig) configured, in the order their callbacks run."""
    return [GradientMaskAddon(config.mask)] if config.mask is not None else []
