"""The compiled train step: diffusion loss -> gradients (of the scaled loss) -> averaged over the ranks ->
unscaled -> overflow check -> global-norm clip -> AdamW -> EMA, as one graph.

Loss scaling uses MindSpore's own scalers (`mindspore.amp.DynamicLossScaler` / `StaticLossScaler`,
`mindspore.amp.all_finite`), which implement exactly the original recipes' rule: a step whose gradients are not
all finite changes no weight, optimiser state or EMA, is counted (`skipped_steps`) and, with a dynamic scale,
halves the scale (never below 1); after `window` finite steps in a row the scale grows by `factor`.
"""
from __future__ import annotations

from typing import Optional

import mindspore as ms
from mindspore import amp, nn, ops

from opensora.parallel.strategy import Update


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
                ops.assign(e, e * self.decay + w * (1.0 - self.decay))
        return True

    def construct(self, *inputs):
        if self.scaling:
            scale = ops.stop_gradient(self.scaler.scale_value * 1.0)
            (_, loss), grads = self.grad_fn(scale, *inputs)
        else:
            scale = self.one
            loss, grads = self.grad_fn(*inputs)
        loss, grads = self.sync(loss, grads)  # mean over ranks (identity on one process)
        finite = self.true
        if self.scaling:
            grads = self.scaler.unscale(grads)
            finite = amp.all_finite(grads)
        grad_norm = ops.sqrt(ops.addn([ops.reduce_sum(ops.square(g)) for g in grads]))
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


def build_train_step(cfg, model: nn.Cell, diffusion, strategy):
    """(step_fn, update, model_params) for `model` as configured (optim, precision) under `strategy`.

    model_params is {name: Parameter} keyed like the model's checkpoint; update.ema likewise (this rank's share
    under parallel=zero)."""
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
    step_fn = TrainStep(DiffusionLoss(model, diffusion), update, cfg.optim.get("grad_clip"), ema_decay,
                        loss_scaler(cfg.get("precision")))
    step_fn.set_train(True)
    model.set_train(True)  # the model is reached only through grad_fn, which set_train does not walk
    return step_fn, update, model_params
