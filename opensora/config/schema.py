"""Typed sections of the config: dataclasses registered in Hydra's ConfigStore.

A group option opts in with `defaults: [/schema/<section>/<name>@_here_, _self_]`; from then on an unknown or
misspelled key - on the command line or inside an experiment file - fails at compose time naming it, and a
value of the wrong type (`task.max_steps=abc`) fails naming the key and the value. Modes and dtypes are enums,
so `precision.dtype=fp8` lists the allowed values. The root (`RootConfig`) is typed too: a top-level key that
no section declares fails the same way.

Ranges (`max_steps >= 1`) and paths (`must exist`) are field metadata, checked by `opensora.config.validate`
in one pass over the composed config before any work starts (`rule(...)` below).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Optional

from omegaconf import MISSING


def rule(default: Any = MISSING, *, ge: Optional[float] = None, gt: Optional[float] = None,
         le: Optional[float] = None, lt: Optional[float] = None, path: Optional[str] = None,
         factory=None, help: str = "") -> Any:
    """A dataclass field with the checks `opensora.config.validate` applies to its value (None is not checked):
    ge/gt/le/lt bounds, and `path` = "file" | "dir" | "exists" (must exist) or "parent" (its folder must
    exist or be creatable, and be writable). `help` is appended to the error."""
    meta = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, path=path, help=help).items() if v not in (None, "")}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ================================================================
# Enums (StrEnum: members compare and format as their names)
# ================================================================


class Dtype(StrEnum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class LossScale(StrEnum):
    dynamic = "dynamic"
    static = "static"


class ParallelMode(StrEnum):
    single = "single"
    data = "data"
    zero = "zero"
    sequence = "sequence"


class SequenceAttention(StrEnum):
    auto = "auto"
    ulysses = "ulysses"
    allgather = "allgather"


class DeviceTarget(StrEnum):
    CPU = "CPU"
    GPU = "GPU"
    Ascend = "Ascend"


class JitLevel(StrEnum):
    O0 = "O0"
    O1 = "O1"
    O2 = "O2"


class MemoryLevel(StrEnum):
    O0 = "O0"
    O1 = "O1"


class ConvImpl(StrEnum):
    auto = "auto"
    conv = "conv"
    matmul = "matmul"


class Direction(StrEnum):
    minimize = "minimize"
    maximize = "maximize"


class ShapeMode(StrEnum):
    per_shape = "per_shape"
    dynamic = "dynamic"


class MicroBatchWeight(StrEnum):
    equal = "equal"
    samples = "samples"


class Component(StrEnum):
    model = "model"
    text_encoder = "text_encoder"
    vae = "vae"


# ================================================================
# Cross-cutting sections
# ================================================================


@dataclass
class PrecisionConfig:
    """Numeric precision of the diffusion model.

    dtype: compute dtype of its matmuls/activations; parameters, LayerNorm, softmax, embeddings and the loss stay
    fp32. loss_scale: null, `dynamic` (start at loss_scale_value, multiply by loss_scale_factor after
    loss_scale_window finite steps, divide on an overflow and skip that step) or `static` (fixed value; overflow
    steps skipped).
    """

    dtype: Dtype = Dtype.fp32
    loss_scale: Optional[LossScale] = None
    loss_scale_value: float = rule(65536.0, ge=1)
    loss_scale_factor: int = rule(2, ge=2)
    loss_scale_window: int = rule(2000, ge=1)


@dataclass
class DeviceConfig:
    """The device and how MindSpore compiles for it (opensora/runtime.py applies it).

    target: CPU, GPU or Ascend. jit_level: MindSpore's graph optimisation level. memory_optimize_level: O1
    reuses intermediate buffers. flash_attention: the fused attention kernel where the device has it (Ascend;
    elsewhere the math attention, logged once). conv_impl: how the VAE's 3x3 convolutions run (auto: im2col +
    MatMul on CPU, where MindSpore's Conv2D is ~100x slower; the Conv2D kernel elsewhere). runtime_num_threads:
    MindSpore's CPU thread pool (null: its default).
    """

    target: DeviceTarget = DeviceTarget.CPU
    jit_level: JitLevel = JitLevel.O0
    memory_optimize_level: MemoryLevel = MemoryLevel.O0
    flash_attention: bool = False
    conv_impl: ConvImpl = ConvImpl.auto
    runtime_num_threads: Optional[int] = rule(None, ge=1)


@dataclass
class ParallelConfig:
    """How processes share the work: one strategy object per mode (`_target_`, opensora/parallel/).

    `single`: one process. `data`: data parallel over the ranks msrun starts (gradients averaged with AllReduce,
    one data shard per rank). `zero`: `data` with the optimizer state (AdamW moments, EMA) sharded over the ranks.
    `sequence`: each video's frames split over groups of `sequence_size` ranks (null: all of them), data
    parallel across the groups; `sequence_attention` is how the temporal attention sees all frames. Under msrun,
    ranks wait for each other through files where one can be far behind, for up to `sync_timeout_s`.
    """

    _target_: str = MISSING
    mode: ParallelMode = ParallelMode.single
    sequence_size: Optional[int] = rule(None, ge=1)
    sequence_attention: SequenceAttention = SequenceAttention.auto
    sync_timeout_s: float = rule(1800.0, gt=0)


@dataclass
class PathsConfig:
    root_dir: str = "."
    pretrained_dir: str = MISSING
    pixart_checkpoint: Optional[str] = None
    log_dir: str = rule(MISSING, path="parent", help="set paths.log_dir (or PROJECT_ROOT) to a writable folder")
    stages_dir: str = MISSING
    output_dir: str = MISSING


@dataclass
class StageConfig:
    """A training stage of a recipe: its output folder name under paths.stages_dir, and the stage it
    initialises from (null: none)."""

    name: str = MISSING
    init_from: Optional[str] = None


# ================================================================
# Task sections (one per conf/task/*.yaml)
# ================================================================


@dataclass
class EvalConfig:
    """Held-out sampling and scoring during/after training (datasets with an evaluator)."""

    every: int = rule(0, ge=0, help="0: only at the end")
    num_samples_per_prompt: int = rule(1, ge=1)
    batch_size: int = rule(16, ge=1)
    fps: int = rule(8, ge=1)
    upscale: int = rule(8, ge=1)


@dataclass
class LossEvalConfig:
    """The validation loss per bucket and timestep (opensora/eval/loss.py): a validation CSV, its files' folder and
    cached caption embeddings, the buckets (null: data.bucket_config), how many timesteps, at most how many samples
    per bucket, how the graph is compiled for the buckets' shapes."""

    csv_path: Optional[str] = rule(None, path="file")
    video_folder: Optional[str] = rule(None, path="dir")
    text_embed_folder: Optional[str] = rule(None, path="dir")
    bucket_config: Any = None
    num_timesteps: int = rule(10, ge=1)
    max_samples: Optional[int] = rule(None, ge=1)
    shapes: ShapeMode = ShapeMode.dynamic


@dataclass
class ValidateConfig(LossEvalConfig):
    """The validation loss during training (bucketed data), when csv_path is set: every N steps and at the end,
    with the training weights (use_ema: the EMA's), logged as val/* curves."""

    every: int = rule(0, ge=0, help="0: only at the end")
    use_ema: bool = False


@dataclass
class EvalLossTask(LossEvalConfig):
    _target_: str = "opensora.tasks.eval_loss.run"
    csv_path: str = rule(MISSING, path="file")
    run: Optional[str] = rule(None, path="dir", help="a training run's directory (outputs/runs/<run>)")
    ckpt_path: Optional[str] = rule(None, path="exists")
    use_ema: bool = True


@dataclass
class TrainTask:
    """grad_accumulation, shapes and micro_batch_weight apply to bucketed data (data.bucket_config): micro-batches
    per rank and step (their gradients averaged before the update); how the step is compiled for the buckets'
    shapes (dynamic: one graph with dynamic dims, the default; per_shape: one graph per shape, kept; README,
    "Variable shapes in graph mode"); how micro-batches of
    different sizes are averaged (equal: each micro-batch's mean loss counts the same, as v1.1.0's all-reduce
    over ranks; samples: each sample counts the same)."""

    _target_: str = "opensora.tasks.train.run"
    max_steps: int = rule(1000, ge=1)
    log_every: int = rule(10, ge=1)
    ckpt_every: Optional[int] = rule(200, ge=1, help="null writes no checkpoints")
    keep_last: int = rule(2, ge=1)
    timestep_sampling: Any = MISSING
    eval: Optional[EvalConfig] = None
    grad_accumulation: int = rule(1, ge=1)
    shapes: ShapeMode = ShapeMode.dynamic
    micro_batch_weight: MicroBatchWeight = MicroBatchWeight.equal
    validate: ValidateConfig = field(default_factory=ValidateConfig)


@dataclass
class SampleTask:
    _target_: str = "opensora.tasks.sample.run"
    run: Optional[str] = rule(None, path="dir", help="a training run's directory (outputs/runs/<run>)")
    ckpt_path: Optional[str] = rule(None, path="exists")
    use_ema: bool = True
    prompts: Optional[list[str]] = None
    prompt_file: Optional[str] = rule(None, path="file")
    text_embed_folder: Optional[str] = rule(None, path="dir")
    save_latents: bool = False
    num_samples_per_prompt: int = rule(1, ge=1)
    batch_size: int = rule(8, ge=1)
    fps: int = rule(8, ge=1)
    upscale: int = rule(1, ge=1)
    evaluate: bool = False
    # Open-Sora 1.1 (STDiT2) conditioning and loop generation (opensora/sampling/): per prompt, or one for all
    reference_path: Any = None
    mask_strategy: Any = None
    loop: int = rule(1, ge=1)
    condition_frame_length: int = rule(4, ge=1)
    loop_reencode: bool = True
    # Videos named after their prompts (<prompt>-<k>.mp4, VBench's layout) in save_dir; existing ones are skipped
    name_by_prompt: bool = False
    save_dir: Optional[str] = rule(None, path="parent")


@dataclass
class DecodeTask:
    _target_: str = "opensora.tasks.decode.run"
    latents_dir: str = rule(MISSING, path="dir")
    batch_size: int = rule(8, ge=1)
    fps: Optional[int] = rule(None, ge=1)
    upscale: Optional[int] = rule(None, ge=1)
    evaluate: bool = False


@dataclass
class EmbedTextTask:
    _target_: str = "opensora.tasks.embed_text.run"
    output_dir: Optional[str] = None
    csv_path: Optional[str] = rule(None, path="file")
    prompts: Optional[list[str]] = None
    prompt_file: Optional[str] = rule(None, path="file")
    batch_size: int = rule(16, ge=1)
    overwrite: bool = False


@dataclass
class EmbedVideoTask:
    _target_: str = "opensora.tasks.embed_video.run"
    output_dir: Optional[str] = None
    batch_size: int = rule(4, ge=1)
    num_workers: int = rule(0, ge=0)
    overwrite: bool = False


@dataclass
class ScanFilters:
    readable: bool = True
    min_frames: Optional[int] = rule(None, ge=1)
    min_height: Optional[int] = rule(None, ge=1)
    min_width: Optional[int] = rule(None, ge=1)
    min_fps: Optional[float] = rule(None, gt=0)
    min_duration: Optional[float] = rule(None, ge=0)
    max_duration: Optional[float] = rule(None, gt=0)
    min_aspect_ratio: Optional[float] = rule(None, gt=0)
    max_aspect_ratio: Optional[float] = rule(None, gt=0)


@dataclass
class ScanVideosTask:
    _target_: str = "opensora.tasks.scan_videos.run"
    folder: Optional[str] = rule(None, path="dir")
    csv_path: Optional[str] = rule(None, path="file")
    output_csv: Optional[str] = None
    check_decode: bool = True
    num_workers: int = rule(2, ge=0)
    filters: ScanFilters = field(default_factory=ScanFilters)


@dataclass
class ConvertTask:
    _target_: str = "opensora.tasks.convert.run"
    component: Component = Component.model
    output: str = MISSING
    verify: bool = True


@dataclass
class BenchmarkTask:
    _target_: str = "opensora.tasks.benchmark.run"
    warmup_steps: int = rule(2, ge=0)
    steps: int = rule(5, ge=1)
    matmul_size: int = rule(2048, ge=16)
    matmul_repeats: int = rule(5, ge=1)
    results_file: str = rule(MISSING, path="parent")


# Data tools (opensora/data/scenes.py, motion.py, datautil.py): each reads csv_path, writes output_csv
# (null: beside the input, named as the original tools name their outputs).


@dataclass
class CsvToolTask:
    """What every data tool has: its input CSV, its output CSV, the folder of relative paths, worker processes."""

    csv_path: str = rule(MISSING, path="file")
    output_csv: Optional[str] = None
    video_folder: Optional[str] = rule(None, path="dir")
    num_workers: int = rule(2, ge=0)


@dataclass
class SceneDetectTask(CsvToolTask):
    _target_: str = "opensora.tasks.scene_detect.run"
    adaptive_threshold: float = rule(3.0, gt=0)
    min_scene_len: int = rule(15, ge=1)
    start_in_scene: bool = True


@dataclass
class SceneCutTask(CsvToolTask):
    _target_: str = "opensora.tasks.scene_cut.run"
    save_dir: Optional[str] = None
    min_seconds: Optional[float] = rule(None, gt=0)
    max_seconds: Optional[float] = rule(None, gt=0)
    target_fps: Optional[float] = rule(30, gt=0)
    shorter_size: Optional[int] = rule(720, ge=2, help="an even number of pixels")
    upscale: bool = True
    crf: int = rule(23, ge=0, le=51)


class MotionReference(StrEnum):
    previous = "previous"
    first = "first"


@dataclass
class CameraMotionTask(CsvToolTask):
    _target_: str = "opensora.tasks.camera_motion.run"
    frame_interval: int = rule(15, ge=1)
    tau_static: float = rule(1.0, ge=0)
    tau_zoom: list[float] = field(default_factory=lambda: [0.4, 0.6])
    reference: MotionReference = MotionReference.previous


@dataclass
class FlowScoreTask(CsvToolTask):
    _target_: str = "opensora.tasks.flow_score.run"
    frame_indices: list[int] = field(default_factory=lambda: [0, 10, 20, 30])
    size: list[int] = field(default_factory=lambda: [320, 576])


class InfoMode(StrEnum):
    missing = "missing"
    all = "all"
    none = "none"


@dataclass
class DatautilTask(CsvToolTask):
    _target_: str = "opensora.tasks.datautil.run"
    csv_path: Any = MISSING  # a CSV, a glob or a list of them
    difference: Optional[str] = rule(None, path="file")
    intersection: Optional[str] = rule(None, path="file")
    train_columns_only: bool = False
    info: InfoMode = InfoMode.missing
    check_decode: bool = False
    exists: bool = False
    remove_url: bool = False
    remove_empty_caption: bool = False
    remove_path_duplication: bool = False
    remove_text_duplication: bool = False
    refine_llm_caption: bool = False
    clean_caption: bool = False
    merge_cmotion: bool = False
    relpath: Optional[str] = None
    abspath: Optional[str] = None
    sort: Optional[str] = None
    sort_ascending: bool = False
    fmin: Optional[int] = None
    fmax: Optional[int] = None
    hwmin: Optional[int] = None
    hwmax: Optional[int] = None
    aesmin: Optional[float] = None
    matchmin: Optional[float] = None
    flowmin: Optional[float] = None
    shard: Optional[int] = rule(None, ge=1)


# Evaluation (opensora/tasks/eval_vae.py, eval_clip.py) and the data tools' CLIP scores (score_aesthetic.py,
# score_match.py); the CLIP is the root's `clip` section (conf/clip/).


@dataclass
class LpipsWeights:
    """LPIPS (AlexNet) is computed when both files are given."""

    alexnet_path: Optional[str] = rule(None, path="file", help="torchvision's alexnet-owt-7be5be79.pth")
    heads_path: Optional[str] = rule(None, path="file", help="the lpips package's weights/v0.1/alex.pth")
    batch_size: int = rule(16, ge=1)


@dataclass
class EvalVaeTask:
    _target_: str = "opensora.tasks.eval_vae.run"
    csv_path: str = rule(MISSING, path="file")
    video_folder: Optional[str] = rule(None, path="dir")
    num_frames: int = rule(16, ge=1)
    frame_interval: int = rule(1, ge=1)
    image_size: Any = 256
    sample_posterior: bool = False
    batch_size: int = rule(1, ge=1)
    num_workers: int = rule(2, ge=0)
    lpips: LpipsWeights = field(default_factory=LpipsWeights)


@dataclass
class EvalClipTask:
    _target_: str = "opensora.tasks.eval_clip.run"
    samples_dir: Optional[str] = rule(None, path="dir", help="a samples folder written by task=sample")
    csv_path: Optional[str] = rule(None, path="file")
    video_folder: Optional[str] = rule(None, path="dir")
    num_frames: Optional[int] = rule(None, ge=1, help="null: every frame")
    num_workers: int = rule(2, ge=0)


@dataclass
class ScoreAestheticTask(CsvToolTask):
    _target_: str = "opensora.tasks.score_aesthetic.run"
    head_path: str = rule(MISSING, path="file", help="the LAION aesthetic head, sac+logos+ava1-l14-linearMSE.pth")
    num_frames: int = rule(3, ge=1, le=3)
    batch_size: int = rule(16, ge=1)


@dataclass
class ScoreMatchTask(CsvToolTask):
    _target_: str = "opensora.tasks.score_match.run"
    batch_size: int = rule(16, ge=1)


TASKS = {"train": TrainTask, "eval_loss": EvalLossTask, "sample": SampleTask, "decode": DecodeTask, "embed_text": EmbedTextTask,
         "embed_video": EmbedVideoTask, "scan_videos": ScanVideosTask, "convert": ConvertTask,
         "benchmark": BenchmarkTask, "scene_detect": SceneDetectTask, "scene_cut": SceneCutTask,
         "camera_motion": CameraMotionTask, "flow_score": FlowScoreTask, "datautil": DatautilTask,
         "eval_vae": EvalVaeTask, "eval_clip": EvalClipTask, "score_aesthetic": ScoreAestheticTask,
         "score_match": ScoreMatchTask}


# ================================================================
# The root
# ================================================================


@dataclass
class RootConfig:
    """Top-level keys. Sections filled by config groups are `Any` here (their options type themselves)."""

    task: Any = MISSING
    model: Any = MISSING
    text_encoder: Any = None
    vae: Any = None
    scheduler: Any = None
    data: Any = None
    optim: Any = None
    precision: Optional[PrecisionConfig] = None
    device: DeviceConfig = field(default_factory=DeviceConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logger: Any = None
    clip: Any = None
    paths: PathsConfig = field(default_factory=PathsConfig)
    stage: Optional[StageConfig] = None
    seed: int = rule(42, ge=0)
    # A run directory (or one of its checkpoints/step_N folders) to continue; see opensora/config/resume.py.
    resume: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    # The metric a sweep optimises (set by an hparams_search option, with its direction): a key of the task's
    # returned metrics, e.g. eval/color_acc or train/final_loss_avg. null: the run returns no metric.
    optimized_metric: Optional[str] = None
    optimized_direction: Direction = Direction.minimize
