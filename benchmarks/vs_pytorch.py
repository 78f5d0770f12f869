"""Side by side on this machine: the PyTorch original STDiT (hpcaitech/Open-Sora v1.0.0) against this
project's, on the same configuration, weights and inputs.

    python benchmarks/vs_pytorch.py --reference-src /tmp/os100
    python benchmarks/vs_pytorch.py --reference-src /tmp/os100 --steps 5 --no-memory   # quicker

The reference checkout (never part of this repository; torch comes from the dev extra,
`pip install -e ".[dev]"`, which also brings einops, the original's own dependency):

    git clone https://github.com/hpcaitech/Open-Sora /tmp/os100 && git -C /tmp/os100 checkout v1.0.0
    # or from a bare mirror of it:
    mkdir -p /tmp/os100 && git --git-dir=MIRROR archive v1.0.0 | tar -x -C /tmp/os100

The original's modules are imported straight from that checkout (under the package name `_osref`, so
they do not collide with this project's `opensora`); only the pieces this CPU cannot run or that are
not installed are replaced at import time by their plain-torch equivalents: xformers'
memory_efficient_attention with a BlockDiagonalMask (CUDA-only) by scaled_dot_product_attention per
(query, key) block, timm's Mlp / DropPath (when timm is absent) by the same layers, the mmengine
registry by a no-op decorator, and the colossalai checkpoint helpers (not used) by nothing. The
optimiser is torch.optim.AdamW in place of colossalai's HybridAdam (same AdamW maths).

Configuration (the one of issue #13; every size is an option): STDiT depth 4, hidden 384, 6 heads,
patch (1, 2, 2), latent [2, 4, 8, 16, 16] = 512 tokens per sample, 120 caption tokens of width 4096,
learned variance (IDDPM MSE + VLB loss), AdamW (lr 2e-5, eps 1e-8, no weight decay), global-norm
clip 1.0, EMA 0.9999, fp32, `--threads` threads on each side.

  train step   loss + backward + clip + AdamW + EMA. Ours is the train task's own compiled step
               (opensora.tasks.train.build_train_step on the composed config, caption dropout drawn on
               the host as the train task does); the original's is its scripts/train.py loop body
               (scheduler.training_losses, backward, step, update_ema) in eager mode.
  sample step  one model forward on the classifier-free-guidance batch (2 x batch), eval mode.

What runs where:
  1. the weights: the original's initialisation, then the layers it zero-initialises get random
     values too (so every part of the model shapes the output); copied by name to our model.
  2. check: on the same weights and inputs both sides must give the same CFG-batch output and the
     same first-step loss and gradient norm (caption dropout off for that step), else the script stops.
  3. timing: both models live in this one process and their steps alternate (torch, ours, torch,
     ours, ..., each after a `--gap` pause), so both see the same machine load; medians of `--steps`
     steps after `--warmup`. On a machine shared with other jobs the ratios still move: torch's
     OpenMP threads slow down far more than MindSpore's when a core is taken (measured here at load
     average 8-10: torch 11.9 s per train step, against 0.80 s quiet in issue #13), so quote the load
     average the script prints with its table.
  4. memory and compile: each side once more in its own fresh process (peak RSS is per process, so
     this is the only honest per-side figure), which runs the same steps and reports ru_maxrss and its
     first (for ours: compiling) train and sample steps.
  5. MFU: matmul FLOPs of the model (opensora.tasks.benchmark.stdit_matmul_flops; train = 3 x forward)
     over the best of both frameworks' [2048 x 2048] fp32 matmul rates, measured in this run.
  6. with --profile DIR: per-op profiles of each side's train and sample steps, each in a fresh process
     (torch.profiler's self CPU time per op; MindSpore's Profiler, its CPU op-type table), the top ops
     per step printed side by side; the raw profiles stay in DIR.
"""
from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REF_PKG = "_osref"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# ================================================================
# The original, imported from its checkout with plain-torch stand-ins
# ================================================================


class _RenamingLoader(importlib.abc.Loader):
    """Executes one of the original's source files with `opensora` in its imports renamed to `_osref`."""

    def __init__(self, path: Path):
        self.path = path

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        src = self.path.read_text()
        src = re.sub(r"^(\s*)(from|import)\s+opensora\b", rf"\1\2 {REF_PKG}", src, flags=re.M)
        exec(compile(src, str(self.path), "exec"), module.__dict__)


class _EmptyLoader(importlib.abc.Loader):
    """A package whose __init__ is not run (the original's top-level __init__s import every model,
    dataset and text encoder), or a stand-in module filled by `fill`."""

    def __init__(self, fill=None):
        self.fill = fill

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        if self.fill is not None:
            self.fill(module)


class _ReferenceFinder(importlib.abc.MetaPathFinder):
    def __init__(self, src: Path, stand_ins: dict):
        self.src = src
        self.stand_ins = stand_ins  # module name -> fill(module)
        self.hollow = {REF_PKG, f"{REF_PKG}.models", f"{REF_PKG}.schedulers"}

    def find_spec(self, fullname, path=None, target=None):
        if fullname in self.stand_ins:
            parent = any(n.startswith(fullname + ".") for n in self.stand_ins)
            spec = importlib.machinery.ModuleSpec(fullname, _EmptyLoader(self.stand_ins[fullname]), is_package=parent)
            if parent:
                spec.submodule_search_locations = []
            return spec
        if fullname != REF_PKG and not fullname.startswith(REF_PKG + "."):
            return None
        rel = Path("opensora", *fullname.split(".")[1:])
        folder, file = self.src / rel, (self.src / rel).with_suffix(".py")
        if folder.is_dir():
            init = folder / "__init__.py"
            loader = _EmptyLoader() if fullname in self.hollow or not init.is_file() else _RenamingLoader(init)
            spec = importlib.machinery.ModuleSpec(fullname, loader, is_package=True)
            spec.submodule_search_locations = [str(folder)]
            return spec
        if file.is_file():
            spec = importlib.machinery.ModuleSpec(fullname, _RenamingLoader(file))
            spec.origin = str(file)
            return spec
        return None


def _fill_registry(m):
    class Registry:
        def __init__(self, name):
            self.name = name

        def register_module(self, name=None, force=False, module=None):
            return (lambda obj: obj) if module is None else module

    m.MODELS, m.SCHEDULERS, m.DATASETS = Registry("model"), Registry("scheduler"), Registry("dataset")


def _fill_ckpt_utils(m):
    def load_checkpoint(*args, **kwargs):
        raise RuntimeError("the benchmark copies its random weights by name; it loads no checkpoint")

    m.load_checkpoint = load_checkpoint


def _fill_xformers_ops(m):
    import torch
    import torch.nn.functional as F

    class BlockDiagonalMask:
        """Query block i attends to key block i only (xformers.ops.fmha.BlockDiagonalMask)."""

        def __init__(self, q_seqlen, kv_seqlen):
            self.q_seqlen, self.kv_seqlen = [int(n) for n in q_seqlen], [int(n) for n in kv_seqlen]

        @classmethod
        def from_seqlens(cls, q_seqlen, kv_seqlen=None):
            return cls(q_seqlen, q_seqlen if kv_seqlen is None else kv_seqlen)

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
        """[B, M, H, K] layout (xformers' BMHK); softmax(q k^T / sqrt(K)) v per block of attn_bias."""
        if p:
            raise NotImplementedError("attention dropout: the original's configs use p=0")
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, H, M, K]
        if attn_bias is None:
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        else:
            outs, qs, ks = [], 0, 0
            for nq, nk in zip(attn_bias.q_seqlen, attn_bias.kv_seqlen):
                outs.append(F.scaled_dot_product_attention(q[:, :, qs:qs + nq], k[:, :, ks:ks + nk],
                                                           v[:, :, ks:ks + nk], scale=scale))
                qs, ks = qs + nq, ks + nk
            out = torch.cat(outs, dim=2)
        return out.transpose(1, 2).contiguous()  # xformers returns a contiguous BMHK tensor

    fmha = types.ModuleType("xformers.ops.fmha")
    fmha.BlockDiagonalMask = BlockDiagonalMask
    m.fmha = fmha
    m.memory_efficient_attention = memory_efficient_attention
    sys.modules["xformers.ops.fmha"] = fmha


def _fill_timm_vit(m):
    import torch.nn as nn

    class Mlp(nn.Module):
        """timm.models.vision_transformer.Mlp: fc1 -> act -> drop -> fc2 -> drop."""

        def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, norm_layer=None,
                     bias=True, drop=0.0, use_conv=False):
            super().__init__()
            hidden_features = hidden_features or in_features
            out_features = out_features or in_features
            self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
            self.act = act_layer()
            self.drop1 = nn.Dropout(drop)
            self.norm = norm_layer(hidden_features) if norm_layer is not None else nn.Identity()
            self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
            self.drop2 = nn.Dropout(drop)

        def forward(self, x):
            return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))

    m.Mlp = Mlp


def _fill_timm_layers(m):
    import torch
    import torch.nn as nn

    class DropPath(nn.Module):
        """Stochastic depth per sample (timm.models.layers.DropPath)."""

        def __init__(self, drop_prob=0.0, scale_by_keep=True):
            super().__init__()
            self.drop_prob, self.scale_by_keep = drop_prob, scale_by_keep

        def forward(self, x):
            if self.drop_prob == 0.0 or not self.training:
                return x
            keep = 1 - self.drop_prob
            mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
            return x * mask / keep if self.scale_by_keep else x * mask

    m.DropPath = DropPath
    m.torch = torch


def _token_drop_cpu(self, caption, force_drop_ids=None):
    """The original CaptionEmbedder.token_drop with its random draw made on the CPU."""
    import torch

    if force_drop_ids is None:
        drop_ids = torch.rand(caption.shape[0]) < self.uncond_prob
    else:
        drop_ids = force_drop_ids == 1
    return torch.where(drop_ids[:, None, None, None], self.y_embedding, caption)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def load_reference(src: Path):
    """(STDiT class, IDDPM class, update_ema) of the original at `src`, with the stand-ins it needs here."""
    src = Path(src)
    if not (src / "opensora" / "models" / "stdit" / "stdit.py").is_file():
        raise FileNotFoundError(f"--reference-src {src}: no opensora/models/stdit/stdit.py there; get the v1.0.0 "
                                "checkout as this script's docstring shows")
    for dep in ("torch", "einops"):
        if not _importable(dep):
            raise ImportError(f"the original needs {dep}: pip install -e \".[dev]\"")
    stand_ins = {f"{REF_PKG}.registry": _fill_registry, f"{REF_PKG}.utils.ckpt_utils": _fill_ckpt_utils}
    replaced = []
    if not _importable("xformers"):  # CUDA-only kernels; absent on a CPU machine
        stand_ins.update({"xformers": None, "xformers.ops": _fill_xformers_ops})
        replaced.append("xformers -> scaled_dot_product_attention per block")
    if not _importable("timm"):
        stand_ins.update({"timm": None, "timm.models": None, "timm.models.layers": _fill_timm_layers,
                          "timm.models.vision_transformer": _fill_timm_vit})
        replaced.append("timm Mlp/DropPath -> the same layers in torch.nn")
    sys.meta_path.insert(0, _ReferenceFinder(src, stand_ins))
    stdit = importlib.import_module(f"{REF_PKG}.models.stdit.stdit")
    blocks = importlib.import_module(f"{REF_PKG}.models.layers.blocks")
    if not getattr(blocks.CaptionEmbedder, "_cpu_token_drop", False):  # it draws with torch.rand(...).cuda()
        blocks.CaptionEmbedder.token_drop = _token_drop_cpu
        blocks.CaptionEmbedder._cpu_token_drop = True
        replaced.append("CaptionEmbedder.token_drop: the caption-dropout draw on the CPU instead of .cuda()")
    iddpm = importlib.import_module(f"{REF_PKG}.schedulers.iddpm")
    train_utils = importlib.import_module(f"{REF_PKG}.utils.train_utils")
    return stdit.STDiT, iddpm.IDDPM, train_utils.update_ema, replaced


# ================================================================
# Configuration, weights and inputs
# ================================================================


def model_kwargs(a) -> dict:
    return dict(input_size=(a.frames, a.size, a.size), in_channels=a.channels, patch_size=(1, 2, 2),
                hidden_size=a.hidden, depth=a.depth, num_heads=a.heads, mlp_ratio=4.0, class_dropout_prob=0.1,
                pred_sigma=True, caption_channels=a.caption_channels, model_max_length=a.text_len)


def make_torch_model(STDiT, a):
    import torch

    torch.manual_seed(a.seed)
    return STDiT(**model_kwargs(a))


def randomize_zero_layers(model, seed: int) -> None:
    """Give the parameters the original initialises to zero (temporal/cross-attention output
    projections, final layer) random values: weights N(0, 1/fan_in), biases N(0, 0.02^2)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if torch.count_nonzero(p) == 0:
                std = p.shape[1] ** -0.5 if p.ndim >= 2 else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)


def make_inputs(a) -> dict:
    rng = np.random.default_rng(a.seed)
    B, L = a.batch, a.text_len
    shape = (B, a.channels, a.frames, a.size, a.size)
    mask = np.zeros((B, L), np.int32)
    mask[:, :a.valid_tokens] = 1
    return {"x": rng.standard_normal(shape).astype(np.float32),
            "noise": rng.standard_normal(shape).astype(np.float32),
            "t": rng.integers(0, 1000, B).astype(np.int64),
            "y": (0.2 * rng.standard_normal((B, 1, L, a.caption_channels))).astype(np.float32),  # T5-XXL-like scale
            "mask": mask,
            "t_sample": rng.integers(0, 1000, 2 * B).astype(np.int64)}


def cfg_batch(inp: dict, null_y: np.ndarray) -> dict:
    """[cond; null] as a sampling step feeds the model: latent and mask repeated, null caption."""
    x = np.concatenate([inp["x"], inp["x"]])
    y = np.concatenate([inp["y"], np.broadcast_to(null_y, inp["y"].shape)]).astype(np.float32)
    return {"x": x, "t": inp["t_sample"], "y": y, "mask": np.concatenate([inp["mask"], inp["mask"]])}


# ================================================================
# The two sides
# ================================================================


class TorchSide:
    name = "torch"

    def __init__(self, a, weights: dict, inp: dict):
        import torch

        torch.set_num_threads(a.threads)
        STDiT, IDDPM, update_ema, _ = load_reference(a.reference_src)
        self.torch, self.update_ema = torch, update_ema
        self.model = STDiT(**model_kwargs(a))
        missing, unexpected = self.model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()},
                                                         strict=False)
        assert not unexpected and set(missing) <= {"pos_embed", "pos_embed_temporal"}, (missing, unexpected)
        self.ema = __import__("copy").deepcopy(self.model).requires_grad_(False)
        self.diffusion = IDDPM(timestep_respacing="")
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        t = {k: torch.from_numpy(v) for k, v in inp.items()}
        self.x, self.noise, self.t, self.y, self.mask = t["x"], t["noise"], t["t"], t["y"], t["mask"]
        null = self.model.y_embedder.y_embedding.detach().numpy()[None, None]
        self.cfg = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in cfg_batch(inp, null).items()}

    def train_step(self, dropout=True):
        torch = self.torch
        self.model.train()
        emb = self.model.y_embedder
        prob = emb.uncond_prob
        if not dropout:
            emb.uncond_prob = 0.0
        self.opt.zero_grad(set_to_none=True)
        loss = self.diffusion.training_losses(self.model, self.x, self.t, {"y": self.y, "mask": self.mask},
                                              noise=self.noise)["loss"].mean()
        loss.backward()
        emb.uncond_prob = prob
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.update_ema(self.ema, self.model, decay=0.9999, sharded=False)
        return float(loss.detach()), float(grad_norm)

    def sample_step(self):
        self.model.eval()
        with self.torch.no_grad():
            c = self.cfg
            return self.model(c["x"], c["t"], c["y"], mask=c["mask"]).numpy()

    def matmul_rate(self, n=2048, repeats=5) -> float:
        torch = self.torch
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        best = min(_time(lambda: a @ b) for _ in range(repeats))
        return 2.0 * n ** 3 / best


class OursSide:
    name = "ours"

    def __init__(self, a, weights: dict, inp: dict):
        cfg = compose_config(a)
        from opensora.runtime import initialise

        strategy = initialise(cfg)  # device context, the single-process strategy, seeds (as run.py)
        import mindspore as ms
        from hydra.utils import instantiate

        from opensora.tasks.common import build_model
        from opensora.train.step import build_train_step

        self.ms = ms
        self.model = build_model(cfg)
        params = dict(self.model.parameters_and_names())
        assert set(params) == set(weights), sorted(set(params) ^ set(weights))
        for n, p in params.items():
            assert tuple(p.shape) == weights[n].shape, (n, p.shape, weights[n].shape)
            p.set_data(ms.Tensor(weights[n]))
        diffusion = instantiate(cfg.scheduler, num_sampling_steps=None)
        strategy.prepare_model(self.model)
        self.step, _, _ = build_train_step(cfg, self.model, diffusion, strategy)
        T = ms.Tensor
        self.inputs = (T(inp["x"]), T(inp["t"].astype(np.int32)), T(inp["noise"]), T(inp["y"]), T(inp["mask"]))
        self.rng = np.random.default_rng(a.seed)
        null = weights["y_embedder.y_embedding"][None, None]
        c = cfg_batch(inp, null)
        self.cfg = (T(c["x"]), T(c["t"].astype(np.int32)), T(np.ascontiguousarray(c["y"])), T(c["mask"]))
        self.eval_model = None

    def train_step(self, dropout=True):
        ms = self.ms
        B = self.inputs[0].shape[0]
        drop = (self.rng.random(B) < 0.1) if dropout else np.zeros(B, bool)  # drawn on the host, as the train task
        loss, grad_norm, _, _ = self.step(*self.inputs, ms.Tensor(drop.astype(np.int32)))
        return float(loss.asnumpy()), float(grad_norm.asnumpy())

    def sample_step(self):
        # the train task's model in eval mode, compiled as its own graph (as sampling and evaluation do)
        self.model.set_train(False)
        out = self.model(*self.cfg).asnumpy()
        self.model.set_train(True)
        return out

    def matmul_rate(self, n=2048, repeats=5) -> float:
        from opensora.tasks.benchmark import matmul_peak

        return matmul_peak(self.ms.float32, n, repeats)


def compose_config(a):
    """This project's config for the benchmark's sizes, composed as run.py composes it."""
    from hydra import compose, initialize_config_dir

    from opensora.config import register_configs

    register_configs()
    # the original's training maths (IDDPM with learned variance, the recipes' AdamW), not the demo's choices
    overrides = ["model=stdit_tiny", "scheduler=iddpm", "optim=adamw", "logger=none", "precision=fp32",
                 "parallel=single",
                 f"model.hidden_size={a.hidden}", f"model.depth={a.depth}", f"model.num_heads={a.heads}",
                 "model.patch_size=[1,2,2]", f"model.input_size=[{a.frames},{a.size},{a.size}]",
                 f"model.in_channels={a.channels}", f"model.caption_channels={a.caption_channels}",
                 f"model.model_max_length={a.text_len}", "model.class_dropout_prob=0.1", "model.pred_sigma=true",
                 "scheduler.learn_sigma=true", f"data.batch_size={a.batch}", f"seed={a.seed}",
                 "optim.lr=2e-5", "optim.grad_clip=1.0", "optim.ema_decay=0.9999"] + list(a.override)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def set_threads(n: int) -> None:
    """Before either framework is imported: OpenMP/BLAS pools of both sides."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(n))


# ================================================================
# Phases
# ================================================================


def build_weights(a) -> tuple[dict, dict, list]:
    """The original's initialisation (+ random values for its zero-initialised layers) as numpy by name."""
    STDiT, _, _, replaced = load_reference(a.reference_src)
    model = make_torch_model(STDiT, a)
    randomize_zero_layers(model, a.seed + 1)
    sd = model.state_dict()
    weights = {k: v.detach().numpy().copy() for k, v in sd.items() if k not in ("pos_embed", "pos_embed_temporal")}
    return weights, make_inputs(a), replaced


def check_same_maths(sides, a) -> dict:
    """Same CFG-batch output and first-step loss / gradient norm on both sides (dropout off)."""
    outs = [s.sample_step() for s in sides]
    scale = float(np.abs(outs[0]).max())
    out_err = float(np.abs(outs[0] - outs[1]).max())
    firsts = []
    for s in sides:
        t0 = time.perf_counter()
        firsts.append((*s.train_step(dropout=False), time.perf_counter() - t0))
    (l0, g0, _), (l1, g1, _) = firsts
    res = {"output_max_abs_err": out_err, "output_scale": scale, "loss_torch": l0, "loss_ours": l1,
           "grad_norm_torch": g0, "grad_norm_ours": g1}
    ok = out_err <= 1e-4 * max(scale, 1.0) and abs(l0 - l1) <= 1e-4 * abs(l0) and abs(g0 - g1) <= 1e-3 * abs(g0)
    res["same_maths"] = bool(ok)
    print(f"check: CFG output max |diff| {out_err:.2e} (output scale {scale:.3g}); first-step loss "
          f"{l0:.6f} vs {l1:.6f}, grad norm {g0:.5f} vs {g1:.5f} -> {'same' if ok else 'DIFFERENT'}", flush=True)
    if not ok:
        raise SystemExit("the two sides do not compute the same thing: not comparing their speed")
    return res


def alternate(sides, fn_name: str, n: int, warmup: int, gap: float) -> dict:
    """Steps of both sides in turn; `gap` seconds of sleep before each, so neither side's idle worker
    threads, which spin for a while after their work (measured: a torch matmul right after a MindSpore
    one ran at 40% speed for up to ~1 s), run into the other's timing."""
    times = {s.name: [] for s in sides}
    for i in range(warmup + n):
        for s in sides:
            time.sleep(gap)
            t = _time(getattr(s, fn_name))
            if i >= warmup:
                times[s.name].append(t)
    return times


def one_side(a) -> dict:
    """--only SIDE: this side alone in a fresh process (its peak RSS and first steps)."""
    data = np.load(a.data)
    weights = {k[2:]: data[k] for k in data.files if k.startswith("w.")}
    inp = {k[2:]: data[k] for k in data.files if k.startswith("i.")}
    rss0 = peak_rss_mib()
    t0 = time.perf_counter()
    side = (TorchSide if a.only == "torch" else OursSide)(a, weights, inp)
    build_s = time.perf_counter() - t0
    first_train = _time(side.train_step)
    train = [_time(side.train_step) for _ in range(a.steps)]
    first_sample = _time(side.sample_step)
    sample = [_time(side.sample_step) for _ in range(a.steps)]
    return {"side": a.only, "build_s": build_s, "first_train_s": first_train, "first_sample_s": first_sample,
            "train_s": statistics.median(train), "sample_s": statistics.median(sample),
            "peak_rss_mib": peak_rss_mib(), "rss_at_start_mib": rss0}


def profile_side(a) -> dict:
    """--only SIDE --profile DIR --profile-step KIND: KIND steps of this side under its framework's profiler,
    after warm-up steps (so ours is compiled); the ops by time per step."""
    data = np.load(a.data)
    weights = {k[2:]: data[k] for k in data.files if k.startswith("w.")}
    inp = {k[2:]: data[k] for k in data.files if k.startswith("i.")}
    side = (TorchSide if a.only == "torch" else OursSide)(a, weights, inp)
    fn = getattr(side, f"{a.profile_step}_step")
    for _ in range(1 + a.warmup):
        fn()
    out = Path(a.profile) / f"{a.only}_{a.profile_step}"
    n = a.steps
    if a.only == "torch":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(n):
                fn()
        out.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(out / "trace.json"))
        # leaf ops only (self time), as MindSpore's kernel table
        ops = {e.key: e.self_cpu_time_total / 1e3 / n for e in prof.key_averages() if e.self_cpu_time_total > 0}
    else:
        import csv

        ms = side.ms
        prof = ms.Profiler(output_path=str(out))
        for _ in range(n):
            fn()
        prof.stop()
        prof.analyse()
        tables = sorted(out.glob("**/FRAMEWORK/cpu_op_type_info_*.csv"))
        if not tables:
            raise RuntimeError(f"MindSpore's profiler wrote no CPU op table under {out}")
        with open(tables[-1]) as f:
            ops = {r["op_type"]: float(r["total_compute_time"]) / n for r in csv.DictReader(f)}
    total = sum(ops.values())
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:12]
    return {"side": a.only, "step": a.profile_step, "ms_per_step": total,
            "top": [[name, ms_, ms_ / total] for name, ms_ in top], "dir": str(out)}


def profile_report(profiles: dict) -> str:
    lines = []
    for kind in ("train", "sample"):
        t, o = profiles[("torch", kind)], profiles[("ours", kind)]
        lines += [f"profile, {kind} step (op time per step: torch {t['ms_per_step']:.0f} ms, ours "
                  f"{o['ms_per_step']:.0f} ms; raw: {t['dir']}, {o['dir']})",
                  "| # | PyTorch original: op | ms | share | ours: op | ms | share |", "|---|---|---|---|---|---|---|"]
        for i in range(max(len(t["top"]), len(o["top"]))):
            cells = []
            for p in (t, o):
                if i < len(p["top"]):
                    name, ms_, share = p["top"][i]
                    cells += [f"`{name}`", f"{ms_:.1f}", f"{100 * share:.1f}%"]
                else:
                    cells += ["", "", ""]
            lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_profile(a, side: str, kind: str, data_path: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only", side, "--data", data_path,
           "--profile-step", kind, *sys.argv[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"profiling {side} {kind} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def run_alone(a, side: str, data_path: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only", side, "--data", data_path,
           *sys.argv[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{side} alone failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def flops(a) -> tuple[int, int]:
    from opensora.tasks.benchmark import stdit_matmul_flops

    f = lambda b: stdit_matmul_flops(b, (a.frames, a.size, a.size), (1, 2, 2), a.channels, 2 * a.channels, a.hidden,
                                     a.depth, 4.0, a.caption_channels, a.text_len)
    return 3 * f(a.batch), f(2 * a.batch)


def report(a, res: dict) -> str:
    tr, sa = res["train"], res["sample"]
    mem = res.get("alone")
    lines = [f"STDiT depth {a.depth}, hidden {a.hidden}, {a.heads} heads, patch (1,2,2), latent "
             f"[{a.batch}, {a.channels}, {a.frames}, {a.size}, {a.size}] "
             f"({a.frames * (a.size // 2) ** 2} tokens), text {a.text_len} x {a.caption_channels} "
             f"({a.valid_tokens} valid), fp32, {a.threads} threads each; ours with overrides "
             f"{list(a.override) or 'none'}; load average before/after: {res['load_before']} / {res['load_after']}",
             "| measure | PyTorch original | ours | ours / original |", "|---|---|---|---|"]

    def row(name, t, o, fmt="{:.3f} s"):
        lines.append(f"| {name} | {fmt.format(t)} | {fmt.format(o)} | {o / t:.2f}x |")

    row(f"train step (median of {a.steps}, alternating)", tr["torch"], tr["ours"])
    row(f"sample step, CFG batch of {2 * a.batch} (median of {a.steps})", sa["torch"], sa["ours"])
    if mem:
        row("peak host memory (each side alone)", mem["torch"]["peak_rss_mib"] / 1024,
            mem["ours"]["peak_rss_mib"] / 1024, "{:.2f} GiB")
        lines.append(f"| compile + first train step (alone) | {mem['torch']['first_train_s']:.2f} s (eager) | "
                     f"{mem['ours']['first_train_s']:.2f} s | |")
        lines.append(f"| compile + first sample step (alone) | {mem['torch']['first_sample_s']:.2f} s (eager) | "
                     f"{mem['ours']['first_sample_s']:.2f} s | |")
    lines.append(f"| train MFU | {100 * res['mfu']['train_torch']:.1f}% | {100 * res['mfu']['train_ours']:.1f}% | |")
    lines.append(f"| sample MFU | {100 * res['mfu']['sample_torch']:.1f}% | {100 * res['mfu']['sample_ours']:.1f}% | |")
    lines.append(f"matmul peak (2048^3 fp32, best of 5): torch {res['peak']['torch'] / 1e9:.0f} GFLOP/s, MindSpore "
                 f"{res['peak']['ours'] / 1e9:.0f} GFLOP/s; MFU is against the larger. Train step "
                 f"{res['flops']['train'] / 1e9:.1f} GFLOP, sample step {res['flops']['sample'] / 1e9:.1f} GFLOP "
                 "(matmuls). Both sides in this process: peak RSS "
                 f"{res['peak_rss_both_mib'] / 1024:.2f} GiB.")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference-src", type=Path, required=True, help="checkout of hpcaitech/Open-Sora v1.0.0")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per measurement (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gap", type=float, default=1.0, help="seconds of sleep before each timed step")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=16, help="latent height = width")
    ap.add_argument("--text-len", type=int, default=120)
    ap.add_argument("--valid-tokens", type=int, default=120, help="caption tokens with mask 1 (the rest padding)")
    ap.add_argument("--caption-channels", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-memory", action="store_true", help="skip the per-side processes (memory, first steps)")
    ap.add_argument("--override", action="append", default=[], help="extra Hydra override for our side")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--only", choices=["torch", "ours"], help="run one side alone on the --data of an earlier run "
                    "and print its figures as JSON")
    ap.add_argument("--data", help="where to write the weights and inputs (npz; default: a temporary file); with "
                    "--only SIDE, where to read them")
    ap.add_argument("--profile", type=Path, help="also profile each side's train and sample steps (fresh "
                    "processes; --steps steps each) and keep the profiles in this folder")
    ap.add_argument("--profile-step", choices=["train", "sample"], help=argparse.SUPPRESS)  # internal: with --only
    a = ap.parse_args()
    set_threads(a.threads)
    if a.only:
        print(json.dumps(profile_side(a) if a.profile_step else one_side(a)), flush=True)
        return 0

    res = {"load_before": load_average()}
    weights, inp, replaced = build_weights(a)
    print("reference: " + str(a.reference_src) + (f"; replaced: {'; '.join(replaced)}" if replaced else ""))
    with tempfile.TemporaryDirectory() as tmp:
        data_path = a.data or str(Path(tmp) / "data.npz")
        np.savez(data_path, **{f"w.{k}": v for k, v in weights.items()}, **{f"i.{k}": v for k, v in inp.items()})
        if not a.no_memory:
            res["alone"] = {s: run_alone(a, s, data_path) for s in ("torch", "ours")}
            print("alone: " + json.dumps(res["alone"]), flush=True)
        if a.profile:
            profiles = {(s, k): run_profile(a, s, k, data_path) for s in ("torch", "ours") for k in ("train", "sample")}
            res["profiles"] = {f"{s}_{k}": v for (s, k), v in profiles.items()}
            print(profile_report(profiles), flush=True)
    sides = [TorchSide(a, weights, inp), OursSide(a, weights, inp)]
    res["check"] = check_same_maths(sides, a)
    tr = alternate(sides, "train_step", a.steps, a.warmup, a.gap)
    sa = alternate(sides, "sample_step", a.steps, a.warmup, a.gap)
    res["train_all"], res["sample_all"] = tr, sa
    res["train"] = {k: statistics.median(v) for k, v in tr.items()}
    res["sample"] = {k: statistics.median(v) for k, v in sa.items()}
    res["peak"] = {s.name: s.matmul_rate() for s in sides}
    peak = max(res["peak"].values())
    f_train, f_sample = flops(a)
    res["flops"] = {"train": f_train, "sample": f_sample}
    res["mfu"] = {f"{kind}_{s}": f / res[kind][s] / peak for kind, f in (("train", f_train), ("sample", f_sample))
                  for s in ("torch", "ours")}
    res["peak_rss_both_mib"] = peak_rss_mib()
    res["load_after"] = load_average()
    print(report(a, res), flush=True)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
