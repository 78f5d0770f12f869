"""Train task: a compiled diffusion train step (opensora/train/step.py) fed with seeded, resumable batches;
atomic checkpoints every task.ckpt_every steps; exact resume; held-out evaluation. Everything that depends on
the parallel mode is the strategy's (opensora/parallel/strategy.py): this loop has no branch on it."""
from __future__ import annotations

import logging
import math
import time

import mindspore as ms
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm import tqdm

from opensora.data import build_dataset, build_loader
from opensora.logger import build_logger
from opensora.runtime import get_strategy
from opensora.tasks.common import build_model, build_text_encoder, record_run, run_dir
from opensora.train.batch import build_feed
from opensora.train.evaluate import HeldoutEvaluator, wants_evaluation
from opensora.train.state import TrainingState
from opensora.train.step import StepRunner, build_train_step
from opensora.train.validate import LossValidator

log = logging.getLogger(__name__)


def existing_checkpoints(out) -> list:
    from pathlib import Path

    return sorted(p.name for p in (Path(out) / "checkpoints").glob("step_*") if p.is_dir())


def earlier_run_message(out, earlier: list) -> str:
    return (f"{out} already holds checkpoints of an earlier run (latest: {earlier[-1]}): continue that run with "
            f"resume={out}, or move the directory away to start over")


def report_buckets(loader, logger, step: int) -> None:
    """The bucket report in the log and, as a table, in W&B."""
    import pandas as pd

    text, rows = loader.report()
    log.info("%s", text)
    logger.log_table("data/buckets", pd.DataFrame(rows, columns=["resolution", "frames", "ar", "height", "width",
                                                                 "batch_size", "samples", "trained"]), step=step)


def run(cfg: DictConfig) -> dict:
    strategy, task = get_strategy(), cfg.task
    ctx, out = strategy.ctx, run_dir(cfg)
    sync = out / ".sync"  # ranks meet through files here where one may be far behind
    resuming = cfg.get("resume") is not None
    earlier = existing_checkpoints(out)
    if not resuming and earlier:  # e.g. a training stage's fixed directory: never mix two runs' checkpoints
        raise FileExistsError(earlier_run_message(out, earlier))
    if ctx.is_main:
        record_run(cfg, out)

    dataset = build_dataset(cfg)
    loader = build_loader(cfg, dataset, ctx, out)  # fixed-size batches, or each step's bucket micro-batches
    if not ctx.is_main:  # rank 0 first writes what the run directory shares (a trained tokenizer)
        strategy.barrier(sync, "shared-files")
    text_encoder = None if cfg.data.get("text_embed_folder") else \
        build_text_encoder(cfg, captions=getattr(dataset, "captions", None))
    if ctx.is_main:
        strategy.barrier(sync, "shared-files")
    vae = None if cfg.data.get("video_embed_folder") else instantiate(cfg.vae)
    model = build_model(cfg)
    strategy.prepare_model(model)
    diffusion = instantiate(cfg.scheduler, num_sampling_steps=None)
    timesteps = instantiate(task.timestep_sampling)
    lr_at = instantiate(cfg.optim.lr_schedule, base_lr=float(cfg.optim.lr), max_steps=int(task.max_steps))
    step_fn, update, model_params = build_train_step(cfg, model, diffusion, strategy)
    lr_param = update.optimizer.param_groups[0]["lr"]
    state = TrainingState(out, int(task.keep_last), strategy, step_fn, update, model_params)
    strategy.report_state(update, state.opt_state)
    drop_prob = float(getattr(model.y_embedder, "uncond_prob", 0.0) or 0.0)  # caption dropout, drawn on the host

    step, wandb_id, loss_avg, rng = 0, None, None, np.random.default_rng(int(cfg.seed))
    feed = build_feed(cfg, strategy, vae, text_encoder, diffusion, timesteps, drop_prob, rng)  # draws, model inputs
    train_step = StepRunner(step_fn, strategy, sync, str(task.get("shapes") or "dynamic")
                            if cfg.data.get("bucket_config") is not None else "fixed")
    if resuming:
        ckpt, saved = state.restore(str(cfg.resume))
        step, wandb_id, loss_avg = int(saved["step"]), saved.get("wandb_run_id"), saved.get("loss_avg")
        loader.load_state(saved["data"])
        rng.bit_generator.state = saved["rng"]
        ms.set_seed(int(cfg.seed) + step)  # a fresh, deterministic stream for in-graph randomness
        log.info("resumed from %s at step %d", ckpt, step)

    logger = build_logger(cfg, resume_id=wandb_id, rank=ctx.rank)
    if hasattr(loader, "report"):  # bucketed data: samples per bucket, steps per epoch, dropped rows by reason
        report_buckets(loader, logger, step)
    evaluating = wants_evaluation(cfg, dataset)  # decided alike on every rank: evaluation gathers the EMA
    evaluator = HeldoutEvaluator(cfg, dataset, text_encoder, vae, out, logger) if evaluating and ctx.is_main else None
    eval_every = int(task.eval.every or 0) if evaluating else 0
    validating = bool(task.get("validate") and task.validate.get("csv_path"))  # the loss per bucket (bucketed data)
    validator = LossValidator(cfg, text_encoder, vae, diffusion, logger) if validating and ctx.is_main else None
    val_every = int(task.validate.every or 0) if validating else 0
    ckpt_every = int(task.ckpt_every or 0)

    def save(at: int) -> None:
        state.save(at, state.host_state(loader, rng, logger, loss_avg, int(cfg.seed)))
        saved_at[0] = at

    def evaluate(at: int, judge, tag: str) -> dict:
        model_w, ema_w, _ = state.full(with_optimizer=False, keep=ctx.is_main)
        scores = judge(model_w, ema_w, at) if judge is not None else {}
        strategy.barrier(sync, f"{tag}-{at}")
        return scores

    saved_at, exit_code, metrics = [step if resuming else None], 1, {}
    try:
        batches = iter(loader)
        bar = tqdm(total=int(task.max_steps), initial=step, desc="train", dynamic_ncols=True, disable=not ctx.is_main)
        t_last, since, overflows = time.perf_counter(), 0, 0
        while step < int(task.max_steps):
            inputs = feed(next(batches), step)  # this rank's micro-batches: model inputs and the step's draws
            lr = lr_at(step)
            lr_param.set_data(ms.Tensor(lr, ms.float32))
            loss, grad_norm, finite, scale = train_step(inputs, step)
            global_batch = inputs.samples
            loss, grad_norm, finite = float(loss.asnumpy()), float(grad_norm.asnumpy()), bool(finite.asnumpy())
            overflows = 0 if finite else overflows + 1
            if not finite:  # only with a loss scale: the step was skipped and counted
                scale = float(scale.asnumpy())
                log.info("step %d: non-finite gradients at loss scale %g, step skipped", step + 1, scale)
                if scale <= 1.0 or overflows >= 50:
                    raise FloatingPointError(f"step {step + 1}: gradients non-finite {overflows} steps in a row (loss "
                                             f"scale {scale:g}, loss {loss}); lower optim.lr, use precision=fp32 or "
                                             "check the data")
            elif not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step + 1}; lower optim.lr or check the data")
            else:
                loss_avg = loss if loss_avg is None else 0.98 * loss_avg + 0.02 * loss
            step, since = step + 1, since + 1
            bar.update(1)
            if step % int(task.log_every) == 0 or step == int(task.max_steps):
                now = time.perf_counter()
                sps, t_last, since = since / max(now - t_last, 1e-9), now, 0
                shown = loss_avg if loss_avg is not None else math.nan  # None until a step was not skipped
                bar.set_postfix(loss=f"{shown:.4f}", lr=f"{lr:.2e}", steps_s=f"{sps:.2f}")
                logs = {"train/loss": loss, "train/loss_avg": loss_avg, "train/lr": lr, "train/grad_norm": grad_norm,
                        "train/steps_per_s": sps, "train/samples_per_s": sps * global_batch,
                        "train/epoch": loader.epoch}
                if step_fn.scaling:
                    logs.update({"train/loss_scale": float(step_fn.scaler.scale_value.asnumpy()),
                                 "train/skipped_steps": int(step_fn.skipped_steps.asnumpy())})
                logger.log(logs, step=step)
            if ckpt_every and step % ckpt_every == 0:
                save(step)
            if eval_every and step % eval_every == 0 and step < int(task.max_steps):
                evaluate(step, evaluator, "evaluated")
            if val_every and step % val_every == 0 and step < int(task.max_steps):
                evaluate(step, validator, "validated")
        bar.close()
        if ckpt_every and saved_at[0] != step:  # from this process's own record: all ranks agree (save is collective)
            save(step)

        metrics = {"train/final_loss_avg": loss_avg, "data/bad_samples": loader.num_bad_samples}
        if loader.num_bad_samples:
            log.warning("data: %d bad sample(s) skipped (logged above; first: %s)", loader.num_bad_samples,
                        next(iter(loader.bad_samples), "?"))
        if step_fn.scaling:
            metrics["train/skipped_steps"] = int(step_fn.skipped_steps.asnumpy())
        if evaluating:
            metrics.update(evaluate(step, evaluator, "evaluated"))
        if validating:
            metrics.update(evaluate(step, validator, "validated"))
        logger.summary(metrics)
        for k, v in metrics.items():
            log.info("%s = %s", k, v)
        strategy.barrier(sync, "done")  # no rank leaves while another may still be receiving from it
        exit_code = 0
    finally:
        loader.close()
        logger.finish(exit_code)
    return metrics
