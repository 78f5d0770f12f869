"""IDDPM scheduler of Open-Sora: training losses on the full diffusion, respaced CFG sampling."""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import ops

from . import gaussian_diffusion as gd
from .respace import SpacedDiffusion, space_timesteps
from .samplers import make_sampler


def _double_batch(name, value, b):
    """A model kwarg for the [cond; null] batch: a tensor with B rows is repeated -> [2B, ...]; one that holds a
    single value for the whole batch (a scalar or one row) is passed as it is (the model repeats it)."""
    if isinstance(value, (ms.Tensor, np.ndarray)):
        if value.ndim == 0 or value.shape[0] == 1 and b != 1:
            return value
        if value.shape[0] != b:
            raise ValueError(f"model kwarg {name!r} of shape {tuple(value.shape)} is not per sample: expected a "
                             f"leading batch dim of {b} (or 1) to double for classifier-free guidance")
        if isinstance(value, np.ndarray):
            return np.concatenate([value, value], axis=0)
        return ops.cat([value, value], axis=0)
    return value


def forward_with_cfg(model, x, t, y, mask, y_null, cfg_scale, cfg_channel=None, model_kwargs=None):
    """Classifier-free guided model output for x [B, C, ...] -> [B, 2C, ...] (float32).

    The model sees the batch doubled as [cond; null]: x and t repeated, y = [y; y_null broadcast to
    y's batch], the same text mask for both halves, t as int32 [2B]. The first `cfg_channel` channels
    (None: all C eps channels) become uncond + cfg_scale * (cond - uncond); the remaining eps
    channels and the variance channels are taken from the cond half (Open-Sora forward_with_cfg).
    C is x's channel count, so this holds with a learned variance ([B, 2C] outputs) and without ([B, C]).
    `model_kwargs` (e.g. STDiT2's x_mask, num_frames, height, width, ar, fps) reach the model as well: a tensor
    with B rows is repeated for both halves, one value for the batch and non-tensors are passed as they are,
    None is left out.
    """
    b = x.shape[0]
    x2 = ops.cat([x, x], axis=0)  # [B, C, ...] -> [2B, C, ...]
    t2 = ops.cat([t, t], axis=0).astype(ms.int32)
    y2 = ops.cat([y, ops.broadcast_to(y_null.astype(y.dtype), y.shape)], axis=0)
    mask2 = None if mask is None else ops.cat([mask, mask], axis=0)
    extra = {k: _double_batch(k, v, b) for k, v in (model_kwargs or {}).items() if v is not None}
    out = model(x2, t2, y=y2, mask=mask2, **extra)
    out = out.astype(ms.float32)  # [2B, 2C, ...]
    if cfg_channel is None:
        cfg_channel = x.shape[1]
    cond, uncond = out[:b], out[b:]
    guided = uncond[:, :cfg_channel] + cfg_scale * (cond[:, :cfg_channel] - uncond[:, :cfg_channel])
    return ops.cat([guided, cond[:, cfg_channel:]], axis=1)


class IDDPM(SpacedDiffusion):
    """Improved-DDPM diffusion as configured by Open-Sora (`scheduler/iddpm.yaml`).

    :param num_sampling_steps: None -> the full `diffusion_steps` diffusion (training); N -> respaced to
        N steps as the sampler says (even sections, the original's respacing: 10 -> 0, 111, ..., 999; DDIM with
        timestep_spacing "stride": the DDIM paper's stride, 0, 100, ..., 900).
    :param timestep_respacing: explicit respacing instead (exclusive with num_sampling_steps).
    :param cfg_scale / cfg_channel: classifier-free guidance defaults of `sample`.
    :param sampler: a sampler (opensora/scheduler/samplers.py: AncestralSampler, DDIMSampler; configs give it as
        scheduler/sampler=ancestral|ddim), or its name "ancestral" / "ddim" with `ddim_eta`, `timestep_spacing`.
    :param exact_conditioning: sampling with a frame mask: False = the original (frames of mask 0 are
        re-noised at the last step, t = 0, and denoised once: they come out within
        sqrt(1/abar_0 - 1) |eps - eps_model| = 0.01 |eps - eps_model| of the reference); True = they
        stay exactly the reference.
    """

    def __init__(
        self,
        num_sampling_steps=None,
        timestep_respacing=None,
        noise_schedule="linear",
        sigma_small=False,
        predict_xstart=False,
        learn_sigma=True,
        diffusion_steps=1000,
        cfg_scale=4.0,
        cfg_channel=None,
        sampler="ancestral",
        ddim_eta=0.0,
        timestep_spacing="sections",
        clip_denoised=False,
        exact_conditioning=False,
    ):
        sampler = make_sampler(sampler, ddim_eta, timestep_spacing)
        betas = gd.get_named_beta_schedule(noise_schedule, diffusion_steps)
        if num_sampling_steps is not None:
            if timestep_respacing is not None:
                raise ValueError("give num_sampling_steps or timestep_respacing, not both")
            timestep_respacing = sampler.respacing(int(num_sampling_steps))
        if timestep_respacing is None or timestep_respacing == "":
            timestep_respacing = [diffusion_steps]
        if learn_sigma:
            var_type = gd.ModelVarType.LEARNED_RANGE
        else:
            var_type = gd.ModelVarType.FIXED_SMALL if sigma_small else gd.ModelVarType.FIXED_LARGE
        super().__init__(
            space_timesteps(diffusion_steps, timestep_respacing),
            betas=betas,
            model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
            model_var_type=var_type,
        )
        self.cfg_scale = cfg_scale
        self.cfg_channel = cfg_channel
        self.sampler = sampler
        # Clamp each predicted x0 to [-1, 1] while sampling: off for latent models (the original),
        # useful for pixel-space models whose data lives in [-1, 1].
        self.clip_denoised = clip_denoised
        self.exact_conditioning = bool(exact_conditioning)

    def sample(self, model, shape, y, mask, y_null, noise=None, progress=True, cfg_scale=None, cfg_channel=None,
               model_kwargs=None, frame_mask=None):
        """Generate x_0 [B, C, ...] with classifier-free guidance (see `forward_with_cfg`).

        :param model: callable model(x [2B, C, ...], t int32 [2B], y=[2B, ...], mask=[2B, L] or None,
            **model_kwargs doubled, x_mask=[2B, T] with a frame mask).
        :param shape: (B, C, ...) of the latents.
        :param y: [B, 1, L, D] caption embeddings; y_null: the null caption, broadcastable to y.
        :param mask: [B, L] caption mask or None.
        :param noise: x_T [B, C, ...]; drawn from N(0, I) (MindSpore's global seed) when None. With a
            frame mask it holds the reference latents at the conditioning frames (apply_mask_strategy).
        :param model_kwargs: further model inputs for every step (e.g. STDiT2's size conditioning), passed
            through `forward_with_cfg` (tensors with B rows doubled for CFG).
        :param frame_mask: [B, T] float in [0, 1] per latent frame (Open-Sora 1.1 conditioning: 1 generate,
            0 keep the reference, r release the reference at step r * num_sampling_steps; p_sample).
        """
        cfg_scale = self.cfg_scale if cfg_scale is None else cfg_scale
        cfg_channel = self.cfg_channel if cfg_channel is None else cfg_channel
        extra = dict(model_kwargs or {})

        def guided(x, t, **step_kwargs):  # step_kwargs: x_mask from the frame mask
            return forward_with_cfg(model, x, t, y, mask, y_null, cfg_scale, cfg_channel,
                                    model_kwargs={**extra, **step_kwargs})

        return self.sampler.loop(self, guided, shape, noise=noise, clip_denoised=self.clip_denoised, progress=progress,
                                 frame_mask=frame_mask)
