"""Train task: a graph-compiled diffusion train step with AdamW, clipping and EMA; atomic
checkpoints every N steps; exact resume; held-out sampling and evaluation at the end."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Optional

import mindspore as ms
import numpy as np
from hydra.utils import instantiate
from mindspore import nn, ops
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from opensora.config import check_precision
from opensora.data import build_dataset
from opensora.data.loader import BatchLoader, prepare_batch
from opensora.logger import build_logger
from opensora.parallel import broadcast_params, get_parallel, grad_reducer, ranks_in_sync, sync_ranks
from opensora.parallel.sequence import apply_sequence_parallel, frame_shard
from opensora.parallel.zero import MeanOverRanks, ShareWeights, ZeroState, log_state_sizes, native_full_values, \
    plan_shards
from opensora.tasks.common import build_model, build_text_encoder, generate, record_run, run_dir, save_samples, \
    score_samples
from opensora.utils.checkpoint import CheckpointManager, load_params_into, load_state

log = logging.getLogger(__name__)


class DiffusionLoss(nn.Cell):
    """Mean IDDPM training loss (MSE on eps + VLB) of `model` for given x0, t and noise; drop_ids [B]
    (1 = train that sample on the null caption) or None for the model's own random caption dropout."""

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


class TrainStep(nn.Cell):
    """One optimisation step, compiled as one graph:

    loss, grads (of loss * loss_scale when scaling) -> mean over ranks (data parallel) -> unscale ->
    overflow check -> global-norm clip -> AdamW -> EMA update. A step whose gradients are not all
    finite changes no weight, optimiser state or EMA; it is counted (`skipped_steps`) and, with a
    dynamic scale, halves the scale. After `scale_window` finite steps in a row the scale doubles.

    With `share` (parallel=zero, opensora.parallel.zero) the optimiser and `ema` cover only the
    parameters this rank owns: loss and gradients are averaged in one flat AllReduce (`MeanOverRanks`,
    in place of `grad_reducer`), the clipped full gradient is cut down to the owned parameters, and
    after the update `share` all-gathers the owners' weights so every rank holds the whole model.

    loss_scale: None, or {"kind": "dynamic" | "static", "value", "factor", "window"}.
    Returns (loss, grad_norm, grads_finite, loss_scale used); loss is the mean over ranks.
    """

    def __init__(self, loss_net: nn.Cell, optimizer, grad_clip: float, ema: Optional[ms.ParameterTuple],
                 ema_decay: float, loss_scale: Optional[dict] = None, grad_reducer: Optional[nn.Cell] = None,
                 world_size: int = 1, share: Optional[ShareWeights] = None):
        super().__init__()
        self.optimizer = optimizer
        self.share = share
        self.sharded = share is not None
        self.weights = share.weights if self.sharded else optimizer.parameters  # all trainable parameters
        self.own = share.own if self.sharded else ()  # indices (into weights) of those this rank updates
        # the weights the optimiser and the EMA update, in the optimiser's order
        self.own_weights = ms.ParameterTuple([self.weights[i] for i in self.own]) if self.sharded else self.weights
        self.average = MeanOverRanks(self.weights, world_size) if self.sharded else None
        self.grad_clip = float(grad_clip) if grad_clip else 0.0
        self.ema = ema
        self.use_ema = ema is not None
        self.decay = float(ema_decay)
        self.scaling = loss_scale is not None
        self.dynamic = self.scaling and loss_scale["kind"] == "dynamic"
        if self.scaling:
            self.grad_fn = ms.value_and_grad(ScaledLoss(loss_net), None, self.weights, has_aux=True)
        else:
            self.grad_fn = ms.value_and_grad(loss_net, None, self.weights)
        ls = loss_scale or {}
        self.loss_scale = ms.Parameter(ms.Tensor(float(ls.get("value", 1.0)), ms.float32), name="loss_scale",
                                       requires_grad=False)
        self.good_steps = ms.Parameter(ms.Tensor(0, ms.int32), name="loss_scale_good_steps", requires_grad=False)
        self.skipped_steps = ms.Parameter(ms.Tensor(0, ms.int32), name="skipped_steps", requires_grad=False)
        self.scale_factor = float(ls.get("factor", 2))
        self.scale_window = int(ls.get("window", 2000))
        self.reducer = grad_reducer
        self.distributed = grad_reducer is not None
        self.world = float(world_size)
        self.allreduce = ops.AllReduce() if self.distributed else None
        self.true = ms.Tensor(True, ms.bool_)

    def scale_state(self) -> dict[str, ms.Parameter]:
        """Loss-scale state, checkpointed with the optimiser."""
        return {"loss_scale": self.loss_scale, "loss_scale_good_steps": self.good_steps,
                "skipped_steps": self.skipped_steps}

    def apply(self, grads, grad_norm):
        if self.grad_clip > 0:  # clip by the global norm of the full gradient (ops.clip_by_global_norm's maths)
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
        scale = ops.stop_gradient(self.loss_scale * 1.0)
        if self.scaling:
            (_, loss), grads = self.grad_fn(scale, *inputs)
        else:
            loss, grads = self.grad_fn(*inputs)
        if self.sharded:
            loss, grads = self.average(loss, grads)  # mean over ranks
        elif self.distributed:
            grads = self.reducer(grads)  # mean over ranks
            loss = self.allreduce(loss) / self.world
        if self.scaling:
            inv_scale = 1.0 / scale  # exact: the scale is a power of two unless set otherwise
            grads = tuple(g * ops.broadcast_to(inv_scale, g.shape) for g in grads)
        grad_norm = ops.sqrt(ops.addn([ops.reduce_sum(ops.square(g)) for g in grads]))
        finite = self.true
        if self.scaling:
            finite = ops.stack([ops.isfinite(g).all() for g in grads]).all()
            if finite:
                self.apply(grads, grad_norm)
            else:
                ops.assign_add(self.skipped_steps, ms.Tensor(1, ms.int32))
            if self.dynamic:
                good = ops.select(finite, self.good_steps + 1, ops.zeros_like(self.good_steps))
                grow = good >= self.scale_window
                new_scale = ops.select(finite, ops.select(grow, scale * self.scale_factor, scale),
                                       ops.maximum(scale / self.scale_factor, ops.ones_like(scale)))
                ops.assign(self.loss_scale, new_scale)
                ops.assign(self.good_steps, ops.select(grow, ops.zeros_like(good), good))
        else:
            self.apply(grads, grad_norm)
        if self.sharded:  # after skipped steps too: then it rewrites unchanged values
            self.share()
        return loss, grad_norm, finite, scale


def loss_scale_settings(precision) -> Optional[dict]:
    """TrainStep's loss_scale argument from the precision config (None without a loss scale)."""
    if precision is None or precision.get("loss_scale") is None:
        return None
    return {"kind": str(precision.loss_scale), "value": float(precision.loss_scale_value),
            "factor": int(precision.loss_scale_factor), "window": int(precision.loss_scale_window)}


def sample_timesteps(rng: np.random.Generator, batch: int, num_timesteps: int, kind: str = "uniform",
                     power: float = 1.0) -> np.ndarray:
    """Training timesteps: `uniform` over {0..T-1} (the original) or `power`: floor(T * u^(1/power))."""
    if kind == "uniform":
        return rng.integers(0, num_timesteps, size=batch).astype(np.int32)
    if kind == "power":
        u = rng.random(batch) ** (1.0 / power)
        return np.minimum((u * num_timesteps).astype(np.int32), num_timesteps - 1)
    raise ValueError(f"task.timestep_sampling.kind={kind!r} is not one of: uniform, power")


def named_params(cell: nn.Cell) -> dict[str, ms.Parameter]:
    """{name: Parameter} with names relative to `cell` (MindSpore prefixes Parameter.name once a cell is
    nested in another, so `p.name` is not stable; these names equal the original checkpoint keys)."""
    return dict(cell.parameters_and_names())


def make_ema(model: nn.Cell, names: Optional[list[str]] = None) -> dict[str, ms.Parameter]:
    """fp32 copies of the trainable parameters (or of those in `names`), keyed like the model's."""
    return {n: ms.Parameter(p.data.copy().astype(ms.float32), name=f"ema.{n}", requires_grad=False)
            for n, p in named_params(model).items() if p.requires_grad and (names is None or n in names)}


def build_train_step(cfg: DictConfig, model: nn.Cell, diffusion):
    """AdamW, the fp32 EMA and the TrainStep for `model` as configured (optim, precision, parallel).

    Returns (step_fn, optimizer, model_params, ema); model_params/ema are {name: Parameter} keyed
    like the model's checkpoint. Under parallel=zero (CPU path) the optimiser and the EMA hold only
    this rank's parameters, and `step_fn.zero_state` (a ZeroState) assembles the full state; it is
    None otherwise.
    """
    par = get_parallel()
    model_params = named_params(model)  # taken before nesting renames Parameter.name
    names = [n for n, p in model_params.items() if p.requires_grad]  # the optimiser's order
    weights = [model_params[n] for n in names]
    make_optimizer = instantiate(cfg.optim.optimizer)
    zero_state, share = None, None
    if par.mode == "zero" and not par.native_zero:
        plan = plan_shards([p.size for p in weights], par.world_size)
        zero_state = ZeroState(plan, par.rank, names, weights)  # with the optimiser: records Parameter names
        optimizer = make_optimizer([weights[i] for i in zero_state.own])
        share = ShareWeights(weights, plan, par.rank)
        ema = make_ema(model, zero_state.own_names) if cfg.optim.ema_decay else None
    else:
        optimizer = make_optimizer(weights)
        ema = make_ema(model) if cfg.optim.ema_decay else None
    # EMA entries in the order of the weights the optimiser updates, which the train step zips them with.
    ema_tuple = ms.ParameterTuple([ema[n] for n in names if n in ema]) if ema else None
    step_fn = TrainStep(DiffusionLoss(model, diffusion), optimizer, cfg.optim.grad_clip, ema_tuple,
                        cfg.optim.ema_decay, loss_scale=loss_scale_settings(cfg.get("precision")),
                        grad_reducer=None if share is not None else grad_reducer(optimizer.parameters),
                        world_size=par.world_size, share=share)
    step_fn.set_train(True)
    model.set_train(True)  # the model is reached only through grad_fn, which set_train does not walk
    step_fn.zero_state = zero_state
    return step_fn, optimizer, model_params, ema


def global_slice(draw, rank: int, per_rank: int):
    """Rows [rank * per_rank, (rank + 1) * per_rank) of a draw made for the whole global batch, so a
    data-parallel rank uses the same timesteps/noise one process with the global batch would."""
    return draw[rank * per_rank:(rank + 1) * per_rank]


def optimizer_state(optimizer, weights) -> dict[str, ms.Parameter]:
    own = {id(w) for w in weights}
    return {n: p for n, p in optimizer.parameters_and_names() if id(p) not in own}


def full_training_state(step_fn, model_params: dict, ema: Optional[dict], opt_state: Optional[dict], scratch_dir: Path,
                        keep: bool = True):
    """(model, EMA, optimiser state) as whole tensors {key: value}, whatever the parallel mode.

    Under parallel=zero the values are assembled from the ranks that own them, so every rank must call
    this at the same point; ranks with keep=False take part but get the local values back. opt_state
    None: the optimiser state is not needed (not gathered).
    """
    par = get_parallel()
    if par.native_zero:  # Ascend: MindSpore's slices, merged by its integrated save
        groups = native_full_values(step_fn, [model_params, ema or {}, opt_state or {}],
                                    str(scratch_dir / f".tmp-gather-rank{par.rank}.ckpt"))
        return groups[0], (groups[1] if ema is not None else None), (groups[2] if opt_state is not None else None)
    zero = step_fn.zero_state
    if zero is None or not keep:
        if zero is not None:  # take part in the collectives
            if ema is not None:
                zero.full_ema(ema, keep=False)
            if opt_state is not None:
                zero.full_optimizer_state(opt_state, keep=False)
        return model_params, ema, opt_state
    return (model_params, zero.full_ema(ema) if ema is not None else None,
            zero.full_optimizer_state(opt_state) if opt_state is not None else None)


def warn_config_changes(cfg: DictConfig, saved_path: Path) -> None:
    """Log the settings a resumed run changes compared with the run it continues."""
    if not saved_path.is_file():
        return
    saved = OmegaConf.to_container(OmegaConf.load(saved_path))
    now = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    a, b = dict(flat(saved)), dict(flat(now))
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in ("resume",))
    for k in changed:
        log.warning("resumed run changes %s: %r -> %r", k, a.get(k), b.get(k))


def run(cfg: DictConfig) -> float:
    check_precision(cfg.precision, training=True)
    par = get_parallel()
    out = run_dir(cfg)
    task = cfg.task
    ckpts = CheckpointManager(out, keep_last=int(task.keep_last))
    resume_from = None
    if cfg.get("resume"):
        resume_from = ckpts.latest()
        if resume_from is None:
            raise FileNotFoundError(f"resume={cfg.resume}: no checkpoint in {ckpts.dir} "
                                    "(the run was killed before its first checkpoint, or this is not a run directory)")
        if par.is_main:
            warn_config_changes(cfg, out / "config_resolved.yaml")
    elif ckpts.latest() is not None:  # e.g. a training stage's fixed directory: never mix two runs' checkpoints
        raise FileExistsError(f"{out} already holds checkpoints of an earlier run (latest: {ckpts.latest().name}): "
                              f"continue that run with resume={out}, or move the directory away to start over")
    if par.is_main:
        record_run(cfg, out)

    dataset = build_dataset(cfg)
    # one data shard per data-parallel rank; the ranks of a sequence group share theirs
    loader = BatchLoader(dataset, int(cfg.data.batch_size), seed=int(cfg.seed), rank=par.data_rank,
                         world_size=par.data_size, num_workers=int(cfg.data.get("num_workers", 0)),
                         prefetch=int(cfg.data.get("prefetch", 2)), max_bad_fraction=cfg.data.get("max_bad_fraction", 0.1))
    # Under msrun, ranks wait for each other here where one may be far behind (files in the run directory).
    sync_dir = out / ".sync"
    # Cached embeddings (data.text_embed_folder / data.video_embed_folder) replace the text encoder / VAE.
    if not par.is_main:  # rank 0 first writes what the run directory shares (tokenizer, text encoder)
        sync_ranks(sync_dir, "shared-files")
    text_encoder = None if cfg.data.get("text_embed_folder") else \
        build_text_encoder(cfg, captions=getattr(dataset, "captions", None))
    if par.is_main:
        sync_ranks(sync_dir, "shared-files")
    vae = None if cfg.data.get("video_embed_folder") else instantiate(cfg.vae)
    model = build_model(cfg)
    if par.mode == "sequence":  # this rank computes its share of each video's frames
        apply_sequence_parallel(model, par, cfg.parallel.sequence_attention)
    diffusion = instantiate(cfg.scheduler, num_sampling_steps=None)

    broadcast_params(named_params(model).values())  # every rank starts from rank 0's weights

    lr_at = instantiate(cfg.optim.lr_schedule, base_lr=float(cfg.optim.lr), max_steps=int(task.max_steps))
    step_fn, optimizer, model_params, ema = build_train_step(cfg, model, diffusion)
    lr_param = optimizer.param_groups[0]["lr"]
    opt_state = optimizer_state(optimizer, step_fn.weights)
    scale_state = step_fn.scale_state()
    if step_fn.zero_state is not None:  # what each rank holds, from its own optimiser and EMA
        log_state_sizes(*step_fn.zero_state.state_bytes(opt_state), "optimizer state", par.rank, par.world_size)
        if ema is not None:
            log_state_sizes(*step_fn.zero_state.ema_bytes(ema), "EMA", par.rank, par.world_size)
    # caption dropout: drawn on the host for the global batch, like timesteps and noise
    drop_prob = float(getattr(model.y_embedder, "uncond_prob", 0.0) or 0.0)

    step, wandb_id, loss_avg = 0, None, None
    rng = np.random.default_rng(int(cfg.seed))
    if resume_from is not None:
        state = load_state(resume_from)
        load_params_into(model_params, resume_from / "model.ckpt")
        if ema is not None:
            load_params_into(ema, resume_from / "ema.ckpt", strict=False)
        load_params_into(opt_state, resume_from / "optimizer.ckpt")
        if step_fn.scaling:  # absent when the run being resumed had no loss scale
            load_params_into(scale_state, resume_from / "optimizer.ckpt", strict=False)
        step, wandb_id, loss_avg = int(state["step"]), state.get("wandb_run_id"), state.get("loss_avg")
        loader.load_state(state["data"])
        rng.bit_generator.state = state["rng"]
        ms.set_seed(int(cfg.seed) + step)  # fresh, deterministic stream for op randomness (e.g. VAE latent sampling)
        log.info("resumed from %s at step %d", resume_from, step)

    logger = build_logger(cfg, resume_id=wandb_id, rank=par.rank)
    exit_code = 1
    try:
        saved_at = [step if resume_from is not None else None]  # step of the latest checkpoint

        def save(at_step: int) -> None:
            saved_at[0] = at_step
            if par.distributed and not par.native_zero:  # rank 0 writes for all: check they hold the same weights
                if not ranks_in_sync(model_params.values()):
                    raise RuntimeError(f"step {at_step}: the model weights differ between the {par.world_size} "
                                       "ranks (data-parallel replicas diverged); not saving a checkpoint")
                log.info("step %d: weights identical on all %d ranks", at_step, par.world_size)
            # under zero: the owners' optimiser state and EMA, gathered (all ranks take part)
            model_out, ema_out, opt_out = full_training_state(
                step_fn, model_params, ema, {**opt_state, **scale_state} if step_fn.scaling else opt_state, out,
                keep=par.is_main)
            if par.is_main:
                # The EMA file holds a whole model (frozen buffers included), so it loads like model.ckpt.
                ckpts.save(at_step, model_out, {**model_out, **ema_out} if ema_out is not None else None, opt_out,
                           {"data": loader.state(), "rng": rng.bit_generator.state, "wandb_run_id": logger.run_id,
                            "loss_avg": loss_avg, "seed": int(cfg.seed)})
            sync_ranks(sync_dir, f"saved-{at_step}")

        # decided on every rank alike: under zero, evaluation first gathers the EMA from all ranks
        eval_enabled = bool(task.get("eval") and cfg.data.get("evaluator") and hasattr(dataset, "heldout_prompts"))
        evaluator = HeldoutEvaluator(cfg, dataset, text_encoder, vae, out, logger) \
            if eval_enabled and par.is_main else None
        eval_every = int(task.eval.get("every", 0) or 0) if eval_enabled else 0

        def evaluate(at_step: int) -> dict:
            model_out, ema_out, _ = full_training_state(step_fn, model_params, ema, None, out, keep=par.is_main)
            scores = evaluator(model_out, ema_out, at_step) if evaluator is not None else {}
            sync_ranks(sync_dir, f"evaluated-{at_step}")
            return scores
        batches = iter(loader)
        bar = tqdm(total=int(task.max_steps), initial=step, desc="train", dynamic_ncols=True,
                   disable=not par.is_main)
        t_last, steps_since, overflows_in_row, compiled = time.perf_counter(), 0, 0, False
        while step < int(task.max_steps):
            x, emb = prepare_batch(next(batches), vae, text_encoder)
            # drawn for the global batch on every rank; each rank takes its own rows (and, under
            # sequence parallelism, its own frames of the video and the noise)
            n, B = x.shape[0], x.shape[0] * par.data_size
            t = global_slice(sample_timesteps(rng, B, diffusion.num_timesteps, task.timestep_sampling.kind,
                                              float(task.timestep_sampling.power)), par.data_rank, n)
            noise = global_slice(rng.standard_normal((B, *x.shape[1:])).astype(np.float32), par.data_rank, n)
            drop = global_slice(rng.random(B) < drop_prob, par.data_rank, n) if drop_prob > 0 else np.zeros(n, bool)
            x, noise = frame_shard(x, par), frame_shard(noise, par)
            lr = lr_at(step)
            lr_param.set_data(ms.Tensor(lr, ms.float32))
            inputs = (ms.Tensor(x), ms.Tensor(t), ms.Tensor(noise), ms.Tensor(emb["y"]), ms.Tensor(emb["mask"]),
                      ms.Tensor(drop.astype(np.int32)))
            if not compiled and par.distributed:
                # ranks finish compiling at different times (under zero each compiles its own graph): compile,
                # then meet, so the step's first collective does not wait out CPU collectives' 30 s limit
                step_fn.compile(*inputs)
                sync_ranks(sync_dir, "train-step-compiled")
            compiled = True
            loss, grad_norm, finite, scale = step_fn(*inputs)
            loss, grad_norm, finite = float(loss.asnumpy()), float(grad_norm.asnumpy()), bool(finite.asnumpy())
            if not finite:  # only with a loss scale: the step was skipped and counted
                overflows_in_row += 1
                scale = float(scale.asnumpy())
                log.info("step %d: non-finite gradients at loss scale %g, step skipped", step + 1, scale)
                if scale <= 1.0 or overflows_in_row >= 50:
                    raise FloatingPointError(f"step {step + 1}: gradients non-finite {overflows_in_row} steps in a row "
                                             f"(loss scale {scale:g}, loss {loss}); lower optim.lr, use "
                                             "precision=fp32 or check the data")
            elif not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step + 1}; lower optim.lr or check the data")
            else:
                overflows_in_row = 0
            step += 1
            steps_since += 1
            if finite:
                loss_avg = loss if loss_avg is None else 0.98 * loss_avg + 0.02 * loss
            bar.update(1)
            if step % int(task.log_every) == 0 or step == int(task.max_steps):
                now = time.perf_counter()
                sps = steps_since / max(now - t_last, 1e-9)
                t_last, steps_since = now, 0
                shown = loss_avg if loss_avg is not None else math.nan  # None until a step was not skipped
                bar.set_postfix(loss=f"{shown:.4f}", lr=f"{lr:.2e}", steps_s=f"{sps:.2f}")
                logs = {"train/loss": loss, "train/loss_avg": loss_avg, "train/lr": lr,
                        "train/grad_norm": grad_norm, "train/steps_per_s": sps,
                        "train/samples_per_s": sps * B, "train/epoch": loader.epoch}
                if step_fn.scaling:
                    logs.update({"train/loss_scale": float(step_fn.loss_scale.asnumpy()),
                                 "train/skipped_steps": int(step_fn.skipped_steps.asnumpy())})
                logger.log(logs, step=step)
            if int(task.ckpt_every) > 0 and step % int(task.ckpt_every) == 0:
                save(step)
            if eval_every > 0 and step % eval_every == 0 and step < int(task.max_steps):
                evaluate(step)
        bar.close()
        # decided from this process's own record, not the files, so all ranks agree (save is collective)
        if int(task.ckpt_every) > 0 and saved_at[0] != step:
            save(step)

        metrics = {"train/final_loss_avg": loss_avg, "data/bad_samples": loader.num_bad_samples}
        if loader.num_bad_samples:
            log.warning("data: %d bad sample(s) skipped (logged above; first: %s)", loader.num_bad_samples,
                        next(iter(loader.bad_samples), "?"))
        if step_fn.scaling:
            metrics["train/skipped_steps"] = int(step_fn.skipped_steps.asnumpy())
        if eval_enabled:
            metrics.update(evaluate(step))
        logger.summary(metrics)
        for k, v in metrics.items():
            log.info("%s = %s", k, v)
        sync_ranks(sync_dir, "done")  # no rank leaves while another may still be receiving from it
        exit_code = 0
    finally:
        loader.close()
        logger.finish(exit_code)
    name = task.metric
    key = name if name in metrics else f"eval/{name}" if f"eval/{name}" in metrics else "train/final_loss_avg"
    return metrics[key]


class HeldoutEvaluator:
    """Samples the held-out prompts with the EMA weights (if kept) and scores them with `data.evaluator`.

    The sampling model is built once and refreshed from the training weights at each call, so
    periodic evaluation compiles its graph only once.
    """

    def __init__(self, cfg: DictConfig, dataset, text_encoder, vae, out: Path, logger):
        self.cfg, self.text_encoder, self.vae, self.out, self.logger = cfg, text_encoder, vae, out, logger
        ev = cfg.task.eval
        self.prompts = [p for p in dataset.heldout_prompts() for _ in range(int(ev.num_samples_per_prompt))]
        self.sampler = instantiate(cfg.scheduler)
        self.model = build_model(cfg, with_pretrained=False)  # weights are copied from training at each call

    def __call__(self, model_params: dict, ema: Optional[dict], step: int) -> dict:
        cfg, ev = self.cfg, self.cfg.task.eval
        values = {**model_params, **(ema or {})}
        for n, p in named_params(self.model).items():
            p.set_data(values[n].data.copy().astype(p.dtype))
        latent = [int(v) for v in cfg.model.input_size]
        videos = generate(self.model, self.text_encoder, self.vae, self.sampler, self.prompts, latent,
                          int(ev.batch_size), int(cfg.seed), progress=False)
        folder = self.out / "samples" / f"step_{step:06d}"
        save_samples(videos, self.prompts, folder, int(ev.fps), int(ev.upscale), self.logger, step, prefix="eval")
        return score_samples(cfg, videos, self.prompts, folder, self.logger, step)
