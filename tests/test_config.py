"""Composition: every group option builds exactly what its file says (nothing merged in from another choice), every
experiment composes and instantiates at debug=fast size, the demo is nothing but the root's group choices, unknown
keys and wrong types fail at compose time, and the validation pass names the key, the value and what is allowed."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from helpers import CONF, compose_cfg
from opensora.config import ConfigError, validate
from opensora.config.schema import TASKS

GLOBAL_GROUPS = ("experiment", "hparams_search", "debug", "hydra")  # `# @package _global_` options, Hydra's own
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))  # base/ holds what recipes share
GROUPS = sorted({str(p.parent.relative_to(CONF)) for p in CONF.rglob("*.yaml")
                 if p.parent != CONF and p.parent.relative_to(CONF).parts[0] not in GLOBAL_GROUPS})
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def compose_choices(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


# ---------------------------------------------------------------- group options


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, list) else str(v) if hasattr(v, "value") else v


def _leaves(d: dict, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _file_content(group: str, option: str) -> tuple[dict, set]:
    """(the option file's own values, every key it may bring: its own, its schema's (a /schema/ default or the
    root's type for its section), included siblings', nested groups')."""
    from opensora.config.schema import RootConfig

    data = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"))
    allowed, own = set(), {}
    import typing

    hint = typing.get_type_hints(RootConfig).get(group)
    for kind in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(kind):
            allowed |= {f.name for f in dataclasses.fields(kind)}
    for entry in data.pop("defaults", []):
        if entry == "_self_":
            continue
        if isinstance(entry, str) and entry.startswith("/schema/"):
            name = entry.split("@")[0].split("/")[-1]
            kind = TASKS[name] if "/task/" in entry else None
            allowed |= {f.name for f in dataclasses.fields(kind)} if kind else set()
        elif isinstance(entry, str):  # a sibling option
            sibling, sib_allowed = _file_content(group, entry)
            own = {**sibling, **own}
            allowed |= sib_allowed | {k.split(".")[0] for k in sibling}
        elif isinstance(entry, dict):  # a nested group: its own test checks its content
            allowed |= set(entry)
    own_values = dict(_leaves(data))
    own = {**own, **own_values}
    allowed |= {k.split(".")[0] for k in own}
    return own, allowed


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_group_option_builds_exactly_what_its_file_says(group, option, tmp_path):
    extra = []
    if (group, option) == ("text_encoder", "t5_folder"):
        (tmp_path / "config.json").write_text('{"d_model": 48}')
        extra = [f"text_encoder.from_pretrained={tmp_path}"]
    cfg = compose_cfg([f"{group}={option}", *extra], tmp_path)
    package = group.replace("/", ".")
    node = OmegaConf.select(cfg, package)
    if node is None:  # an option that turns its section off (logger=none)
        assert option == "none" and OmegaConf.load(CONF / group / f"{option}.yaml").get(package) is None
        return
    composed = dict(_leaves(OmegaConf.to_container(node, resolve=False)))
    own, allowed = _file_content(group, option)
    given = {k.split("=")[0].split(".", 1)[1] for k in extra} | ({"output_dir"} if group == "paths" else set())
    for key, value in own.items():
        if key not in given:
            assert _plain(composed.get(key)) == value, f"{package}.{key}: {composed.get(key)!r} != file {value!r}"
    brought = {k.split(".")[0] for k in composed}
    assert brought <= allowed, f"{package} holds keys its option does not bring: {sorted(brought - allowed)}"


def test_the_demo_is_the_root_defaults_and_nothing_else():
    cfg = compose_choices()
    choices = cfg.hydra.runtime.choices
    assert (choices.task, choices.model, choices.scheduler, choices.data, choices.optim) == (
        "train_demo", "stdit_demo", "iddpm_x0_ddim", "synthetic_demo", "adamw_demo")
    assert choices.experiment is None and choices.debug is None
    # a choice over the defaults builds exactly that option: STDiT-XL/2 is XL/2, not the demo's 3 blocks
    xl = compose_cfg(["model=stdit_xl2"])
    assert (xl.model.hidden_size, xl.model.depth, xl.model.num_heads, list(xl.model.patch_size)) == (1152, 28, 16,
                                                                                                    [1, 2, 2])
    video = compose_cfg(["data=video_csv", "data.csv_path=x.csv"])
    assert "size" not in video.data.dataset and video.data.dataset._target_.endswith("VideoTextDataset")
    bench = compose_cfg(["task=benchmark"])
    assert set(bench.task) == {f.name for f in dataclasses.fields(TASKS["benchmark"])}


def test_demo_parts_instantiate(tmp_path):
    cfg = compose_cfg([], tmp_path)
    ds = instantiate(cfg.data.dataset)
    item = ds[0]
    assert item["video"].shape == (3, cfg.data.num_frames, cfg.data.image_size, cfg.data.image_size)
    assert item["caption"] in ds.captions
    diffusion = instantiate(cfg.scheduler, num_sampling_steps=None)
    assert diffusion.num_timesteps == 1000
    assert instantiate(cfg.scheduler).num_timesteps == cfg.scheduler.num_sampling_steps
    assert instantiate(cfg.optim.lr_schedule, base_lr=1e-3, max_steps=3000)(50) == pytest.approx(1e-3)


# ---------------------------------------------------------------- experiments


def _csv(tmp_path: Path) -> Path:
    csv = tmp_path / "clips.csv"
    csv.write_text("video,caption\na.mp4,a clip\n")
    return csv


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_validates_and_instantiates_at_debug_fast(experiment, tmp_path):
    from opensora.model import STDiT, STDiT2
    from opensora.tasks.common import build_model

    extra = [f"data.csv_path={_csv(tmp_path)}"] if experiment.startswith("train_") else []
    cfg = compose_cfg([f"experiment={experiment}", "debug=fast", "logger=none", *extra], tmp_path)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert cfg.task._target_ == f"opensora.tasks.{'train' if experiment.startswith('train_') else 'sample'}.run"
    if experiment.startswith("train_") and cfg.stage.init_from:
        with pytest.raises(ConfigError) as e:  # a later stage initialises from one that has not run here
            validate(cfg)
        assert [p.split("=")[0] for p in e.value.problems] == ["model.pretrained"]
        assert f"debug/stages/{cfg.stage.init_from}/checkpoints/latest" in e.value.problems[0]
    elif experiment.startswith("sample_"):
        with pytest.raises(ConfigError) as e:  # the recipe's weights are not downloaded here
            validate(cfg)
        assert [p.split("=")[0] for p in e.value.problems] == ["task.ckpt_path"]
    else:
        validate(cfg)
    if experiment.startswith("train_"):
        assert cfg.task.max_steps == 4  # debug=fast shortened the recipe's schedule
    model = build_model(cfg, with_pretrained=False)
    # the recipe's model family at the tiny size: STDiT2 for the Open-Sora 1.1 recipes, STDiT for 1.0
    assert type(model) is (STDiT2 if "v1_1" in experiment else STDiT), type(model)
    assert model.hidden_size == (48 if "v1_1" in experiment else 32)
    assert instantiate(cfg.scheduler).num_timesteps == 5
    lr = instantiate(cfg.optim.lr_schedule, base_lr=float(cfg.optim.lr), max_steps=100)
    assert lr(99) <= float(cfg.optim.lr)
    strategy = instantiate(cfg.parallel)
    assert strategy.mode == "single"


def test_the_recipes_share_a_base_and_differ_in_a_few_lines():
    for name in EXPERIMENTS:
        text = (CONF / "experiment" / f"{name}.yaml").read_text()
        body = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
        assert "base/opensora_v1_" in text and len(body) <= 32, (name, len(body))
        assert "\n#   python run.py experiment=" + name in text  # its command is in the header


# ---------------------------------------------------------------- compose-time refusals


def test_unknown_keys_and_wrong_types_fail_at_compose_time(tmp_path):
    with pytest.raises(ConfigCompositionException, match="optim.not_a_key"):
        compose_cfg(["optim.not_a_key=1"], tmp_path)
    with pytest.raises(ConfigCompositionException, match="no_such_model"):
        compose_cfg(["model=no_such_model"], tmp_path)
    with pytest.raises(ConfigCompositionException, match="max_steps"):
        compose_cfg(["task.max_steps=abc"], tmp_path)
    with pytest.raises(ConfigCompositionException, match="dtype"):
        compose_cfg(["precision.dtype=fp8"], tmp_path)
    with pytest.raises(ConfigCompositionException, match="seed"):
        compose_cfg(["seed=abc"], tmp_path)
    with pytest.raises(ConfigCompositionException, match="not_a_root_key"):
        compose_cfg(["not_a_root_key=1"], tmp_path)
    # a key of another task's section: the typed task section refuses it
    with pytest.raises(ConfigCompositionException, match="ckpt_path"):
        compose_cfg(["task=train", "task.ckpt_path=x"], tmp_path)


def test_a_misspelled_key_inside_an_experiment_fails_at_compose_time(tmp_path):
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "experiment" / "typo.yaml").write_text("# @package _global_\nsed: 3\n")
    (conf / "experiment" / "typo_task.yaml").write_text("# @package _global_\ntask:\n  max_step: 3\n")
    for name, key in (("typo", "sed"), ("typo_task", "max_step")):
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            with pytest.raises(ConfigCompositionException) as e:
                compose(config_name="config", overrides=[f"experiment={name}"])
        assert key in str(e.value) + str(e.value.__cause__), name


def test_keys_that_only_code_read_are_declared(tmp_path):
    assert compose_cfg(["scheduler=iddpm_ddim"], tmp_path).scheduler.sampler.eta == 0.0
    assert "conv_impl" in compose_cfg(["vae=sd_vae_ft_ema", "data.image_size=64"], tmp_path).vae
    for option in ("t5_tiny", "t5_folder", "t5_v1_1_xxl"):
        text = (CONF / "text_encoder" / f"{option}.yaml").read_text()
        assert "\ntokenizer_path:" in text, option


# ---------------------------------------------------------------- the validation pass


def problems(overrides, tmp_path) -> list[str]:
    try:
        validate(compose_cfg([*overrides, "logger=none"], tmp_path))
    except ConfigError as e:
        return e.problems
    return []


def test_validation_names_key_value_and_what_is_allowed(tmp_path):
    got = problems(["task.keep_last=0", "optim.lr=-1", "task.log_every=0", "model.depth=0", "data.batch_size=0",
                    "task.ckpt_every=0"], tmp_path)
    assert "task.keep_last=0: must be >= 1" in got
    assert "optim.lr=-1: must be > 0" in got
    assert "task.log_every=0: must be >= 1" in got
    assert "model.depth=0: must be >= 1" in got
    assert "data.batch_size=0: must be >= 1" in got
    assert any(p.startswith("task.ckpt_every=0: must be >= 1 (null writes no checkpoints)") for p in got)
    assert problems([], tmp_path) == []
    got = problems(["+model.hiden_size=3"], tmp_path)
    assert len(got) == 1 and got[0].startswith("model.hiden_size is not a setting of opensora.model.STDiT (it takes: ")
    assert problems(["optim.lr=abc"], tmp_path) == ["optim.lr='abc': must be a number"]
    got = problems(["task=sample", "task.batch_size=0", "task.fps=0", "task.num_samples_per_prompt=0",
                    f"task.prompt_file={tmp_path / 'none.txt'}"], tmp_path)
    assert {"task.batch_size=0: must be >= 1", "task.fps=0: must be >= 1",
            "task.num_samples_per_prompt=0: must be >= 1"} <= set(got)
    assert any("task.prompt_file" in p and "no such file" in p for p in got)
    assert any("task.run=outputs/runs/<run>" in p for p in got)  # nothing to sample from


def test_validation_checks_settings_that_must_agree(tmp_path):
    assert any("model.pred_sigma=True but scheduler.learn_sigma=False" in p
               for p in problems(["model=stdit_xl2", "model.caption_channels=64", "model.model_max_length=8"],
                                 tmp_path))
    assert problems(["model.pred_sigma=true", "scheduler.learn_sigma=true"], tmp_path) == []
    assert any("not divisible by model.num_heads=3" in p for p in problems(["model.num_heads=3"], tmp_path))
    assert any("precision.dtype=fp16 needs a loss scale" in p
               for p in problems(["precision=fp16", "precision.loss_scale=null"], tmp_path))
    got = problems(["parallel=data"], tmp_path)
    assert any("parallel=data runs one process per device started by msrun" in p for p in got)
    got = problems(["data=video_csv", f"data.csv_path={tmp_path / 'none.csv'}"], tmp_path)
    assert got[0] == f"data.csv_path={tmp_path / 'none.csv'}: no such file"
    # the demo's tubelet model (patch 4x3x3) on 16 frames of 256 px: named, with what to choose instead
    assert got[1].startswith("model.input_size=[16, 256, 256] (latent frames, height, width from data.num_frames, ")
    assert "not divisible by model.patch_size=[4, 3, 3]: choose a model for this data (e.g. model=stdit_tiny" in got[1]
    assert problems(["data=video_csv", f"data.csv_path={tmp_path / 'none.csv'}", "model=stdit_tiny"], tmp_path) == [
        f"data.csv_path={tmp_path / 'none.csv'}: no such file"]


def test_an_unwritable_log_dir_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    got = problems([f"paths.log_dir={blocker / 'outputs'}"], tmp_path)
    assert got == [f"paths.log_dir={blocker / 'outputs'}: cannot be written ({blocker} is not a writable folder) "
                   "(set paths.log_dir (or PROJECT_ROOT) to a writable folder)"]


def test_latent_size_rejects_indivisible_sizes():
    from opensora.config import latent_size

    assert latent_size(16, 256, 8) == [16, 32, 32]
    assert latent_size(8, [16, 32], [1, 2, 2]) == [8, 8, 16]
    with pytest.raises(ValueError, match="not divisible"):
        latent_size(16, 250, 8)


def test_ddim_respaces_like_the_original_unless_asked_for_the_stride():
    from opensora.scheduler import IDDPM

    sections = IDDPM(num_sampling_steps=10, sampler="ddim")
    assert sorted(sections.timestep_map) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    stride = IDDPM(num_sampling_steps=10, sampler="ddim", timestep_spacing="stride")
    assert sorted(stride.timestep_map) == list(range(0, 1000, 100))
    assert np.array_equal(sorted(IDDPM(num_sampling_steps=10).timestep_map), sorted(sections.timestep_map))


# ---------------------------------------------------------------- run directories


def test_run_directories_never_collide_and_the_ranks_of_one_launch_share_one(tmp_path, monkeypatch):
    import opensora.config.resolvers as r

    def launch(ident):  # a process of another launch, started in the same second
        monkeypatch.setattr(r, "_LAUNCH", {"start": 1_800_000_000.0, "id": ident})
        monkeypatch.setattr(r, "_CLAIMED", {})

    launch("pid-1")
    first = r.claim_unique_dir(str(tmp_path / "runs"))
    launch("pid-2")
    assert r.unique_dir(str(tmp_path / "runs")) == first + "_1"  # the free name, nothing claimed yet
    assert not Path(first + "_1").exists()
    second = r.claim_unique_dir(str(tmp_path / "runs"))
    assert second == first + "_1" and Path(second, ".launch").read_text() == "pid-2"
    launch("msrun-7-1.000")  # two ranks of one msrun job: the second finds the first's claim and shares it
    a = r.claim_unique_dir(str(tmp_path / "runs"))
    monkeypatch.setattr(r, "_CLAIMED", {})
    assert r.claim_unique_dir(str(tmp_path / "runs")) == a == first + "_2"


def test_resume_composes_the_runs_own_overrides_with_those_given_now(tmp_path):
    from opensora.config.resume import resume_overrides

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 1\n")
    (run / ".hydra" / "overrides.yaml").write_text(
        "- model.depth=2\n- task.max_steps=100\n- hydra.run.dir=/elsewhere\n- logger=none\n")
    assert resume_overrides(run, ["task.max_steps=200", "parallel=data"]) == [
        "model.depth=2", "logger=none", "task.max_steps=200", "parallel=data"]
    # a resume records its complete list, which the next resume starts from
    (run / "resumes" / "t1" / ".hydra").mkdir(parents=True)
    (run / "resumes" / "t1" / ".hydra" / "config.yaml").write_text("seed: 1\n")
    (run / "resumes" / "t1" / ".hydra" / "overrides.yaml").write_text(
        "- model.depth=2\n- task.max_steps=200\n- resume=x\n")
    assert resume_overrides(run, []) == ["model.depth=2", "task.max_steps=200"]
