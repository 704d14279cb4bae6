"""A resumable training run on a CPU: a step loop with checkpoints, a JSONL log and a wall-clock budget.

The toy teacher's stages run in one (:mod:`loopfree.demo.teacher`)::

    run = TrainingRun("runs/teacher", checkpoint_minutes=5, log_every=50)
    run.train("vae", 2000, step_fn, {"vae": vae, "optimizer": optimizer})

Every step's randomness must come from the step number (``loopfree.utils.seeding.derive_seed``), so a resumed run
draws what an unbroken one would. State goes to safetensors files (:mod:`loopfree.utils.safestate`), never pickles.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, Protocol

import torch
from tqdm.auto import tqdm

from loopfree.utils.safestate import load_state, save_state

logger = logging.getLogger(__name__)


def clipped_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, params, schedule, max_norm: float = 1.0) -> float:
    """One optimiser step on ``loss``: the gradients of ``params`` clipped to a total norm of ``max_norm``, then
    ``schedule`` (a learning-rate scheduler) advanced; the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    schedule.step()
    return loss.item()


class _Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> object: ...


class TrainingRun:
    """A run folder: ``checkpoints/<stage>.safetensors`` and ``train_log.jsonl``."""

    def __init__(self, out_dir: str | Path, checkpoint_minutes: float = 5.0, log_every: int = 50) -> None:
        self.out = Path(out_dir)
        self.checkpoints = self.out / "checkpoints"
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.checkpoint_minutes, self.log_every = checkpoint_minutes, log_every

    def log(self, record: dict) -> None:
        with open(self.out / "train_log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def resume(self, name: str, state: dict[str, _Stateful]) -> int:
        """Load checkpoint ``name`` into ``state`` if there is one; the step it reached, else 0."""
        path = self.checkpoints / f"{name}.safetensors"
        if not path.is_file():
            return 0
        saved = load_state(path)
        for key, obj in state.items():
            obj.load_state_dict(saved[key])
        logger.info("resumed %s at step %d", name, saved["step"])
        return int(saved["step"])

    def checkpoint(self, name: str, state: dict[str, _Stateful], step: int) -> None:
        save_state(self.checkpoints / f"{name}.safetensors", {"step": step, **{key: obj.state_dict() for key, obj in state.items()}})

    def train(
        self,
        name: str,
        steps: int,
        step_fn: Callable[[int], float],
        state: dict[str, _Stateful],
        deadline: float | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> int:
        """Run ``step_fn(step) -> loss`` from the checkpointed step up to ``steps`` or ``deadline``
        (``time.monotonic``); checkpoint every ``checkpoint_minutes`` and at the end. The step reached."""
        start = self.resume(name, state)
        done = logged = start
        t0 = last_save = last_log = time.monotonic()
        smoothed = math.nan
        bar = tqdm(range(start, steps), initial=start, total=steps, desc=name, dynamic_ncols=True)
        for step in bar:
            loss = step_fn(step)
            smoothed = loss if math.isnan(smoothed) else 0.98 * smoothed + 0.02 * loss
            done = step + 1
            bar.set_postfix(loss=f"{smoothed:.4f}")
            now = time.monotonic()
            if done % self.log_every == 0:
                rate = (done - logged) / (now - last_log)
                self.log({"stage": name, "step": done, "loss": loss, "loss_smoothed": smoothed,
                          "it_per_s": rate, "elapsed_s": now - t0})
                last_log, logged = now, done
            if on_step is not None:  # probes are left out of the logged speed
                paused = time.monotonic()
                on_step(done)
                last_log += time.monotonic() - paused
            out_of_time = deadline is not None and time.monotonic() > deadline
            if now - last_save > self.checkpoint_minutes * 60 or out_of_time or done == steps:
                self.checkpoint(name, state, done)
                last_save = now
            if out_of_time:
                logger.info("%s: time budget spent at step %d of %d", name, done, steps)
                break
        bar.close()
        return done
