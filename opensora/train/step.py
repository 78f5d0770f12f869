"""The compiled train step: diffusion loss -> gradients (of the scaled loss) -> averaged over the ranks ->
unscaled -> overflow check -> global-norm clip -> AdamW -> EMA, as one graph.

Loss scaling uses MindSpore's own scalers (`mindspore.amp.DynamicLossScaler` / `StaticLossScaler`,
`mindspore.amp.all_finite`), which implement exactly the original recipes' rule: a step whose gradients are not
all finite changes no weight, optimiser state or EMA, is counted (`skipped_steps`) and, with a dynamic scale,
halves the scale (never below 1); after `window` finite steps in a row the scale grows by `factor`.
"""
from __future__ import annotations

import logging
from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import amp, nn, ops

from opensora.model.stdit2 import STDiT2
from opensora.parallel.strategy import Update

log = logging.getLogger(__name__)


class DiffusionLoss(nn.Cell):
    """Mean IDDPM training loss (MSE on eps + VLB) of `model` for given x0, t and noise; drop_ids [B] (1 = train
    that sample on the null caption) or None for the model's own random caption dropout."""

    def __init__(self, model: nn.Cell, diffusion):
        super().__init__()
        self.model = model
        self.diffusion = diffusion

    def construct(self, x, t, noise, y, mask, drop_ids=None):
        kwargs = {"y": y, "mask": mask, "force_drop_ids": drop_ids}
        terms = self.diffusion.training_losses(self.model, x, t, model_kwargs=kwargs, noise=noise)
        return terms["loss"].mean()


class SizedDiffusionLoss(nn.Cell):
    """STDiT2's (Open-Sora 1.1) loss of one micro-batch, times its `weight` (a scalar: 1, or the micro-batch's
    share of the step's samples, see `micro_batch_weight`): the IDDPM loss with the size conditioning
    (num_frames, height, width, ar, fps [B]) and, with masked training (`masked`), the frame mask x_mask [B, T]:
    its False frames get q_sample at t = 0, are modulated with timestep 0 inside STDiT2 and are left out of the
    MSE and the VB terms."""

    def __init__(self, model: nn.Cell, diffusion, masked: bool):
        super().__init__()
        self.model = model
        self.diffusion = diffusion
        self.masked = bool(masked)

    def construct(self, x, t, noise, y, mask, drop_ids, x_mask, num_frames, height, width, ar, fps, weight):
        # (the kwargs are built here whole: copying a dict of tensors inside a graph, as pass_x_mask does, makes
        # MindSpore run the model outside the graph)
        if self.masked:
            kwargs = {"y": y, "mask": mask, "force_drop_ids": drop_ids, "x_mask": x_mask, "num_frames": num_frames,
                      "height": height, "width": width, "ar": ar, "fps": fps}
            terms = self.diffusion.training_losses(self.model, x, t, model_kwargs=kwargs, noise=noise, mask=x_mask)
        else:
            kwargs = {"y": y, "mask": mask, "force_drop_ids": drop_ids, "num_frames": num_frames, "height": height,
                      "width": width, "ar": ar, "fps": fps}
            terms = self.diffusion.training_losses(self.model, x, t, model_kwargs=kwargs, noise=noise)
        return terms["loss"].mean() * weight


class ScaledLoss(nn.Cell):
    """(loss * scale, loss): the first is differentiated, the second returned as is (loss scaling)."""

    def __init__(self, loss_net: nn.Cell):
        super().__init__()
        self.loss_net = loss_net

    def construct(self, scale, *inputs):
        loss = self.loss_net(*inputs)
        return loss * scale, loss


def loss_scaler(precision) -> Optional[amp.LossScaler]:
    """The precision config's loss scaler (None without a loss scale)."""
    if precision is None or precision.get("loss_scale") is None:
        return None
    if str(precision.loss_scale) == "dynamic":
        return amp.DynamicLossScaler(float(precision.loss_scale_value), int(precision.loss_scale_factor),
                                     int(precision.loss_scale_window))
    return amp.StaticLossScaler(float(precision.loss_scale_value))


def sum_of_squares(g):
    """sum(g ** 2) as a reduction over the last axis and then one over the rest: MindSpore 2.10's CPU
    ReduceSum over all axes of a tensor is several times slower than the two (the global norm of the 15 M
    gradients of issue #13's benchmark model: 95 ms against 22 ms per step)."""
    if g.ndim < 2:
        return ops.reduce_sum(ops.square(g))
    return ops.reduce_sum(ops.reduce_sum(ops.square(g), -1))


class TrainStep(nn.Cell):
    """One optimisation step, compiled as one graph (see the module docstring).

    `update` (from the parallel strategy) holds the optimiser over the weights this rank updates, the EMA of
    those, how loss and gradients are averaged over the ranks (`sync`) and, when the optimiser state is sharded,
    the cell that gives every rank the others' updated weights afterwards (`share`).
    Returns (loss, grad_norm, grads_finite, loss scale used); loss is the mean over ranks.
    """

    def __init__(self, loss_net: nn.Cell, update: Update, grad_clip: Optional[float], ema_decay: Optional[float],
                 scaler: Optional[amp.LossScaler] = None):
        super().__init__()
        self.optimizer = update.optimizer
        self.weights = ms.ParameterTuple(update.weights)  # every trainable parameter (differentiated)
        self.sharded = update.sharded
        self.own = tuple(update.own)  # under sharding: the indices of the weights this rank updates
        self.own_weights = ms.ParameterTuple([update.weights[i] for i in self.own]) if self.sharded else self.weights
        self.sync = update.sync
        self.share = update.share
        self.grad_clip = float(grad_clip) if grad_clip else 0.0
        self.use_ema = update.ema is not None
        self.ema = ms.ParameterTuple(list(update.ema.values())) if self.use_ema else None
        self.decay = float(ema_decay or 0.0)
        self.scaler = scaler
        self.scaling = scaler is not None
        self.dynamic = isinstance(scaler, amp.DynamicLossScaler)
        if self.scaling:
            self.grad_fn = ms.value_and_grad(ScaledLoss(loss_net), None, self.weights, has_aux=True)
        else:
            self.grad_fn = ms.value_and_grad(loss_net, None, self.weights)
        self.skipped_steps = ms.Parameter(ms.Tensor(0, ms.int32), name="skipped_steps", requires_grad=False)
        self.one = ms.Tensor(1.0, ms.float32)
        self.true = ms.Tensor(True, ms.bool_)
        self.accumulate = 1  # micro-batches per update (AccumulatedStep sets more)

    def scale_state(self) -> dict[str, ms.Parameter]:
        """Loss-scale state, checkpointed with the optimiser (names kept from earlier checkpoints)."""
        state = {"skipped_steps": self.skipped_steps}
        if self.scaling:
            state["loss_scale"] = self.scaler.scale_value
        if self.dynamic:
            state["loss_scale_good_steps"] = self.scaler.counter
        return state

    def apply(self, grads, grad_norm):
        if self.grad_clip > 0:  # by the global norm of the full gradient (ops.clip_by_global_norm's maths)
            factor = self.grad_clip / ops.maximum(grad_norm, self.grad_clip)
            grads = tuple(g * ops.broadcast_to(factor, g.shape) for g in grads)  # explicit broadcast: see layers
        if self.sharded:
            grads = tuple([grads[i] for i in self.own])
        self.optimizer(grads)
        if self.use_ema:
            for e, w in zip(self.ema, self.own_weights):
                ops.assign_sub(e, (e - w) * (1.0 - self.decay))  # e d + w (1 - d), in 3 kernels instead of 4
        return True

    def loss_scale(self):
        return ops.stop_gradient(self.scaler.scale_value * 1.0) if self.scaling else self.one

    def gradients(self, scale, *inputs):
        """(loss, gradients of loss * scale) of one micro-batch on this rank."""
        if self.scaling:
            (_, loss), grads = self.grad_fn(scale, *inputs)
        else:
            loss, grads = self.grad_fn(*inputs)
        return loss, grads

    def construct(self, *inputs):
        scale = self.loss_scale()
        loss, grads = self.gradients(scale, *inputs)
        return self.update_from(loss, grads, scale)

    def update_from(self, loss, grads, scale):
        """The update from this rank's loss and (scaled) gradients; returns (loss, grad_norm, finite, scale)."""
        loss, grads = self.sync(loss, grads)  # mean over ranks (identity on one process)
        finite = self.true
        if self.scaling:
            grads = self.scaler.unscale(grads)
            finite = amp.all_finite(grads)
        grad_norm = ops.sqrt(ops.addn([sum_of_squares(g) for g in grads]))
        if self.scaling:
            if finite:
                self.apply(grads, grad_norm)
            else:
                ops.assign_add(self.skipped_steps, ms.Tensor(1, ms.int32))
            self.scaler.adjust(finite)
        else:
            self.apply(grads, grad_norm)
        if self.sharded:  # after skipped steps too: then it rewrites unchanged values
            self.share()
        return loss, grad_norm, finite, scale


class AddGradients(nn.Cell):
    """One micro-batch of an accumulated step: returns its loss and adds its (scaled) gradients into the
    accumulators (compiled once per input shape)."""

    def __init__(self, step: "AccumulatedStep"):
        super().__init__()
        self.step = step.step
        self.acc = step.acc

    def construct(self, *inputs):
        loss, grads = self.step.gradients(self.step.loss_scale(), *inputs)
        for a, g in zip(self.acc, grads):
            ops.assign_add(a, g)
        return loss


class ApplyGradients(nn.Cell):
    """The update of an accumulated step from the accumulators' mean (then zeroed): TrainStep's update."""

    def __init__(self, step: "AccumulatedStep"):
        super().__init__()
        self.step = step.step
        self.acc = step.acc
        self.inv = ms.Tensor(1.0 / step.count, ms.float32)

    def construct(self, loss):
        grads = tuple([a * self.inv for a in self.acc])
        out = self.step.update_from(loss, grads, self.step.loss_scale())
        for a in self.acc:
            ops.assign(a, ops.zeros_like(a))
        return out


class AccumulatedStep:
    """`count` micro-batches per update on this rank (task.grad_accumulation): each micro-batch's gradients are
    summed into fp32 accumulators by its own graph (`add`), then one graph (`apply`) takes their mean and runs
    TrainStep's update (mean over ranks, unscale, clip, AdamW, EMA). With R ranks of `count` micro-batches the
    update equals one process with R * count micro-batches of the same samples and draws (and a process with
    `count` micro-batches equals `count` ranks of one)."""

    def __init__(self, step: TrainStep, count: int):
        self.step, self.count = step, int(count)
        step.accumulate = self.count
        self.acc = ms.ParameterTuple([ms.Parameter(ops.zeros(w.shape, ms.float32), name=f"grad_accumulator.{i}",
                                                   requires_grad=False) for i, w in enumerate(step.weights)])
        self.add = AddGradients(self)
        self.apply = ApplyGradients(self)
        self.add.set_train(True)
        self.apply.set_train(True)

    def __getattr__(self, name):  # scaling, scaler, skipped_steps, scale_state, optimizer: the TrainStep's
        return getattr(self.step, name)

    def __call__(self, micro_batches):
        if len(micro_batches) != self.count:
            raise ValueError(f"an accumulated step takes {self.count} micro-batches, got {len(micro_batches)}")
        losses = [float(self.add(*inputs).asnumpy()) for inputs in micro_batches]
        return self.apply(ms.Tensor(sum(losses) / len(losses), ms.float32))


def build_train_step(cfg, model: nn.Cell, diffusion, strategy):
    """(step_fn, update, model_params) for `model` as configured (optim, precision) under `strategy`.

    model_params is {name: Parameter} keyed like the model's checkpoint; update.ema likewise (this rank's share
    under parallel=zero). With bucketed data (data.bucket_config) the loss is STDiT2's with size conditioning
    and frame masks (`SizedDiffusionLoss`); an STDiT2 on fixed-size data gets the same loss without masks; with
    task.grad_accumulation > 1 step_fn is an AccumulatedStep."""
    from hydra.utils import instantiate

    model_params = dict(model.parameters_and_names())  # taken before nesting renames Parameter.name
    names = [n for n, p in model_params.items() if p.requires_grad]  # the optimiser's order
    weights = [model_params[n] for n in names]
    make_optimizer = instantiate(cfg.optim.optimizer)
    ema_decay = cfg.optim.get("ema_decay")
    update = strategy.build_update(names, weights, make_optimizer, ema_decay, model_params)
    if update.ema is not None:  # in the order of the weights the step zips them with
        own_names = [names[i] for i in update.own] if update.sharded else names
        update.ema = {n: update.ema[n] for n in own_names if n in update.ema}
    if cfg.data.get("bucket_config") is not None:
        loss = SizedDiffusionLoss(model, diffusion, masked=cfg.data.get("mask_ratios") is not None)
        if str(cfg.task.get("shapes")) == "dynamic":
            if not hasattr(model, "dynamic_shapes"):
                raise ValueError(f"task.shapes=dynamic: {type(model).__name__} cannot be traced with dynamic shapes; "
                                 "use task.shapes=per_shape")
            model.dynamic_shapes = True
    elif isinstance(model, STDiT2):  # fixed-size data: the clip size of the data config (GlobalBatchFeed)
        loss = SizedDiffusionLoss(model, diffusion, masked=False)
    else:
        loss = DiffusionLoss(model, diffusion)
    step_fn = TrainStep(loss, update, cfg.optim.get("grad_clip"), ema_decay, loss_scaler(cfg.get("precision")))
    step_fn.set_train(True)
    model.set_train(True)  # the model is reached only through grad_fn, which set_train does not walk
    accumulate = int(cfg.task.get("grad_accumulation") or 1)
    if accumulate > 1:
        step_fn = AccumulatedStep(step_fn, accumulate)
    return step_fn, update, model_params


# ================================================================
# Running the step on variable shapes
# ================================================================


class StepRunner:
    """The train step as the loop calls it: one update from this rank's micro-batches of a step
    (`opensora.train.batch.StepInputs`).

    Fixed-size data: compiled before the first call (the strategy's `compile`), one graph. Bucketed data, where
    micro-batches change shape from step to step (`task.shapes`):
    - "per_shape": MindSpore compiles a graph for each new input shape and keeps it; a later micro-batch of a
      known shape runs its graph without compiling. Each compile is logged with its shape, seconds, the
      number of graphs kept and the process's memory.
    - "dynamic": one graph compiled with dynamic batch, frame and size dims (`Cell.set_inputs` with None),
      used for every shape.
    Under data parallel the ranks meet (a file barrier) after any rank compiled in a step: a rank compiling for
    minutes would otherwise make the others' collectives time out. Every rank knows every slot's shape from
    the plan, so they all decide alike.
    """

    def __init__(self, step_fn, strategy, sync, shapes: str = "fixed"):
        if shapes not in ("fixed", "per_shape", "dynamic"):
            raise ValueError(f"task.shapes={shapes!r}: expected per_shape or dynamic")
        self.step_fn, self.strategy, self.sync, self.shapes = step_fn, strategy, sync, shapes
        self.accumulated = isinstance(step_fn, AccumulatedStep)
        self.graph = step_fn.add if self.accumulated else step_fn  # the cell that sees the micro-batches
        self.compiled: set = set()  # (owner rank, slot key) pairs compiled somewhere
        self.local: dict = {}  # this rank's input signature -> seconds its compile took
        self.compile_seconds = 0.0

    @staticmethod
    def signature(inputs) -> tuple:
        return tuple(tuple(np.shape(v)) for v in inputs)

    def __call__(self, inputs, step: int):
        micro = [tuple(ms.Tensor(v) for v in mb) for mb in inputs.micro]
        if self.shapes == "fixed":
            if not self.compiled:
                self.strategy.compile(self.step_fn, micro[0], self.sync)
                self.compiled.add(None)
        else:
            self._compile_new(inputs, micro, step)
        if self.accumulated:
            return self.step_fn(micro)
        if len(micro) != 1:
            raise ValueError(f"{len(micro)} micro-batches for a step without task.grad_accumulation")
        return self.step_fn(*micro[0])

    def _compile_new(self, inputs, micro, step: int) -> None:
        import time

        per_rank = len(micro)
        if self.shapes == "dynamic":
            new_any = not self.compiled
        else:
            owners = [(k // per_rank, key) for k, key in enumerate(inputs.slot_keys)]
            new_any = any(o not in self.compiled for o in owners)
            self.compiled.update(owners)
        if not new_any:
            return
        for mb, v in zip(micro, inputs.micro):
            sig = self.signature(v)
            if self.shapes == "dynamic":
                if self.local:
                    break
                self.graph.set_inputs(*dynamic_inputs(mb))
            elif sig in self.local:
                continue
            start = time.perf_counter()
            self.graph.compile(*mb)
            if self.accumulated and not self.local:
                self.step_fn.apply.compile(ms.Tensor(0.0, ms.float32))
            seconds = time.perf_counter() - start
            self.local[sig] = seconds
            self.compile_seconds += seconds
            what = ("one dynamic-shape graph (batch, frames, height and width dims free), first inputs"
                    if self.shapes == "dynamic" else f"graph {len(self.local)} (task.shapes=per_shape)")
            log.info("step %d: compiled the train step for latents %s: %s, %.1f s, process memory %.2f GiB",
                     step + 1, list(sig[0]), what, seconds, _rss_gib())
        self.strategy.barrier(self.sync, f"train-step-compiled-{step}")


def dynamic_inputs(inputs) -> list:
    """Placeholders for `Cell.set_inputs`: each input's dtype with every dim that varies between buckets free
    (None): the batch dim of every input, and frames, height and width of 5-D latents / noise and the frame
    dim of the [B, T] frame mask; the caption's length and width stay fixed."""
    out = []
    for v in inputs:
        shape = list(v.shape)
        if len(shape) == 0:
            out.append(ms.Tensor(shape=[], dtype=v.dtype))
            continue
        free = [0]
        if len(shape) == 5:
            free += [2, 3, 4]
        elif len(shape) == 2 and v.dtype == ms.bool_:
            free += [1]
        out.append(ms.Tensor(shape=[None if i in free else d for i, d in enumerate(shape)], dtype=v.dtype))
    return out


def _rss_gib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**30
