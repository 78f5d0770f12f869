"""Train task: a graph-compiled diffusion train step with AdamW, clipping and EMA; atomic
checkpoints every N steps; exact resume; held-out sampling and evaluation at the end."""
from __future__ import annotations

import json
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

from opensora.data.loader import BatchLoader
from opensora.logger import build_logger
from opensora.tasks.common import build_model, build_text_encoder, generate, record_run, run_dir, save_samples, \
    score_samples
from opensora.utils.checkpoint import CheckpointManager, load_params_into, load_state

log = logging.getLogger(__name__)


class DiffusionLoss(nn.Cell):
    """Mean IDDPM training loss (MSE on eps + VLB) of `model` for given x0, t and noise."""

    def __init__(self, model: nn.Cell, diffusion):
        super().__init__()
        self.model = model
        self.diffusion = diffusion

    def construct(self, x, t, noise, y, mask):
        terms = self.diffusion.training_losses(self.model, x, t, model_kwargs={"y": y, "mask": mask}, noise=noise)
        return terms["loss"].mean()


class TrainStep(nn.Cell):
    """loss, grads -> global-norm clip -> AdamW -> EMA update, compiled as one graph."""

    def __init__(self, loss_net: nn.Cell, optimizer, grad_clip: float, ema: Optional[ms.ParameterTuple],
                 ema_decay: float):
        super().__init__()
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        self.grad_fn = ms.value_and_grad(loss_net, None, self.weights)
        self.grad_clip = float(grad_clip) if grad_clip else 0.0
        self.ema = ema
        self.use_ema = ema is not None
        self.decay = float(ema_decay)

    def construct(self, x, t, noise, y, mask):
        loss, grads = self.grad_fn(x, t, noise, y, mask)
        grad_norm = ops.sqrt(ops.addn([ops.reduce_sum(ops.square(g)) for g in grads]))
        if self.grad_clip > 0:
            grads = ops.clip_by_global_norm(grads, self.grad_clip)
        self.optimizer(grads)
        if self.use_ema:
            for e, w in zip(self.ema, self.weights):
                ops.assign(e, e * self.decay + w * (1.0 - self.decay))
        return loss, grad_norm


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


def make_ema(model: nn.Cell) -> dict[str, ms.Parameter]:
    """fp32 copies of the trainable parameters, keyed like the model's."""
    return {n: ms.Parameter(p.data.copy().astype(ms.float32), name=f"ema.{n}", requires_grad=False)
            for n, p in named_params(model).items() if p.requires_grad}


def optimizer_state(optimizer, weights) -> dict[str, ms.Parameter]:
    own = {id(w) for w in weights}
    return {n: p for n, p in optimizer.parameters_and_names() if id(p) not in own}


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
    out = run_dir(cfg)
    task = cfg.task
    ckpts = CheckpointManager(out, keep_last=int(task.keep_last))
    resume_from = None
    if cfg.get("resume"):
        resume_from = ckpts.latest()
        if resume_from is None:
            raise FileNotFoundError(f"resume={cfg.resume}: no checkpoint in {ckpts.dir} "
                                    "(the run was killed before its first checkpoint, or this is not a run directory)")
        warn_config_changes(cfg, out / "config_resolved.yaml")
    record_run(cfg, out)

    dataset = instantiate(cfg.data.dataset)
    loader = BatchLoader(dataset, int(cfg.data.batch_size), seed=int(cfg.seed))
    text_encoder = build_text_encoder(cfg, captions=getattr(dataset, "captions", None))
    vae = instantiate(cfg.vae)
    model = build_model(cfg)
    diffusion = instantiate(cfg.scheduler, num_sampling_steps=None)

    lr_at = instantiate(cfg.optim.lr_schedule, base_lr=float(cfg.optim.lr), max_steps=int(task.max_steps))
    optimizer = instantiate(cfg.optim.optimizer)(model.trainable_params())
    lr_param = optimizer.param_groups[0]["lr"]
    ema = make_ema(model) if cfg.optim.ema_decay else None
    model_params = named_params(model)  # taken before nesting renames Parameter.name
    # EMA entries in the order of the optimiser's weights, which the train step zips them with.
    ema_tuple = ms.ParameterTuple([ema[n] for n, p in model_params.items() if p.requires_grad]) if ema else None
    step_fn = TrainStep(DiffusionLoss(model, diffusion), optimizer, cfg.optim.grad_clip, ema_tuple,
                        cfg.optim.ema_decay)
    opt_state = optimizer_state(optimizer, step_fn.weights)
    step_fn.set_train(True)

    step, wandb_id, loss_avg = 0, None, None
    rng = np.random.default_rng(int(cfg.seed))
    if resume_from is not None:
        state = load_state(resume_from)
        load_params_into(model_params, resume_from / "model.ckpt")
        if ema is not None:
            load_params_into(ema, resume_from / "ema.ckpt", strict=False)
        load_params_into(opt_state, resume_from / "optimizer.ckpt")
        step, wandb_id, loss_avg = int(state["step"]), state.get("wandb_run_id"), state.get("loss_avg")
        loader.load_state(state["data"])
        rng.bit_generator.state = state["rng"]
        ms.set_seed(int(cfg.seed) + step)  # fresh, deterministic stream for in-graph randomness (caption dropout)
        log.info("resumed from %s at step %d", resume_from, step)

    logger = build_logger(cfg, resume_id=wandb_id)
    exit_code = 1
    try:
        def save(at_step: int) -> None:
            # The EMA file holds a whole model (frozen buffers included), so it loads like model.ckpt.
            ckpts.save(at_step, model_params, {**model_params, **ema} if ema is not None else None, opt_state,
                       {"data": loader.state(), "rng": rng.bit_generator.state, "wandb_run_id": logger.run_id,
                        "loss_avg": loss_avg, "seed": int(cfg.seed)})

        evaluator = None
        if task.get("eval") and cfg.data.get("evaluator") and hasattr(dataset, "heldout_prompts"):
            evaluator = HeldoutEvaluator(cfg, dataset, text_encoder, vae, out, logger)
        eval_every = int(task.eval.get("every", 0) or 0) if task.get("eval") else 0
        batches = iter(loader)
        bar = tqdm(total=int(task.max_steps), initial=step, desc="train", dynamic_ncols=True)
        t_last, steps_since = time.perf_counter(), 0
        while step < int(task.max_steps):
            videos, captions = next(batches)
            x = vae.encode(videos)
            emb = text_encoder.encode(captions)
            t = sample_timesteps(rng, x.shape[0], diffusion.num_timesteps, task.timestep_sampling.kind,
                                 float(task.timestep_sampling.power))
            noise = rng.standard_normal(x.shape).astype(np.float32)
            lr = lr_at(step)
            lr_param.set_data(ms.Tensor(lr, ms.float32))
            loss, grad_norm = step_fn(ms.Tensor(x), ms.Tensor(t), ms.Tensor(noise), ms.Tensor(emb["y"]),
                                      ms.Tensor(emb["mask"]))
            loss, grad_norm = float(loss.asnumpy()), float(grad_norm.asnumpy())
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step + 1}; lower optim.lr or check the data")
            step += 1
            steps_since += 1
            loss_avg = loss if loss_avg is None else 0.98 * loss_avg + 0.02 * loss
            bar.update(1)
            if step % int(task.log_every) == 0 or step == int(task.max_steps):
                now = time.perf_counter()
                sps = steps_since / max(now - t_last, 1e-9)
                t_last, steps_since = now, 0
                bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{lr:.2e}", steps_s=f"{sps:.2f}")
                logger.log({"train/loss": loss, "train/loss_avg": loss_avg, "train/lr": lr,
                            "train/grad_norm": grad_norm, "train/steps_per_s": sps,
                            "train/samples_per_s": sps * x.shape[0], "train/epoch": loader.epoch}, step=step)
            if int(task.ckpt_every) > 0 and step % int(task.ckpt_every) == 0:
                save(step)
            if evaluator is not None and eval_every > 0 and step % eval_every == 0 and step < int(task.max_steps):
                evaluator(model_params, ema, step)
        bar.close()
        if int(task.ckpt_every) > 0 and not (ckpts.latest() and ckpts.latest().name == f"step_{step:06d}"):
            save(step)

        metrics = {"train/final_loss_avg": loss_avg}
        if evaluator is not None:
            metrics.update(evaluator(model_params, ema, step))
        logger.summary(metrics)
        for k, v in metrics.items():
            log.info("%s = %s", k, v)
        exit_code = 0
    finally:
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
        self.model = build_model(cfg)

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
