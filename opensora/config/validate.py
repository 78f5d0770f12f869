"""One validation pass over the composed config, before anything is written or initialised.

`validate(cfg)` checks every setting it knows and raises one `ConfigError` listing every problem, each naming the
key, the value and what is allowed:
- typed sections (opensora/config/schema.py): the range and path rules of their fields;
- the other sections: the rules in `RULES` (keyed by the dotted key);
- every `_target_` section: keys its target does not take (a misspelled `model.hiden_size` in an experiment);
- settings that must agree across sections (`CHECKS`: variance settings, precision, parallel mode and launch,
  model folders, resume).
Run by the Hydra callback in opensora/config/callback.py (so a refused run leaves nothing behind) and by tests.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """The composed config cannot run; `problems` lists every reason (each names its key)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("the configuration cannot run:\n" + "\n".join(f"  - {p}" for p in self.problems))


_UNSET = object()


def value_of(cfg: DictConfig, key: str, problems: Optional[list] = None) -> Any:
    """`cfg`'s value at the dotted `key` (resolved, containers as plain lists/dicts); `_UNSET` when absent or
    `???`. A failing interpolation is recorded in `problems`, except one on Hydra's runtime (paths.output_dir
    before the job starts), which counts as absent."""
    try:
        node = OmegaConf.select(cfg, key, default=_UNSET, throw_on_missing=False)
        if isinstance(node, (DictConfig, ListConfig)):
            return OmegaConf.to_container(node, resolve=True)
        return node
    except (InterpolationResolutionError, MissingMandatoryValue) as e:
        text = str(e)
        if not ("runtime" in text and "hydra" in text.lower() or "HydraConfig was not set" in text
                or isinstance(e, MissingMandatoryValue)) and problems is not None:
            problems.append(f"{key}: {_first_line(e)}")
        return _UNSET


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ================================================================
# Value rules
# ================================================================


def check_value(key: str, value: Any, *, ge=None, gt=None, le=None, lt=None, path=None, help="",
                items: bool = False) -> Optional[str]:
    """The problem with `value` at `key` under the given rule, or None (None values pass). With `items`, a list
    value is checked element by element (e.g. image_size [H, W])."""
    if value is None or value is _UNSET:
        return None
    hint = f" ({help})" if help else ""
    if items and isinstance(value, (list, tuple)):
        for v in value:
            bad = check_value(key, v, ge=ge, gt=gt, le=le, lt=lt)
            if bad:
                return f"{key}={value!r}: every entry {bad.split(': ', 1)[1]}{hint}"
        return None
    if any(b is not None for b in (ge, gt, le, lt)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{key}={value!r}: must be a number{hint}"
        for bound, ok, text in ((ge, lambda v, b: v >= b, ">="), (gt, lambda v, b: v > b, ">"),
                                (le, lambda v, b: v <= b, "<="), (lt, lambda v, b: v < b, "<")):
            if bound is not None and not ok(value, bound):
                return f"{key}={value!r}: must be {text} {bound:g}{hint}"
    if path is not None:
        p = Path(str(value))
        if path == "file" and not p.is_file():
            return f"{key}={value}: no such file{hint}"
        if path == "dir" and not p.is_dir():
            return f"{key}={value}: no such folder{hint}"
        if path == "exists" and not p.exists():
            return f"{key}={value}: does not exist{hint}"
        if path == "parent":  # a folder or file to write: it, or its nearest existing ancestor, must be writable
            if p.is_file():
                return None if os.access(p, os.W_OK) else f"{key}={value}: cannot be written (read-only){hint}"
            q = p
            while not q.exists() and q != q.parent:
                q = q.parent
            if not q.is_dir() or not os.access(q, os.W_OK | os.X_OK):
                return f"{key}={value}: cannot be written ({q} is not a writable folder){hint}"
    return None


# Rules for settings of untyped sections (group options built by _target_), by dotted key.
RULES: dict[str, dict] = {
    "optim.lr": dict(gt=0),
    "optim.grad_clip": dict(ge=0, help="0 or null: no clipping"),
    "optim.ema_decay": dict(ge=0, lt=1, help="null: no EMA"),
    "optim.lr_schedule.warmup_steps": dict(ge=0),
    "optim.lr_schedule.min_lr": dict(ge=0),
    "data.batch_size": dict(ge=1),
    "data.num_frames": dict(ge=1),
    "data.frame_interval": dict(ge=1),
    "data.image_size": dict(ge=1, items=True),
    "data.num_workers": dict(ge=0),
    "data.prefetch": dict(ge=1),
    "data.max_bad_fraction": dict(ge=0, le=1, help="null: never stop"),
    "data.csv_path": dict(path="file"),
    "data.video_folder": dict(path="dir"),
    "model.depth": dict(ge=1),
    "model.hidden_size": dict(ge=1),
    "model.num_heads": dict(ge=1),
    "model.mlp_ratio": dict(gt=0),
    "model.patch_size": dict(ge=1, items=True),
    "model.class_dropout_prob": dict(ge=0, le=1),
    "model.space_scale": dict(gt=0),
    "model.time_scale": dict(gt=0),
    "scheduler.num_sampling_steps": dict(ge=1, help="null: the full diffusion"),
    "scheduler.diffusion_steps": dict(ge=1),
    "scheduler.cfg_scale": dict(ge=0),
    "scheduler.sampler.eta": dict(ge=0),
    "vae.micro_batch_size": dict(ge=1),
    "text_encoder.model_max_length": dict(ge=1),
}

# Keys of _target_ sections read by this project's code rather than passed to the target.
CONFIG_ONLY: dict[str, set] = {"model": {"pretrained"}}
# The _target_ sections whose keys are checked against their target's signature.
TARGET_SECTIONS = ("model", "scheduler", "scheduler.sampler", "vae", "text_encoder", "data.dataset", "optim.optimizer",
                   "optim.lr_schedule", "logger", "task.timestep_sampling", "parallel", "clip")


def _typed_rules(cfg: DictConfig, prefix: str = "") -> Iterable[tuple[str, Any, dict]]:
    """(key, value, rule) for every field with rules in the typed nodes of `cfg`."""
    for key in list(cfg.keys()) if isinstance(cfg, DictConfig) else []:
        full = f"{prefix}{key}"
        try:
            node = cfg._get_node(key)
        except Exception:  # noqa: BLE001
            continue
        if isinstance(node, DictConfig) and not node._is_none() and not node._is_missing():
            kind = OmegaConf.get_type(node)
            if dataclasses.is_dataclass(kind):
                for f in dataclasses.fields(kind):
                    if f.metadata and f.name in node:
                        yield f"{full}.{f.name}", f.metadata
            yield from _typed_rules(node, f"{full}.")


def _target_keys(cfg: DictConfig, section: str, problems: list) -> None:
    node = OmegaConf.select(cfg, section, default=None, throw_on_missing=False)
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return
    try:
        from hydra.utils import get_object

        target = get_object(str(node._target_))
    except Exception as e:  # noqa: BLE001 - a wrong _target_ is itself the problem
        problems.append(f"{section}._target_={node._target_}: cannot be imported ({_first_line(e)})")
        return
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    accepted = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    extra = CONFIG_ONLY.get(section, set())
    unknown = [k for k in node.keys() if not str(k).startswith("_") and k not in accepted and k not in extra]
    for k in unknown:
        problems.append(f"{section}.{k} is not a setting of {node._target_} (it takes: "
                        f"{', '.join(sorted(a for a in accepted if a not in ('self', 'params'))) or 'nothing'})")


# ================================================================
# Settings that must agree across sections
# ================================================================

CHECKS: list[Callable[[DictConfig], list[str]]] = []


def check(fn: Callable[[DictConfig], list[str]]) -> Callable[[DictConfig], list[str]]:
    CHECKS.append(fn)
    return fn


def task_name(cfg: DictConfig) -> str:
    """The task's short name (train, sample, ...) from its _target_ `opensora.tasks.<name>.run`."""
    target = str(OmegaConf.select(cfg, "task._target_", default="") or "")
    parts = target.split(".")
    return parts[-2] if len(parts) >= 2 else target


@check
def _variance(cfg) -> list[str]:
    pred, learn = value_of(cfg, "model.pred_sigma"), value_of(cfg, "scheduler.learn_sigma")
    if _UNSET in (pred, learn) or bool(pred) == bool(learn):
        return []
    return [f"model.pred_sigma={pred} but scheduler.learn_sigma={learn}: a model that predicts its variance needs a "
            "scheduler that learns it, and vice versa; set both to true (the original) or both to false"]


@check
def _patches(cfg) -> list[str]:
    """The latent video must split into whole patches (a tubelet model on other data is the usual cause)."""
    if not builds(cfg, "model") or str(value_of(cfg, "model._target_")).endswith("STDiT2"):
        return []  # STDiT2 pads its input to the patch size
    size, patch = value_of(cfg, "model.input_size"), value_of(cfg, "model.patch_size")
    if not (isinstance(size, list) and isinstance(patch, list) and len(size) == len(patch) == 3):
        return []
    if all(isinstance(a, int) and isinstance(b, int) and b > 0 and a % b == 0 for a, b in zip(size, patch)):
        return []
    return [f"model.input_size={size} (latent frames, height, width from data.num_frames, data.image_size and "
            f"vae.downsample) is not divisible by model.patch_size={patch}: choose a model for this data (e.g. "
            "model=stdit_tiny or model=stdit_xl2, patch 1x2x2) or change data.num_frames / data.image_size"]


@check
def _heads(cfg) -> list[str]:
    c, h = value_of(cfg, "model.hidden_size"), value_of(cfg, "model.num_heads")
    if isinstance(c, int) and isinstance(h, int) and h > 0 and c % h:
        return [f"model.hidden_size={c} is not divisible by model.num_heads={h}"]
    return []


@check
def _precision(cfg) -> list[str]:
    dtype, scale = value_of(cfg, "precision.dtype"), value_of(cfg, "precision.loss_scale")
    if task_name(cfg) == "train" and dtype == "fp16" and scale in (None, _UNSET):
        return ["precision.dtype=fp16 needs a loss scale, but precision.loss_scale=null: fp16 gradients underflow "
                "without one. Use precision=fp16 (dynamic) or set precision.loss_scale=dynamic or static"]
    return []


@check
def _parallel(cfg) -> list[str]:
    from opensora.config.resolvers import under_msrun

    mode = value_of(cfg, "parallel.mode")
    world = int(os.environ.get("MS_WORKER_NUM") or os.environ.get("RANK_SIZE") or 1) if under_msrun() else None
    if mode == "single" and world is not None:
        return [f"started by msrun ({world} workers) but parallel=single: use parallel=data (or zero, sequence) to "
                "train on all of them, or run without msrun"]
    if mode in ("data", "zero", "sequence") and world is None:
        return [f"parallel={mode} runs one process per device started by msrun, e.g. `msrun --worker_num=2 "
                "--local_worker_num=2 --master_port=8118 --log_dir=outputs/msrun --join=True run.py "
                f"parallel={mode}`; this process was not started by msrun (MS_ROLE is not set)"]
    if mode == "zero" and world is not None and world < 2:
        return [f"parallel=zero shards the optimizer state over the ranks, but the world size is {world} (msrun "
                f"--worker_num={world}): start msrun with --worker_num=2 or more, or use parallel=single"]
    if mode == "sequence" and world is not None:
        from opensora.parallel.sequence import check_sequence_parallel

        try:
            check_sequence_parallel(cfg, world)
        except (ValueError, RuntimeError) as e:
            return [str(e)]
    return []


@check
def _model_files(cfg) -> list[str]:
    problems = []
    task = task_name(cfg)
    pretrained = value_of(cfg, "model.pretrained")
    if isinstance(pretrained, str) and task in ("train", "convert") and not Path(pretrained).exists():
        problems.append(
            f"model.pretrained={pretrained} does not exist: put the downloaded weights there, or, if it is an "
            "earlier training stage's output (stage.init_from), run that stage first (its recipe is "
            "conf/experiment/train_<stage>.yaml), or point model.pretrained at another checkpoint (null: random "
            "initialisation)")
    for part in ("text_encoder", "vae"):
        folder = value_of(cfg, f"{part}.from_pretrained")
        if isinstance(folder, str) and not Path(folder).exists() and _part_is_built(cfg, part):
            problems.append(f"{part}.from_pretrained={folder} does not exist: put the downloaded folder there "
                            f"(README, 'Original weights'), or set {part}.from_pretrained=PATH")
    folder = value_of(cfg, "clip.from_pretrained")
    if task in CLIP_TASKS and isinstance(folder, str) and not (Path(folder) / "config.json").is_file():
        problems.append(f"clip.from_pretrained={folder} {'has no config.json' if Path(folder).is_dir() else 'does not exist'}"
                        ": put a Hugging Face CLIPModel folder there, e.g. `huggingface-cli download "
                        "openai/clip-vit-large-patch14 --local-dir models/clip-vit-large-patch14` (README, 'Evaluation'), "
                        "or set clip.from_pretrained=PATH")
    return problems


@check
def _lpips(cfg) -> list[str]:
    if task_name(cfg) != "eval_vae":
        return []
    given = {k: value_of(cfg, f"task.lpips.{k}") for k in ("alexnet_path", "heads_path")}
    missing = [k for k, v in given.items() if v in (None, _UNSET)]
    if len(missing) == 1:
        have = next(k for k in given if k not in missing)
        return [f"task.lpips.{missing[0]} is not set but task.lpips.{have} is: LPIPS needs both the AlexNet weights "
                "(torchvision's alexnet-owt-7be5be79.pth) and the LPIPS heads (lpips' weights/v0.1/alex.pth); set "
                "both, or neither (no LPIPS)"]
    return []


# The tasks that build a CLIP (the root's `clip` section), and those that build neither text encoder nor VAE.
CLIP_TASKS = ("eval_clip", "score_aesthetic", "score_match")
EVAL_TASKS = ("eval_vae",) + CLIP_TASKS


def builds(cfg, section: str) -> bool:
    """Whether the configured task builds the component of `section` (only those are checked): the model is not
    built to decode latents, embed text or videos, scan videos or convert another component; see
    `_part_is_built` for the text encoder and the VAE."""
    task = task_name(cfg)
    if section == "model":
        return task in ("train", "sample", "benchmark", "eval_loss") or \
            task == "convert" and value_of(cfg, "task.component") == "model"
    if section in ("text_encoder", "vae"):
        return _part_is_built(cfg, section)
    if section in ("optim", "data"):
        return task in ("train", "benchmark", "embed_text", "embed_video", "scan_videos") or section == "data"
    return True


def _part_is_built(cfg, part: str) -> bool:
    """Whether the task builds the text encoder / VAE (cached embeddings replace them)."""
    task = task_name(cfg)
    if part == "text_encoder":
        return not (value_of(cfg, "data.text_embed_folder") not in (None, _UNSET) and task == "train"
                    or value_of(cfg, "task.text_embed_folder") not in (None, _UNSET)
                    or task in ("decode", "embed_video", "scan_videos", "benchmark") + EVAL_TASKS
                    or task == "convert" and value_of(cfg, "task.component") != "text_encoder")
    return not (value_of(cfg, "data.video_embed_folder") not in (None, _UNSET) and task == "train"
                or value_of(cfg, "task.save_latents") is True
                or task in ("embed_text", "scan_videos", "benchmark") + CLIP_TASKS
                or task == "convert" and value_of(cfg, "task.component") != "vae")


@check
def _caches(cfg) -> list[str]:
    if task_name(cfg) != "train":
        return []
    problems = []
    for key in ("data.text_embed_folder", "data.video_embed_folder"):
        folder = value_of(cfg, key)
        if isinstance(folder, str) and not Path(folder).is_dir():
            what = "task=embed_text" if "text" in key else "task=embed_video"
            problems.append(f"{key}={folder}: no such folder; build the cache first with {what} and the same "
                            f"settings (README, 'Training on your own videos')")
    return problems


@check
def _sample_source(cfg) -> list[str]:
    if task_name(cfg) != "sample":
        return []
    problems = []
    if value_of(cfg, "task.ckpt_path") in (None, _UNSET) and value_of(cfg, "task.run") in (None, _UNSET):
        problems.append("task=sample needs the weights to sample from: task.run=outputs/runs/<run> (a training run) "
                        "or task.ckpt_path=PATH (a checkpoint directory or file)")
    if value_of(cfg, "task.text_embed_folder") in (None, _UNSET):  # else the prompts come from the cache
        prompts = value_of(cfg, "task.prompts")
        given = [p for p in (prompts if isinstance(prompts, list) else []) if str(p).strip()]
        path = value_of(cfg, "task.prompt_file")
        if isinstance(path, str) and Path(path).is_file():
            if not any(line.strip() for line in Path(path).read_text(errors="replace").splitlines()):
                problems.append(f"task.prompt_file={path} holds no prompt (every line is blank): write one prompt "
                                "per line")
            else:
                given.append(path)
        if not given and not (isinstance(path, str) and Path(path).is_file()):
            problems.append("no prompts: set task.prompts='[a red square moving left]' or task.prompt_file=FILE "
                            "(one prompt per line)")
    return problems


@check
def _buckets(cfg) -> list[str]:
    """Bucketed data (data.bucket_config): every entry of the bucket config, own resolutions and mask ratios checked
    (named); it trains STDiT2 (the only model taking size conditioning), not under sequence parallel (frames split
    over ranks of different shapes). Without it, the settings only bucketed training has are refused."""
    task = task_name(cfg)
    bucket, masks = value_of(cfg, "data.bucket_config"), value_of(cfg, "data.mask_ratios")
    accumulation = value_of(cfg, "task.grad_accumulation")
    if bucket in (None, _UNSET):
        problems = []
        if task == "train" and masks not in (None, _UNSET):
            problems.append("data.mask_ratios (masked conditioning frames) is trained with bucketed data only "
                            "(data=variable_csv, STDiT2); set data.mask_ratios=null")
        if task == "train" and isinstance(accumulation, int) and accumulation > 1:
            problems.append(f"task.grad_accumulation={accumulation} is for bucketed data (data.bucket_config); raise "
                            "data.batch_size instead")
        return problems
    from opensora.data.bucket import Bucket
    from opensora.data.masks import validate_mask_ratios

    problems = []
    try:
        Bucket(bucket, resolutions=None if value_of(cfg, "data.resolutions") is _UNSET
               else value_of(cfg, "data.resolutions"))
    except ValueError as e:
        problems.append(str(e))
    if masks not in (None, _UNSET):
        try:
            validate_mask_ratios(masks)
        except ValueError as e:
            problems.append(str(e))
    if task == "train":
        target = str(value_of(cfg, "model._target_"))
        if not target.endswith("STDiT2"):
            problems.append(f"data.bucket_config trains STDiT2 (its size, aspect-ratio, frames and fps conditioning), "
                            f"but model._target_={target}: use model=stdit2_tiny or model=stdit2_xl2")
        if value_of(cfg, "parallel.mode") == "sequence":
            problems.append("parallel=sequence splits each video's frames over ranks, which bucketed data gives "
                            "different shapes: use parallel=data or parallel=zero with data.bucket_config")
    return problems


@check
def _eval_loss(cfg) -> list[str]:
    """task=eval_loss and task.validate: weights to evaluate, buckets, a model that takes the size conditioning."""
    task = task_name(cfg)
    problems = []
    if task == "eval_loss":
        if value_of(cfg, "task.ckpt_path") in (None, _UNSET) and value_of(cfg, "task.run") in (None, _UNSET):
            problems.append("task=eval_loss needs the weights to evaluate: task.run=outputs/runs/<run> (a training run) "
                            "or task.ckpt_path=PATH (a checkpoint directory or file)")
        if value_of(cfg, "task.bucket_config") in (None, _UNSET) and value_of(cfg, "data.bucket_config") in (None,
                                                                                                            _UNSET):
            problems.append("task=eval_loss evaluates per bucket: set task.bucket_config or use bucketed data "
                            "(data=variable_csv, or task.run of a bucketed training run)")
        target = str(value_of(cfg, "model._target_"))
        if not target.endswith("STDiT2"):
            problems.append(f"task=eval_loss evaluates STDiT2 (its size conditioning), model._target_={target}: use "
                            "model=stdit2_tiny / stdit2_xl2, or task.run of a bucketed training run")
    if task == "train" and value_of(cfg, "task.validate.csv_path") not in (None, _UNSET) \
            and value_of(cfg, "data.bucket_config") in (None, _UNSET):
        problems.append("task.validate (the validation loss per bucket) is for bucketed data (data.bucket_config); "
                        "the fixed-size data evaluates with task.eval")
    return problems


@check
def _tracking(cfg) -> list[str]:
    """logger.mode=online with a server that cannot be reached: said now, not after W&B's own 90 s timeout."""
    if value_of(cfg, "logger.mode") != "online" or value_of(cfg, "logger.if_unreachable") != "fail":
        return []
    from opensora.logger.wandb import server_unreachable

    problem = server_unreachable(float(value_of(cfg, "logger.reach_timeout_s") or 5.0))
    if problem is None:
        return []
    return [f"logger.mode=online but {problem}: use logger.mode=offline (upload later with `wandb sync "
            "<run>/wandb/offline-run-*`), logger=none, or logger.if_unreachable=offline to fall back to offline"]


@check
def _sample_request(cfg) -> list[str]:
    """Open-Sora 1.1 sampling (an STDiT2 model): prompt options, mask strategies against the clip and the reference
    files, loop settings and prompt file names, checked before any model is built (opensora/sampling/request.py)."""
    if task_name(cfg) != "sample":
        return []
    problems = []
    if value_of(cfg, "task.name_by_prompt") is True and value_of(cfg, "task.save_latents") is True:
        problems.append("task.name_by_prompt=true names the decoded videos, but task.save_latents=true does not decode "
                        "them: drop one (task=decode numbers the videos it decodes)")
    from opensora.sampling.request import is_stdit2, prompt_name, request_problems

    prompts = value_of(cfg, "task.prompts")
    prompts = [str(p) for p in prompts] if isinstance(prompts, list) else []
    path = value_of(cfg, "task.prompt_file")
    if isinstance(path, str) and Path(path).is_file():
        prompts += [line.strip() for line in Path(path).read_text(errors="replace").splitlines()]
    prompts = [p for p in prompts if p.strip()]
    if not is_stdit2(value_of(cfg, "model._target_")):  # STDiT 1.0: no prompt options; the task refuses
        if value_of(cfg, "task.name_by_prompt") is True:  # conditioning settings, naming the keys
            for i, p in enumerate(prompts):
                try:
                    prompt_name(p, i)
                except ValueError as e:
                    problems.append(str(e))
        return problems
    if not prompts:  # none given (cached captions, or the "no prompts" problem of _sample_source)
        return problems
    size = value_of(cfg, "model.input_size")
    clip_frames = size[0] if isinstance(size, list) and size and isinstance(size[0], int) else None
    loop, cfl = value_of(cfg, "task.loop"), value_of(cfg, "task.condition_frame_length")
    if not (isinstance(loop, int) and isinstance(cfl, int)):
        return problems
    refs, strategies = value_of(cfg, "task.reference_path"), value_of(cfg, "task.mask_strategy")
    return problems + request_problems(prompts, loop, cfl, None if refs is _UNSET else refs,
                                       None if strategies is _UNSET else strategies, clip_frames,
                                       value_of(cfg, "task.name_by_prompt") is True)


@check
def _resume(cfg) -> list[str]:
    from opensora.config.resume import resume_problem

    resume = value_of(cfg, "resume")
    if resume in (None, _UNSET):
        return []
    problem = resume_problem(str(resume))
    if problem is None and task_name(cfg) != "train":
        problem = f"resume={resume} continues a training run, but task={task_name(cfg)}: drop resume="
    return [problem] if problem else []


# ================================================================
# The pass
# ================================================================


def validate(cfg: DictConfig) -> list[str]:
    """Check the whole composed config; raises ConfigError listing every problem. Returns warnings (settings
    that are allowed but turn something off), to be logged."""
    problems: list[str] = []
    for key, meta in _typed_rules(cfg):
        bad = check_value(key, value_of(cfg, key, problems), **meta)
        if bad:
            problems.append(bad)
    for key, meta in RULES.items():
        value = value_of(cfg, key, problems)
        if value is not _UNSET:
            bad = check_value(key, value, **meta)
            if bad:
                problems.append(bad)
    for section in TARGET_SECTIONS:
        if builds(cfg, section.split(".")[0]):
            _target_keys(cfg, section, problems)
    for fn in CHECKS:
        problems.extend(fn(cfg))
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    warnings = []
    if task_name(cfg) == "train" and value_of(cfg, "task.ckpt_every") is None:
        warnings.append("task.ckpt_every=null: no checkpoint will be written, so this run cannot be resumed")
    return warnings
