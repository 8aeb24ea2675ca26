"""The optimizer, its learning-rate schedule and the training step: one spelling for pretrain and train."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from captioning.accel import Runtime


def adam(parameters, lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam, fused into one kernel over all parameters on CPU and CUDA: the same update as the
    default implementation's loop of small elementwise ops per tensor, up to rounding, in less time."""
    return torch.optim.Adam(parameters, lr=lr, fused=device.type in ("cpu", "cuda"))


def lr_schedule(optimizer: torch.optim.Optimizer, schedule: str, peak: float, total_steps: int,
                done_steps: int = 0) -> torch.optim.lr_scheduler.OneCycleLR | None:
    """`onecycle`: warm up to `peak` over the first quarter of `total_steps`, then anneal towards 0
    (Smith & Topin 2017, "super-convergence": a short budget trains much further than at a constant
    rate); `constant`: None, the optimizer keeps `peak`. Call `.step()` after each optimizer step.

    The rate (and Adam's beta1, which one-cycle moves against it) is a function of the step alone,
    so a run resumed after `done_steps` continues on the same curve without saving the scheduler.
    """
    if schedule == "constant":
        return None
    total = max(1, total_steps)
    # OneCycleLR divides by the warm-up's length in steps, pct_start * total - 1: zero for a run of
    # exactly 4 steps. There, as in any run under 5 steps, the warm-up then has no step of its own.
    warm_up = 0.25 if total != 4 else 0.2
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=total, pct_start=warm_up)
    if done_steps:
        scheduler.last_epoch = done_steps - 1
        with warnings.catch_warnings():  # "step() before optimizer.step()": here it only moves to the step
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()
    return scheduler


class TrainingStep:
    """One optimizer step, the same in pretrain and train: the loss under bf16 autocast (CUDA),
    backward, Adam, then the schedule (`scheduler` None: a constant rate)."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler | None,
                 runtime: Runtime):
        self.optimizer, self.scheduler, self.runtime = optimizer, scheduler, runtime

    def __call__(self, losses: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """`losses()` -> (the loss to log, the objective to minimize); returns the first, detached."""
        with self.runtime.autocast():
            logged, objective = losses()
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return logged.detach()
