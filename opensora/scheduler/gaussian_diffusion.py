"""Gaussian diffusion (improved DDPM, Nichol & Dhariwal 2021) in MindSpore.

Schedules are computed in float64 numpy; every per-timestep table also lives as a float32
`ms.Tensor` (attribute `_<name>`) so `q_sample` / `training_losses` can be traced inside a
GRAPH_MODE `construct` or an `ms.jit` function: lookups by `t` are `ops.gather`, branches
depend only on Python constants. Sampling loops run eagerly (PyNative), one model call a step.

Method names follow improved-diffusion: q_sample, q_posterior_mean_variance, p_mean_variance,
training_losses, p_sample(_loop), ddim_sample(_loop).
"""
from __future__ import annotations

import enum
import math
from typing import Callable

import mindspore as ms
import numpy as np
from mindspore import ops

_LOG2 = math.log(2.0)


# ----------------------------------------------------------------------------- schedules
def get_beta_schedule(beta_schedule: str, *, beta_start: float, beta_end: float, num_diffusion_timesteps: int):
    """Betas [T] float64 for the deprecated named schedules of DDPM ("linear", "quad", "const", ...)."""
    n = num_diffusion_timesteps
    if beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    elif beta_schedule == "quad":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    elif beta_schedule == "const":
        betas = np.full(n, beta_end, dtype=np.float64)
    elif beta_schedule == "jsd":  # 1/T, 1/(T-1), ..., 1
        betas = 1.0 / np.linspace(n, 1, n, dtype=np.float64)
    elif beta_schedule in ("warmup10", "warmup50"):
        betas = np.full(n, beta_end, dtype=np.float64)
        warmup = int(n * (0.1 if beta_schedule == "warmup10" else 0.5))
        betas[:warmup] = np.linspace(beta_start, beta_end, warmup, dtype=np.float64)
    else:
        raise NotImplementedError(f"unknown beta schedule: {beta_schedule}")
    return betas


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999):
    """Betas [T] float64 discretising a continuous alpha_bar(t), t in [0, 1]."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1, t2 = i / num_diffusion_timesteps, (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int):
    """Betas [T] float64. "linear": 1e-4..0.02 scaled by 1000/T (Ho et al.); "squaredcos_cap_v2": cosine."""
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return get_beta_schedule(
            "linear", beta_start=scale * 0.0001, beta_end=scale * 0.02, num_diffusion_timesteps=num_diffusion_timesteps
        )
    if schedule_name in ("squaredcos_cap_v2", "cosine"):
        return betas_for_alpha_bar(num_diffusion_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise NotImplementedError(f"unknown beta schedule: {schedule_name}")


class ModelMeanType(enum.Enum):
    """What the model's first C output channels predict."""

    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # eps (the original)


class ModelVarType(enum.Enum):
    """How the reverse-process variance is obtained. LEARNED_RANGE (the original) interpolates (in log space)
    between the posterior variance beta_tilde (v=-1) and beta (v=+1); FIXED_LARGE is beta (beta_tilde at t=0),
    FIXED_SMALL beta_tilde."""

    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


# ----------------------------------------------------------------------------- helpers
def mean_flat(tensor, mask=None):
    """Mean over all non-batch dims -> [B]. With `mask` [B, T] (tensor [B, C, T, H, W]): mean over the
    frames where mask is True only (sum over those frames / (their count * C*H*W)). A sample without any
    True frame has nothing to average and gets 0, where the original divides 0 by 0 (NaN, which then
    poisons the whole batch's gradient)."""
    b = tensor.shape[0]
    if mask is None:
        return tensor.reshape(b, -1).mean(axis=1)
    t = tensor.shape[2]
    m = mask.astype(tensor.dtype).reshape(b, 1, t, 1, 1)
    per_frame = 1
    for d in tensor.shape[1:]:
        per_frame *= d
    per_frame = per_frame // t  # C*H*W
    count = ops.clamp(m.reshape(b, t).sum(axis=1), min=1.0)  # 0 frames: 0 / 1 instead of 0 / 0
    return (tensor * m).reshape(b, -1).sum(axis=1) / (count * per_frame)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    d = mean1 - mean2
    return 0.5 * (-1.0 + logvar2 - logvar1 + ops.exp(logvar1 - logvar2) + (d * d) * ops.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """tanh approximation of the standard normal CDF (as used by improved-diffusion)."""
    return 0.5 * (1.0 + ops.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def _cdf_logit(x):
    """a(x) with approx_standard_normal_cdf(x) = sigmoid(a(x)) exactly (0.5 * (1 + tanh(u)) = sigmoid(2u))."""
    return (2.0 * math.sqrt(2.0 / math.pi)) * (x + 0.044715 * x * x * x)


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood (nats, elementwise) of x in [-1, 1] under a Gaussian discretised to 256 bins.

    Same function as improved-diffusion's (tanh-approximate CDF, 1e-12 floors, edge bins open), but the
    bin mass cdf(x+) - cdf(x-) is formed as sigmoid(a+) - sigmoid(a-) or, in the upper tail, as
    sigmoid(-a-) - sigmoid(-a+): equal values without float32 cancellation when both CDFs are near 1.
    """
    centered_x = x - means
    inv_stdv = ops.exp(-log_scales)
    a_plus = _cdf_logit(inv_stdv * (centered_x + 1.0 / 255.0))
    a_min = _cdf_logit(inv_stdv * (centered_x - 1.0 / 255.0))
    cdf_plus = ops.sigmoid(a_plus)
    one_minus_cdf_min = ops.sigmoid(-a_min)
    cdf_delta = ops.where(
        a_plus + a_min > 0, one_minus_cdf_min - ops.sigmoid(-a_plus), cdf_plus - ops.sigmoid(a_min)
    )
    log_cdf_plus = ops.log(ops.clamp(cdf_plus, min=1e-12))
    log_one_minus_cdf_min = ops.log(ops.clamp(one_minus_cdf_min, min=1e-12))
    log_cdf_delta = ops.log(ops.clamp(cdf_delta, min=1e-12))
    return ops.where(x < -0.999, log_cdf_plus, ops.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


# ----------------------------------------------------------------------------- diffusion
_TABLES = (
    "betas",
    "log_betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "fixed_large_variance",
    "fixed_large_log_variance",
)


@ms.jit_class
class GaussianDiffusion:
    """Utilities for training and sampling diffusion models.

    :param betas: 1-D array of betas, one per diffusion step (step 0 first).
    :param model_mean_type / model_var_type: `ModelMeanType`, `ModelVarType`.
    """

    def __init__(self, *, betas, model_mean_type, model_var_type):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        # plain-str / bool constants for branching inside graph-compiled code
        self._mean_kind = model_mean_type.name
        self._var_kind = model_var_type.name
        self._learn_sigma = model_var_type == ModelVarType.LEARNED_RANGE
        # sampling with a frame mask: False = the original (a frame with mask 0 is released at the last
        # step, t = 0, and denoised once); True = it is held and equals its reference exactly
        self.exact_conditioning = False

        betas = np.asarray(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all(), "betas must be 1-D in (0, 1]"
        self.num_timesteps = int(betas.shape[0])

        # float64 schedule maths
        self.betas = betas
        self.log_betas = np.log(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # posterior q(x_{t-1} | x_t, x_0); its variance is 0 at t=0, so the log is clipped to t=1's value
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        var_at_0 = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(var_at_0, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        # FIXED_LARGE: beta, with t=0 set to the posterior variance for a better decoder likelihood
        self.fixed_large_variance = np.append(var_at_0, betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)

        # float32 copies for graph-compatible lookups: self._<name>
        for name in _TABLES:
            setattr(self, "_" + name, ms.Tensor(getattr(self, name).astype(np.float32)))

    # ------------------------------------------------------------------ lookups
    def _extract(self, table, t, ndim):
        """table[t] reshaped to [B, 1, ..., 1] with `ndim` dims (broadcastable against x)."""
        return ops.gather(table, t, 0).reshape((t.shape[0],) + (1,) * (ndim - 1))

    def _call_model(self, model, x, t, model_kwargs):
        """Hook: SpacedDiffusion maps respaced t to the original timestep here."""
        return model(x, t, **model_kwargs)

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x_start, t, noise=None):
        """Sample x_t ~ q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        if noise is None:
            noise = ops.randn_like(x_start)
        n = x_start.ndim
        return (
            self._extract(self._sqrt_alphas_cumprod, t, n) * x_start
            + self._extract(self._sqrt_one_minus_alphas_cumprod, t, n) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance, clipped log-variance of the posterior q(x_{t-1} | x_t, x_0)."""
        n = x_t.ndim
        mean = (
            self._extract(self._posterior_mean_coef1, t, n) * x_start
            + self._extract(self._posterior_mean_coef2, t, n) * x_t
        )
        variance = ops.broadcast_to(self._extract(self._posterior_variance, t, n), x_t.shape)
        log_variance = ops.broadcast_to(self._extract(self._posterior_log_variance_clipped, t, n), x_t.shape)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ reverse process
    def _predict_xstart_from_eps(self, x_t, t, eps):
        n = x_t.ndim
        return (
            self._extract(self._sqrt_recip_alphas_cumprod, t, n) * x_t
            - self._extract(self._sqrt_recipm1_alphas_cumprod, t, n) * eps
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        n = x_t.ndim
        return (self._extract(self._sqrt_recip_alphas_cumprod, t, n) * x_t - pred_xstart) / self._extract(
            self._sqrt_recipm1_alphas_cumprod, t, n
        )

    def p_mean_variance_from_output(self, model_output, x, t, clip_denoised=True, denoised_fn=None):
        """p(x_{t-1} | x_t) from a model output [B, C or 2C, ...] (see `p_mean_variance`)."""
        c = x.shape[1]
        n = x.ndim
        model_output = model_output.astype(ms.float32)
        if self._learn_sigma:
            model_var_values = model_output[:, c:]  # [B, 2C, ...] -> [B, C, ...]
            model_output = model_output[:, :c]
            min_log = self._extract(self._posterior_log_variance_clipped, t, n)
            max_log = self._extract(self._log_betas, t, n)
            frac = (model_var_values + 1) / 2  # v in [-1, 1] -> [beta_tilde, beta]
            model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = ops.exp(model_log_variance)
        elif self._var_kind == "FIXED_LARGE":
            model_variance = ops.broadcast_to(self._extract(self._fixed_large_variance, t, n), x.shape)
            model_log_variance = ops.broadcast_to(self._extract(self._fixed_large_log_variance, t, n), x.shape)
        else:  # FIXED_SMALL
            model_variance = ops.broadcast_to(self._extract(self._posterior_variance, t, n), x.shape)
            model_log_variance = ops.broadcast_to(self._extract(self._posterior_log_variance_clipped, t, n), x.shape)

        if self._mean_kind == "START_X":
            pred_xstart = model_output
        else:
            pred_xstart = self._predict_xstart_from_eps(x, t, model_output)
        pred_xstart = self._process_xstart(pred_xstart, clip_denoised, denoised_fn)
        model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
        }

    @staticmethod
    def _process_xstart(x, clip_denoised, denoised_fn):
        if denoised_fn is not None:
            x = denoised_fn(x)
        if clip_denoised:
            x = ops.clamp(x, -1.0, 1.0)
        return x

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Apply the model to get p(x_{t-1} | x_t) and a prediction of x_0.

        :return: dict with "mean", "variance", "log_variance", "pred_xstart", each shaped like x.
        """
        if model_kwargs is None:
            model_kwargs = {}
        model_output = self._call_model(model, x, t, model_kwargs)
        return self.p_mean_variance_from_output(model_output, x, t, clip_denoised, denoised_fn)

    # ------------------------------------------------------------------ conditioning frames (Open-Sora 1.1)
    def frame_mask_steps(self, frame_mask, x_shape):
        """The step at which each frame is released: int(mask * num_timesteps) -> np.int32 [B, T].

        `frame_mask` [B, T] float in [0, 1] (1 = generate, 0 = keep the reference, r = edit: release
        at step r * num_timesteps). The product is formed in float32 and truncated, as the original
        (float32 0.29 * 100 = 29.0 -> 29, where float64 gives 28.999999999999996 -> 28). With
        `exact_conditioning`, frames of mask 0 get -1: never released."""
        m = frame_mask.asnumpy() if isinstance(frame_mask, ms.Tensor) else np.asarray(frame_mask)
        m = m.astype(np.float32)
        b = int(x_shape[0])
        t = int(x_shape[2]) if len(x_shape) == 5 else -1
        if m.shape != (b, t):
            raise ValueError(f"frame mask of shape {m.shape} does not fit latents {tuple(x_shape)}: expected "
                             f"[B, T] = [{b}, {t}] (one value per frame, latents [B, C, T, H, W])")
        if not np.isfinite(m).all() or m.min() < 0 or m.max() > 1:
            raise ValueError(f"frame mask values must lie in [0, 1], got min {m.min()} max {m.max()}")
        steps = (m * np.float32(self.num_timesteps)).astype(np.int32)
        if self.exact_conditioning:
            steps = np.where(m == 0, np.int32(-1), steps)
        return steps

    def _mask_before_step(self, x, t, frame_mask, model_kwargs, mask_noise):
        """Frames due at this step (release step == t) are noised from their reference to level t;
        x_mask = release step > t (True = generated) joins the model kwargs. Returns (x, the step's input
        before re-noising, kwargs, hold [B, 1, T, 1, 1] bool: frames to reset to that input afterwards)."""
        steps = self.frame_mask_steps(frame_mask, x.shape)  # [B, T]
        tt = t.asnumpy().astype(np.int64).reshape(-1, 1)
        b, tf = steps.shape
        x_ref = x
        release = steps == tt
        if release.any():
            if mask_noise is None:
                mask_noise = ops.randn_like(x)
            n = x.ndim
            noised = (self._extract(self._sqrt_alphas_cumprod, t, n) * x
                      + self._extract(self._sqrt_one_minus_alphas_cumprod, t, n) * mask_noise.astype(x.dtype))
            x = ops.where(ms.Tensor(release.reshape(b, 1, tf, 1, 1)), noised, x)
        model_kwargs = dict(model_kwargs or {})
        model_kwargs["x_mask"] = ms.Tensor(steps > tt)  # bool [B, T]
        hold = ms.Tensor((steps < tt).reshape(b, 1, tf, 1, 1))
        return x, x_ref, model_kwargs, hold

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, noise=None,
                 frame_mask=None, mask_noise=None):
        """One ancestral step: x_{t-1} = mean + [t != 0] * exp(log_var / 2) * noise.

        With `frame_mask` [B, T] (float, see `frame_mask_steps`; Open-Sora 1.1 conditioning): frames whose
        release step equals t are first replaced by sqrt(abar_t) x + sqrt(1 - abar_t) mask_noise (x holds
        the reference there), the model gets x_mask = release step > t, and after the step frames whose
        release step is below t are reset to their input (the reference).

        :return: dict with "sample" and "pred_xstart".
        """
        if frame_mask is not None:
            x, x_ref, model_kwargs, hold = self._mask_before_step(x, t, frame_mask, model_kwargs, mask_noise)
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        if noise is None:
            noise = ops.randn_like(x)
        nonzero_mask = (t != 0).astype(x.dtype).reshape((x.shape[0],) + (1,) * (x.ndim - 1))  # no noise at t == 0
        sample = out["mean"] + nonzero_mask * ops.exp(0.5 * out["log_variance"]) * noise
        if frame_mask is not None:
            sample = ops.where(hold, x_ref, sample)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _initial(self, shape, noise):
        if noise is not None:
            assert tuple(noise.shape) == tuple(shape), f"noise {tuple(noise.shape)} != shape {tuple(shape)}"
            return noise.astype(ms.float32)
        return ops.standard_normal(tuple(shape)).astype(ms.float32)

    def _indices(self, progress):
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices)
        return indices

    def p_sample_loop_progressive(
        self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None, progress=False,
        frame_mask=None,
    ):
        """Yield p_sample's dict for t = T-1 .. 0, starting from `noise` (or a fresh N(0, I)).
        With `frame_mask`, `noise` holds the reference latents at the conditioning frames (p_sample)."""
        img = self._initial(shape, noise)
        for i in self._indices(progress):
            t = ms.Tensor(np.full((shape[0],), i, dtype=np.int32))
            out = self.p_sample(model, img, t, clip_denoised, denoised_fn, model_kwargs, frame_mask=frame_mask)
            yield out
            img = out["sample"]

    def p_sample_loop(
        self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None, progress=False,
        frame_mask=None,
    ):
        """Ancestral sampling; returns x_0 of `shape` (float32)."""
        final = None
        for final in self.p_sample_loop_progressive(
            model, shape, noise, clip_denoised, denoised_fn, model_kwargs, progress, frame_mask
        ):
            pass
        return final["sample"]

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0, noise=None,
                    frame_mask=None, mask_noise=None):
        """One DDIM step (Song et al. eq. 12), stochasticity `eta`.

        `frame_mask`: the rule of `p_sample` around the DDIM step (re-noise at release, x_mask, reset of
        held frames). The original has no DDIM sampler with a mask; this is the same rule applied to it."""
        if frame_mask is not None:
            x, x_ref, model_kwargs, hold = self._mask_before_step(x, t, frame_mask, model_kwargs, mask_noise)
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        n = x.ndim
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])  # re-derived whatever the model predicts
        alpha_bar = self._extract(self._alphas_cumprod, t, n)
        alpha_bar_prev = self._extract(self._alphas_cumprod_prev, t, n)
        sigma = eta * ops.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * ops.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean_pred = out["pred_xstart"] * ops.sqrt(alpha_bar_prev) + ops.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        if eta > 0:
            if noise is None:
                noise = ops.randn_like(x)
            nonzero_mask = (t != 0).astype(x.dtype).reshape((x.shape[0],) + (1,) * (n - 1))
            mean_pred = mean_pred + nonzero_mask * sigma * noise
        if frame_mask is not None:
            mean_pred = ops.where(hold, x_ref, mean_pred)
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop_progressive(
        self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None, progress=False, eta=0.0,
        frame_mask=None,
    ):
        """Yield ddim_sample's dict for t = T-1 .. 0."""
        img = self._initial(shape, noise)
        for i in self._indices(progress):
            t = ms.Tensor(np.full((shape[0],), i, dtype=np.int32))
            out = self.ddim_sample(model, img, t, clip_denoised, denoised_fn, model_kwargs, eta, frame_mask=frame_mask)
            yield out
            img = out["sample"]

    def ddim_sample_loop(
        self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None, progress=False, eta=0.0,
        frame_mask=None,
    ):
        """DDIM sampling; returns x_0 of `shape` (float32)."""
        final = None
        for final in self.ddim_sample_loop_progressive(
            model, shape, noise, clip_denoised, denoised_fn, model_kwargs, progress, eta, frame_mask
        ):
            pass
        return final["sample"]

    # ------------------------------------------------------------------ losses
    def _vb_terms_bpd_from_output(self, model_output, x_start, x_t, t, clip_denoised=True, mask=None):
        """VLB term in bits [B]: decoder NLL at t == 0, else KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))."""
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance_from_output(model_output, x_t, t, clip_denoised)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl, mask) / _LOG2
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll, mask) / _LOG2
        return {"output": ops.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None, mask=None, pass_x_mask=False):
        """Training losses for one timestep per sample; graph-mode safe.

        :param model: callable model(x_t, t, **model_kwargs) -> [B, C or 2C, ...].
        :param x_start: [B, C, ...] clean latents.
        :param t: [B] int timestep indices.
        :param noise: optional [B, C, ...] Gaussian noise (drawn when None).
        :param mask: optional [B, T] bool (5-D inputs): False frames are conditioning frames, which get
            x_t = q_sample(x_0, t=0) (not exactly x_0, as the original) and are excluded from the MSE and
            VLB terms by the frame mean of `mean_flat` (a sample without a True frame gets loss 0).
        :param pass_x_mask: with a mask, also give it to the model as model_kwargs["x_mask"] (STDiT2 modulates
            the False frames with t = 0). The original's train script puts it into the kwargs itself;
            either way works, this saves the caller the second copy.
        :return: dict of float32 [B] tensors: "loss", "mse" (MSE losses), "vb" (learned sigma).
        """
        if model_kwargs is None:
            model_kwargs = {}
        if mask is not None and pass_x_mask:
            model_kwargs = dict(model_kwargs)
            model_kwargs["x_mask"] = mask.astype(ms.bool_)
        x_start = x_start.astype(ms.float32)
        if noise is None:
            noise = ops.randn_like(x_start)
        noise = noise.astype(ms.float32)
        x_t = self.q_sample(x_start, t, noise)
        if mask is not None:
            x_t0 = self.q_sample(x_start, ops.zeros_like(t), noise)
            x_t = ops.where(mask.astype(ms.bool_).reshape(mask.shape[0], 1, mask.shape[1], 1, 1), x_t, x_t0)

        terms = {}
        model_output = self._call_model(model, x_t, t, model_kwargs).astype(ms.float32)
        c = x_t.shape[1]
        if self._learn_sigma:
            eps_out = model_output[:, :c]  # [B, 2C, ...] -> [B, C, ...]
            # learn the variance through the VLB without letting it move the mean prediction
            frozen_out = ops.cat([ops.stop_gradient(eps_out), model_output[:, c:]], axis=1)
            terms["vb"] = self._vb_terms_bpd_from_output(frozen_out, x_start, x_t, t, False, mask)["output"]
            model_output = eps_out

        target = noise if self._mean_kind == "EPSILON" else x_start
        err = target - model_output
        terms["mse"] = mean_flat(err * err, mask)
        terms["loss"] = terms["mse"] + terms["vb"] if self._learn_sigma else terms["mse"]
        return terms

