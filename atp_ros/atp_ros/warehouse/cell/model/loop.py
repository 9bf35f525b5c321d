"""The resumable optimisation loop both training phases of the cell model run."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from rich.progress import Progress
from torch import Tensor

from atp_ros.warehouse.train_data import lr_at

if TYPE_CHECKING:
    from atp_ros.warehouse.cell.model.run import CellTrainer

# One step: (its random draws, its index) -> (loss to minimise, log fields, progress text).
Step = Callable[[np.random.Generator, int], tuple[Tensor, dict, str]]


@dataclass
class Phase:
    """One phase's name (its state keys ``<name>``, ``<name>_opt``, ``<name>_step``), length, peak learning
    rate and RNG stream."""

    name: str
    steps: int
    lr: float
    stream: int


def resume(trainer: CellTrainer, phase: Phase, model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Load the phase's saved weights and optimizer (if any) into ``model``/``opt``; the step to go on from."""
    if phase.name not in trainer.state:
        return 0
    model.load_state_dict(trainer.state[phase.name])
    if f"{phase.name}_opt" in trainer.state:
        opt.load_state_dict(trainer.state[f"{phase.name}_opt"])
    return trainer.state.get(f"{phase.name}_step", phase.steps)


def run_phase(
    trainer: CellTrainer,
    phase: Phase,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    one_step: Step,
    progress: Progress,
    checkpoint_every_s: float,
    extra_state: Callable[[], dict] = dict,
    after_step: Callable[[int], dict] | None = None,
) -> None:
    """Run ``phase`` from its saved step to the end: warmup + cosine learning rate, gradient clipping at 1,
    one log line per step, state saved every ``checkpoint_every_s`` and at the end (``extra_state()``
    joins it). Step ``s`` draws from ``default_rng([seed, stream, s])``, so a resumed run draws what an
    uninterrupted one would have."""
    r = trainer.r
    step = resume(trainer, phase, model, opt)
    trainer.truncate_log(phase.name, step)
    task = progress.add_task(phase.name, total=phase.steps, completed=step, info="")
    params = [p for g in opt.param_groups for p in g["params"]]
    model.train()
    last = time.monotonic()
    while step < phase.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, phase.steps, phase.lr, warmup=min(150, phase.steps // 5))
        loss, entry, info = one_step(np.random.default_rng([r.seed, phase.stream, step]), step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if after_step is not None:
            entry |= after_step(step)
        progress.update(task, completed=step, info=info)
        trainer.log(phase=phase.name, step=step, **entry)
        if time.monotonic() - last > checkpoint_every_s or step == phase.steps:
            last = time.monotonic()
            if step == phase.steps:
                trainer.state.pop(f"{phase.name}_opt", None)
            done = {f"{phase.name}_opt": opt.state_dict()} if step < phase.steps else {}
            trainer.save_state(**{phase.name: model.state_dict(), f"{phase.name}_step": step}, **extra_state(), **done)
    model.eval()
