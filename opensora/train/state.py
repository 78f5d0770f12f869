"""The training state a checkpoint holds and a resume restores, whatever the parallel mode.

    checkpoints/step_N/model.ckpt      the model's parameters (checkpoint keys = the model's names)
    checkpoints/step_N/ema.ckpt        the fp32 EMA as a whole model (frozen buffers included: loads like model.ckpt)
    checkpoints/step_N/optimizer.ckpt  AdamW's state and the loss-scale state
    checkpoints/step_N/state.json      step, data position, train RNG, W&B run id, loss average, seed

Under parallel=zero each rank holds part of the optimiser state and EMA; they are assembled for a save (every rank
takes part, rank 0 writes), and a resume loads each rank's part, so runs continue under any mode and rank count.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import mindspore as ms

from opensora.utils.checkpoint import CheckpointManager, load_params_into, load_state

log = logging.getLogger(__name__)


def optimizer_state(optimizer, weights) -> dict[str, ms.Parameter]:
    """The optimiser's own state {name: Parameter} (its moments, step count), without the weights it updates."""
    own = {id(w) for w in weights}
    return {n: p for n, p in optimizer.parameters_and_names() if id(p) not in own}


class TrainingState:
    """Saves and restores one run's training state (see the module docstring)."""

    def __init__(self, out: Path, keep_last: int, strategy, step_fn, update, model_params: dict):
        self.out = Path(out)
        self.ckpts = CheckpointManager(self.out, keep_last=keep_last)
        self.strategy, self.step_fn, self.update, self.model_params = strategy, step_fn, update, model_params
        self.opt_state = optimizer_state(update.optimizer, update.weights)
        self.scale_state = step_fn.scale_state()

    def full(self, with_optimizer: bool, keep: bool):
        """(model, EMA, optimiser + loss-scale state) as whole tensors (collective under parallel=zero)."""
        opt = {**self.opt_state, **self.scale_state} if with_optimizer else None
        return self.strategy.full_state(self.update, self.step_fn, self.model_params, opt, self.out, keep=keep)

    def save(self, step: int, host_state: dict) -> None:
        """Write checkpoint `step` (every rank calls; rank 0 writes after checking the replicas agree)."""
        ctx = self.strategy.ctx
        if ctx.distributed:
            self.strategy.check_in_sync(self.model_params, step)
        model, ema, opt = self.full(with_optimizer=True, keep=ctx.is_main)
        if ctx.is_main:
            self.ckpts.save(step, model, {**model, **ema} if ema is not None else None, opt, host_state)
        self.strategy.barrier(self.out / ".sync", f"saved-{step}")

    def restore(self, resume: str) -> tuple[Path, dict]:
        """Load the checkpoint `resume=` names (a run: its newest intact checkpoint; a checkpoints/step_N folder:
        that one) into the model, EMA and optimiser; returns (its folder, its host state)."""
        for ckpt in self.ckpts.candidates(resume):
            try:
                state = self._load(ckpt)
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                if Path(resume).resolve() == ckpt.resolve():  # the one asked for: no fallback
                    raise
                log.warning("checkpoint %s does not load (%s); falling back to the previous one", ckpt,
                            str(e).splitlines()[0] if str(e) else type(e).__name__)
                continue
            return ckpt, state
        raise FileNotFoundError(f"resume={resume}: no checkpoint of {self.ckpts.dir} loads")

    def _load(self, ckpt: Path) -> dict:
        state = load_state(ckpt)
        load_params_into(self.model_params, ckpt / "model.ckpt")
        if self.update.ema is not None:
            if not (ckpt / "ema.ckpt").is_file():
                raise KeyError(f"{ckpt} has no ema.ckpt, but optim.ema_decay is set: the run was trained without an "
                               "EMA; resume with optim.ema_decay=null")
            load_params_into(self.update.ema, ckpt / "ema.ckpt", strict=True)
        load_params_into(self.opt_state, ckpt / "optimizer.ckpt")
        # absent when the run being resumed had no loss scale (or another kind): the scale starts afresh
        load_params_into(self.scale_state, ckpt / "optimizer.ckpt", strict=False)
        return state

    def host_state(self, loader, rng, logger, loss_avg: Optional[float], seed: int) -> dict:
        return {"data": loader.state(), "rng": rng.bit_generator.state, "wandb_run_id": logger.run_id,
                "loss_avg": loss_avg, "seed": int(seed)}
