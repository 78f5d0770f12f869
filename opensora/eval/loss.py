"""Validation loss per (resolution, frames) bucket and per fixed timestep (Open-Sora 1.2's eval/loss/eval_loss.py,
for the IDDPM of 1.0 / 1.1): used by task=eval_loss and, every task.validate.every steps, by training.

For each (resolution, t) of the bucket config (batch size > 0), the samples of the validation CSV that fit that one
bucket alone (H x W >= 0.8 x its pixels and more than t x frame_interval frames; images for t = 1: the rule of
opensora/data/bucket.py with a one-bucket config, as the original builds `{res: {t: (1.0, bs)}}`), each at its
nearest aspect ratio, get the training loss (MSE + VB) at each of `num_timesteps` fixed timesteps
`linspace(0, T, n + 2)[1:-1]` truncated to integers (10 of 1000: 90, 181, ..., 909). Deterministic: the frame
window of epoch 0, the diffusion noise of (seed, row, timestep index) and the VAE's posterior noise of (seed, row),
no caption dropout, no frame masks (the loss of generating every frame). Every sample counts once: a last
partial batch is filled with repeats whose losses are left out (the original pads and counts them twice). A bad
file is skipped and counted.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import nn

from opensora.data.bucket import Bucket
from opensora.data.loader import BadSampleError, collate
from opensora.data.variable import SampleKey
from opensora.train.batch import model_inputs, posterior_shape

log = logging.getLogger(__name__)

COLUMNS = ["resolution", "num_frames", "samples"]


def eval_timesteps(num_timesteps: int, n: int) -> list[int]:
    """n timesteps evenly inside [0, num_timesteps]: linspace(0, T, n + 2)[1:-1], truncated (as torch's .long())."""
    return [int(v) for v in np.linspace(0, num_timesteps, n + 2)[1:-1]]


class EvalLoss(nn.Cell):
    """Per-sample training loss [B] of STDiT2 at given timesteps, without caption dropout or frame masks."""

    def __init__(self, model: nn.Cell, diffusion):
        super().__init__()
        self.model = model
        self.diffusion = diffusion

    def construct(self, x, t, noise, y, mask, num_frames, height, width, ar, fps):
        kwargs = {"y": y, "mask": mask, "num_frames": num_frames, "height": height, "width": width, "ar": ar,
                  "fps": fps}
        return self.diffusion.training_losses(self.model, x, t, model_kwargs=kwargs, noise=noise)["loss"]


class BucketLossEvaluator:
    """The validation loss of `model` on `dataset` (a VariableVideoTextDataset) per bucket of `bucket_config` and
    per timestep (see the module docstring). `shapes` = "dynamic" compiles one graph for every shape (the model's
    dynamic_shapes is set), "per_shape" one per shape."""

    def __init__(self, model, diffusion, dataset, bucket_config, frame_interval: int, text_encoder, vae,
                 seed: int, num_timesteps: int = 10, max_samples: Optional[int] = None, resolutions=None,
                 shapes: str = "per_shape"):
        self.model, self.diffusion, self.dataset = model, diffusion, dataset
        self.text_encoder, self.vae, self.seed = text_encoder, vae, int(seed)
        self.timesteps = eval_timesteps(diffusion.num_timesteps, int(num_timesteps))
        self.loss = EvalLoss(model, diffusion)
        self.loss.set_train(False)
        self.dynamic = shapes == "dynamic"
        if self.dynamic:
            model.dynamic_shapes = True
        self._dynamic_set = False
        full = Bucket(bucket_config, resolutions=resolutions)
        sizes = dataset.sizes
        self.buckets = []  # (res, t, batch size, {ar: rows})
        for res, t in full.enabled():
            bs = full.batch_size((res, t))
            one = Bucket({res: {t: [1.0, bs]}}, resolutions=resolutions)
            ids, _ = one.assign(sizes.num_frames, sizes.height, sizes.width, frame_interval, seed, 0)
            rows = np.flatnonzero(ids >= 0)
            if max_samples is not None:
                rows = rows[:int(max_samples)]
            groups = defaultdict(list)
            for r in rows:
                groups[one.buckets[ids[r]]].append(int(r))
            self.buckets.append((res, t, bs, {b: np.array(v) for b, v in groups.items()}, one))
        self.bad: dict[str, str] = {}

    def __len__(self) -> int:
        return sum(len(r) for *_, groups, _ in self.buckets for r in groups.values())

    def _batch(self, rows, bucket, one: Bucket):
        t, h, w = one.get_thw(bucket)
        items, real = [], []
        for r in rows:
            try:
                items.append(self.dataset.load(SampleKey(int(r), t, h, w), 0))
                real.append(int(r))
            except BadSampleError as e:
                if e.path not in self.bad:
                    log.warning("validation: skipping bad sample %s: %s", e.path, e.reason)
                self.bad[e.path] = e.reason
        return items, real

    def _losses(self, batch: dict, rows: list, bs: int) -> np.ndarray:
        """[len(rows), num_timesteps] losses of a (padded) batch."""
        posterior = None
        if self.vae is not None and "video" in batch:
            shape = posterior_shape(self.vae, np.shape(batch["video"]))
            if shape is not None:
                posterior = np.stack([np.random.default_rng([self.seed, r, 1]).standard_normal(shape[1:],
                                                                                               dtype=np.float32)
                                      for r in rows])
        x, emb = model_inputs(batch, self.vae, self.text_encoder, posterior)
        cond = [ms.Tensor(np.asarray(batch[k], np.float32).reshape(-1)) for k in
                ("num_frames", "height", "width", "ar", "fps")]
        out = np.zeros((len(rows), len(self.timesteps)), np.float64)
        for j, ts in enumerate(self.timesteps):
            noise = np.stack([np.random.default_rng([self.seed, r, 2, j]).standard_normal(x.shape[1:])
                              for r in rows]).astype(np.float32)
            inputs = (ms.Tensor(x), ms.Tensor(np.full(len(rows), ts, np.int32)), ms.Tensor(noise),
                      ms.Tensor(emb["y"]), ms.Tensor(emb["mask"]), *cond)
            if self.dynamic and not self._dynamic_set:
                from opensora.train.step import dynamic_inputs

                self.loss.set_inputs(*dynamic_inputs(inputs))
                self._dynamic_set = True
            out[:, j] = self.loss(*inputs).asnumpy()
        return out

    def __call__(self) -> list[dict]:
        """One row per bucket: resolution, num_frames, samples, the mean loss at each timestep (`t<ts>`), mean."""
        results = []
        self.model.set_train(False)
        for res, t, bs, groups, one in self.buckets:
            sums, count = np.zeros(len(self.timesteps)), 0
            for bucket, rows in groups.items():
                for start in range(0, len(rows), bs):
                    items, real = self._batch(rows[start:start + bs], bucket, one)
                    if not items:
                        continue
                    n = len(items)
                    pad = [items[i % n] for i in range(bs - n)]  # one shape per batch; repeats not counted
                    losses = self._losses(collate(items + pad), real + [real[i % n] for i in range(bs - n)], bs)
                    sums += losses[:n].sum(axis=0)
                    count += n
            row = {"resolution": res, "num_frames": t, "samples": count}
            row.update({f"t{ts}": (sums[j] / count if count else float("nan")) for j, ts in enumerate(self.timesteps)})
            row["mean"] = float(np.mean(sums / count)) if count else float("nan")
            results.append(row)
            if count == 0:
                log.warning("validation: no sample of the CSV fits bucket %s x %d frames", res, t)
        return results

    def metrics(self, results: list[dict], prefix: str = "val") -> dict:
        """{prefix/loss: mean over every evaluated (sample, timestep), prefix/loss/<res>x<t>: bucket means,
        prefix/loss_t<ts>: per timestep over every sample}."""
        buckets, total, n = {}, 0.0, 0
        per_t = np.zeros(len(self.timesteps))
        for r in results:
            if not r["samples"]:
                continue
            buckets[f"{prefix}/loss/{r['resolution']}x{r['num_frames']}"] = r["mean"]
            vals = np.array([r[f"t{ts}"] for ts in self.timesteps])
            per_t += vals * r["samples"]
            total += vals.mean() * r["samples"]
            n += r["samples"]
        if not n:
            return buckets
        return {f"{prefix}/loss": total / n, **buckets,
                **{f"{prefix}/loss_t{ts}": per_t[j] / n for j, ts in enumerate(self.timesteps)}}


def format_table(results: list[dict], timesteps: list[int]) -> str:
    head = f"{'bucket':>14} {'samples':>7} " + " ".join(f"{'t=' + str(t):>8}" for t in timesteps) + f" {'mean':>8}"
    lines = [head]
    for r in results:
        vals = " ".join(f"{r[f't{t}']:8.4f}" for t in timesteps)
        lines.append(f"{r['resolution'] + ' x ' + str(r['num_frames']):>14} {r['samples']:>7} {vals} {r['mean']:8.4f}")
    return "\n".join(lines)


def save_results(results: list[dict], timesteps: list[int], folder: Path, title: str) -> tuple[Path, Path]:
    """eval_loss.csv (one row per bucket) and eval_loss.png (loss against timestep, one line per bucket)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from opensora.utils.tensor_files import atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    csv = atomic_write(folder / "eval_loss.csv", lambda tmp: pd.DataFrame(results).to_csv(tmp, index=False))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        if r["samples"]:
            ax.plot(timesteps, [r[f"t{t}"] for t in timesteps], marker="o",
                    label=f"{r['resolution']} x {r['num_frames']} ({r['samples']})")
    ax.set_xlabel("timestep")
    ax.set_ylabel("loss (MSE + VB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = atomic_write(folder / "eval_loss.png", lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)
    return csv, png
