"""What the train loop asks of a parallel mode: one object per `conf/parallel/*.yaml`, built by `_target_`.

The loop never branches on the mode. It calls, in order:

    strategy.start()                          # process groups (after the device context is set)
    strategy.prepare_model(model)             # same initial weights everywhere; frames split (sequence)
    update = strategy.build_update(...)       # optimiser + EMA (+ shards) + how gradients are averaged
    strategy.rows(draw) / strategy.frames(x)  # this rank's part of what is drawn for the global batch
    strategy.compile(step_fn, inputs, folder) # compile, then meet (ranks compile at different speeds)
    strategy.full_state(...)                  # whole tensors for a checkpoint or an evaluation (collective)
    strategy.check_in_sync(params, step)      # before rank 0 writes for everyone
    strategy.barrier(folder, tag)             # where ranks can be far apart

`SingleProcess` (opensora/parallel/single.py) is the base behaviour; `DataParallel`, `ZeroParallel` and
`SequenceParallel` change what differs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import mindspore as ms
from mindspore import nn

from opensora.parallel import ParallelContext, broadcast_params, get_parallel, init_parallel, ranks_in_sync, \
    sync_ranks

log = logging.getLogger(__name__)


def global_rows(draw, data_rank: int, data_size: int):
    """Rows [rank * n, (rank + 1) * n) of something drawn for the global batch of data_size * n samples."""
    per = len(draw) // data_size
    return draw[data_rank * per:(data_rank + 1) * per]


def make_ema(params: Mapping[str, ms.Parameter], names: Optional[Sequence[str]] = None) -> dict[str, ms.Parameter]:
    """fp32 copies {name: Parameter} of the trainable `params` (or of those in `names`), keyed like the model's."""
    return {n: ms.Parameter(p.data.copy().astype(ms.float32), name=f"ema.{n}", requires_grad=False)
            for n, p in params.items() if p.requires_grad and (names is None or n in names)}


class IdentitySync(nn.Cell):
    """(loss, grads) as they are: one process."""

    def construct(self, loss, grads):
        return loss, grads


class MeanSync(nn.Cell):
    """(loss, grads) averaged over all ranks (AllReduce-mean), for data-parallel replicas."""

    def __init__(self, weights, world_size: int):
        super().__init__()
        from mindspore import ops

        self.reducer = nn.DistributedGradReducer(weights, mean=True, degree=world_size)
        self.allreduce = ops.AllReduce()
        self.world = float(world_size)

    def construct(self, loss, grads):
        return self.allreduce(loss) / self.world, self.reducer(grads)


@dataclass
class Update:
    """How the weights are updated on this rank: the optimiser and EMA over the parameters it updates (`own`:
    their indices in `weights`, all of them unless sharded), `sync` (averages loss and gradients over the ranks
    inside the compiled step), `share` (after the update, gives every rank the others' updated weights; None
    unless sharded) and `zero_state` (assembles sharded state; None unless sharded)."""

    weights: list
    optimizer: object
    ema: Optional[dict]
    sync: nn.Cell
    own: tuple = ()
    share: Optional[nn.Cell] = None
    zero_state: object = None
    sharded: bool = field(default=False)


class ParallelStrategy:
    """The interface (and single-process behaviour) of a parallel mode; settings as in ParallelConfig."""

    def __init__(self, mode: str = "single", sequence_size: Optional[int] = None, sequence_attention: str = "auto",
                 sync_timeout_s: float = 1800.0):
        self.mode = str(mode)
        self.sequence_size = sequence_size
        self.sequence_attention = str(sequence_attention)
        self.sync_timeout_s = float(sync_timeout_s)

    # ------------------------------------------------------------ start-up
    def start(self) -> ParallelContext:
        """Join the process group msrun set up (after the device context is set)."""
        return init_parallel(self)

    @property
    def ctx(self) -> ParallelContext:
        return get_parallel()

    # ------------------------------------------------------------ model
    def prepare_model(self, model: nn.Cell) -> None:
        """Every rank starts from rank 0's weights (no-op on one process)."""
        broadcast_params(dict(model.parameters_and_names()).values())

    def build_update(self, names: Sequence[str], weights: Sequence[ms.Parameter],
                     make_optimizer: Callable, ema_decay: Optional[float], params: Mapping) -> Update:
        """The optimiser over `weights` (trainable parameters, keyed `names`) and the fp32 EMA of `params`."""
        optimizer = make_optimizer(list(weights))
        ema = make_ema(params) if ema_decay else None
        return Update(list(weights), optimizer, ema, self.gradient_sync(optimizer.parameters))

    def gradient_sync(self, weights) -> nn.Cell:
        return IdentitySync()

    def report_state(self, update: Update, opt_state: Mapping) -> None:
        """Log how much training state this rank holds (sharded modes)."""

    # ------------------------------------------------------------ data
    def rows(self, draw):
        """This rank's rows of something drawn for the whole global batch (timesteps, noise, dropout), so ranks
        together use exactly what one process with the global batch would."""
        return global_rows(draw, self.ctx.data_rank, self.ctx.data_size)

    def frames(self, video):
        """This rank's frames of a [B, C, T, H, W] array (all of them unless frames are split)."""
        return video

    # ------------------------------------------------------------ compiled step
    def compile(self, step_fn: nn.Cell, inputs: tuple, folder: Path) -> None:
        """Compile the step before its first call (ranks compile at different speeds: they then meet)."""

    # ------------------------------------------------------------ state
    def full_state(self, update: Update, step_fn, model_params: Mapping, opt_state: Optional[Mapping],
                   scratch: Path, keep: bool = True):
        """(model, EMA, optimiser state) as whole tensors {key: value}; every rank must call it at the same point.
        opt_state None: the optimiser state is not needed."""
        return model_params, update.ema, opt_state

    def check_in_sync(self, params: Mapping, step: int) -> None:
        """Before rank 0 writes a checkpoint for all: the replicas must hold the same weights."""

    def barrier(self, folder: Path, tag: str) -> None:
        """Wait for every rank at `tag` (files in `folder`; no-op on one process)."""
        sync_ranks(folder, tag)


class ReplicatedStrategy(ParallelStrategy):
    """Modes where every rank holds the whole model and averages gradients over all ranks (data, sequence)."""

    def gradient_sync(self, weights) -> nn.Cell:
        return MeanSync(weights, self.ctx.world_size)

    def compile(self, step_fn, inputs, folder) -> None:
        step_fn.compile(*inputs)
        self.barrier(folder, "train-step-compiled")

    def check_in_sync(self, params, step) -> None:
        if not ranks_in_sync(params.values()):
            raise RuntimeError(f"step {step}: the model weights differ between the {self.ctx.world_size} ranks "
                               "(data-parallel replicas diverged); not saving a checkpoint")
        log.info("step %d: weights identical on all %d ranks", step, self.ctx.world_size)
