"""Every config composes; cheap components instantiate; bad overrides fail naming the key."""
from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from conftest import CONF, compose_cfg

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONF.iterdir()
          if g.is_dir() and g.name not in ("experiment", "hydra")}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_resolves(experiment, tmp_path):
    cfg = compose_cfg([f"experiment={experiment}"], tmp_path)
    # Everything but deliberately required values (???) resolves.
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert cfg.task._target_
    # A VAE read from downloaded weights (recipes) is not built here; its config states its downsample.
    down = cfg.vae.downsample if cfg.vae.get("from_pretrained") else instantiate(cfg.vae).downsample
    down = down if isinstance(down, int) else list(down)[1]
    assert list(cfg.model.input_size)[1] * down == (
        cfg.data.image_size if isinstance(cfg.data.image_size, int) else cfg.data.image_size[0])


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(group, option, tmp_path):
    extra = []
    if (group, option) == ("text_encoder", "t5_folder"):
        (tmp_path / "config.json").write_text('{"d_model": 48}')
        extra = [f"text_encoder.from_pretrained={tmp_path}"]
    # the demo's 12 px frames do not divide by a latent VAE's 8
    extra_size = ["data.image_size=64"] if group == "vae" and option != "identity" else []
    cfg = compose_cfg([f"{group}={option}", *extra, *extra_size], tmp_path)
    if extra:
        assert cfg.model.caption_channels == 48
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def test_demo_is_the_default_and_tiny_parts_instantiate(tmp_path):
    cfg = compose_cfg([], tmp_path)
    assert "demo" in cfg.tags
    ds = instantiate(cfg.data.dataset)
    video, caption = ds[0]
    assert video.shape == (3, cfg.data.num_frames, cfg.data.image_size, cfg.data.image_size)
    assert caption in ds.captions
    diffusion = instantiate(cfg.scheduler, num_sampling_steps=None)
    assert diffusion.num_timesteps == 1000
    assert instantiate(cfg.scheduler).num_timesteps == cfg.scheduler.num_sampling_steps


def test_logger_none_turns_tracking_off(tmp_path):
    assert compose_cfg(["logger=none"], tmp_path).logger is None


def test_unknown_override_names_the_key(tmp_path):
    with pytest.raises(ConfigCompositionException, match="optim.not_a_key"):
        compose_cfg(["optim.not_a_key=1"], tmp_path)
    with pytest.raises(ConfigCompositionException, match="no_such_model"):
        compose_cfg(["model=no_such_model"], tmp_path)


def test_required_value_names_the_key(tmp_path):
    cfg = compose_cfg(["task=sample"], tmp_path)
    with pytest.raises(MissingMandatoryValue, match="ckpt_path"):
        _ = cfg.task.ckpt_path


def test_latent_size_rejects_indivisible_sizes(tmp_path):
    from opensora.config import latent_size

    assert latent_size(16, 256, 8) == [16, 32, 32]
    assert latent_size(8, [16, 32], [1, 2, 2]) == [8, 8, 16]
    with pytest.raises(ValueError, match="not divisible"):
        latent_size(16, 250, 8)


def test_variance_settings_must_agree(tmp_path):
    from opensora.config import check_sigma

    check_sigma(compose_cfg([], tmp_path))
    check_sigma(compose_cfg(["model.pred_sigma=true", "scheduler.learn_sigma=true"], tmp_path))
    with pytest.raises(ValueError, match=r"model.pred_sigma=True but scheduler.learn_sigma=False"):
        check_sigma(compose_cfg(["model.pred_sigma=true"], tmp_path))
