"""Sequence parallelism for long videos: the frames of each video are split over a group of ranks.

    msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --log_dir=outputs/msrun --join=True \\
        run.py parallel=sequence [parallel.sequence_size=2]

Ranks form groups of `parallel.sequence_size` consecutive ranks (default: all ranks, one group). Every
rank of a group loads the same batch and draws the same timesteps and noise; rank r of the group keeps
the r-th of sp equal, consecutive slices of the latent video's frames and of the noise (sp: the group
size; with T frames after patching, frames [r * T/sp, (r + 1) * T/sp) - whole patches). Everything in STDiT that works per frame or per token then runs on those frames
alone: patch embedding, spatial attention (within a frame), cross-attention, MLP, final layer and
the per-element diffusion loss. Only the temporal attention (over all frames at one spatial position)
needs the other ranks' frames; its position embedding uses each local frame's global index. Two ways:

- `ulysses`: q, k, v of the local frames, all-to-all inside the group that re-splits them from
  frames to heads ([3, B*S, H, T/sp, D] -> [3, B*S, H/sp, T, D]), attention over all frames on H/sp
  heads, all-to-all back ([B*S, H/sp, T, D] -> [B*S, H, T/sp, D]). Needs num_heads divisible by sp.
  AlltoAll is native on Ascend; elsewhere (CPU has no AlltoAll) it is emulated with an AllGather
  and a slice, so the same data flow runs and is tested on CPU.
- `allgather`: the local queries attend to keys and values gathered from the whole group.

Gradients. Each rank's loss is the mean over its frames, and the frame shares are equal, so the
loss of the full videos is the mean of the group's local losses. The collectives' backward passes
(the gather: AllReduce-sum over the group then this rank's rows; AlltoAll: the reverse AlltoAll)
route to every rank the gradient of the *sum* of the group's losses with respect to its own frames,
so each rank's parameter gradient is its share of d(sum of local losses); summing over the group and
dividing by sp gives the gradient of the full-video loss. With data-parallel groups on top, the
gradient of the global batch is the mean over the groups of that, i.e. the mean of the parameter
gradients over all ranks - exactly the AllReduce-mean data parallelism already does.

Caption dropout is decided on the host for the global batch and sliced by data rank (the train task
passes the decisions to the model as `force_drop_ids`), so all ranks of a group drop the same captions.

CPU (MindSpore 2.10): collectives exist only on the world group and there is no AlltoAll or
ReduceScatter. The gather used here differentiates with AllReduce + slice instead of MindSpore's
ReduceScatter, and a group smaller than the world is emulated by gathering from all ranks and keeping
the group's rows. On Ascend the native group collectives and AlltoAll are used (on GPU native
AllGather groups, AlltoAll emulated); neither is tested here, which has no such device.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from mindspore.communication import GlobalComm

from opensora.model.layers import attention
from opensora.parallel.strategy import ReplicatedStrategy

log = logging.getLogger(__name__)

ATTENTION_KINDS = ("auto", "ulysses", "allgather")
TRAIN_TASK = "opensora.tasks.train.run"


# ================================================================
# Start-up checks and groups
# ================================================================


def resolve_attention(kind: str, device_target: str) -> str:
    """`parallel.sequence_attention` -> ulysses or allgather (auto: ulysses where AlltoAll is native)."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"parallel.sequence_attention={kind!r} is not one of: {', '.join(ATTENTION_KINDS)}")
    if kind == "auto":
        return "ulysses" if device_target == "Ascend" else "allgather"
    return kind


def check_sequence_parallel(cfg: Any, world_size: Optional[int]) -> int:
    """Fail before any process group exists, naming the settings, when parallel=sequence cannot work
    with this config and this launch; returns the sequence group size.

    world_size: the number of ranks msrun started, None when not started by msrun.
    """
    par = cfg.parallel
    if world_size is None:
        raise RuntimeError("parallel=sequence splits each video's frames over the processes msrun starts, e.g. "
                           "`msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --log_dir=outputs/msrun "
                           "--join=True run.py parallel=sequence`; this process was not started by msrun "
                           "(MS_ROLE is not set)")
    target = cfg.task.get("_target_")
    if target != TRAIN_TASK:
        raise ValueError(f"parallel=sequence is implemented for task=train only, but the task is {target}: "
                         "use parallel=single or parallel=data for it")
    size = par.get("sequence_size")
    size = world_size if size is None else size
    if not isinstance(size, int) or size < 1 or world_size % size:
        raise ValueError(f"parallel.sequence_size={par.get('sequence_size')} must divide the number of ranks msrun "
                         f"started (--worker_num={world_size}); the ranks form groups of sequence_size ranks, one "
                         "video split over each group")
    device = cfg.device.target
    kind = resolve_attention(par.get("sequence_attention", "auto"), device)
    frames, pt = int(cfg.model.input_size[0]), int(cfg.model.patch_size[0])
    if frames % pt == 0 and (frames // pt) % size:
        raise ValueError(f"parallel.sequence_size={size} does not divide the {frames // pt} frames after patching "
                         f"(model.input_size[0]={frames} latent frames from data.num_frames="
                         f"{cfg.data.get('num_frames')}, / model.patch_size[0]={pt}): every rank must hold as many "
                         "whole frames; change data.num_frames or parallel.sequence_size")
    heads = int(cfg.model.num_heads)
    if kind == "ulysses" and heads % size:
        raise ValueError(f"model.num_heads={heads} is not divisible by parallel.sequence_size={size}: Ulysses "
                         "attention (parallel.sequence_attention="
                         f"{par.get('sequence_attention', 'auto')} on {device}) gives each rank "
                         "num_heads / sequence_size heads; use parallel.sequence_attention=allgather or change one of them")
    return size


def init_sequence_groups(parallel: Any, rank: int, world: int):
    """The ParallelContext of parallel=sequence (after mindspore.communication.init); creates the group's
    communicator where groups other than the world exist (not CPU)."""
    from opensora.parallel import ParallelContext

    size = getattr(parallel, "sequence_size", None)
    size = world if size is None else int(size)
    if size < 1 or world % size:
        raise ValueError(f"parallel.sequence_size={size} must divide the {world} ranks")
    ctx = ParallelContext("sequence", rank, world, size)
    device = ms.get_context("device_target")
    if 1 < size < world and device != "CPU":
        from mindspore.communication import create_group

        create_group(group_name(ctx), list(range(ctx.data_rank * size, (ctx.data_rank + 1) * size)))
    kind = resolve_attention(getattr(parallel, "sequence_attention", None) or "auto", device)
    log.info("sequence parallel: rank %d of %d, position %d in sequence group %d of %d (%d ranks share each "
             "video's frames), %s temporal attention", rank, world, ctx.sequence_rank, ctx.data_rank,
             ctx.data_size, size, kind)
    if device == "CPU" and 1 < size < world:
        log.info("CPU collectives exist only on the world group: each sequence group's collectives gather from "
                 "all %d ranks and keep the group's part", world)
    return ctx


def group_name(ctx) -> str:
    """The communication group of this rank's sequence group (the world group when it is the world)."""
    if ctx.sequence_size == ctx.world_size:
        return GlobalComm.WORLD_COMM_GROUP
    return f"sequence_{ctx.data_rank}"


# ================================================================
# Frames of this rank
# ================================================================


def frame_range(num_frames: int, size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of the frames rank `rank` of a group of `size` holds out of `num_frames`."""
    if num_frames % size:
        raise ValueError(f"{num_frames} frames cannot be split evenly over {size} ranks")
    per = num_frames // size
    return rank * per, (rank + 1) * per


def frame_shard(video: np.ndarray, ctx, axis: int = 2) -> np.ndarray:
    """This rank's frames of a [B, C, T, H, W] video (or its noise) under parallel=sequence; the whole
    array otherwise. Frame shares are whole patches when T/patch_t is divisible by the group size."""
    if ctx.sequence_size == 1:
        return video
    start, stop = frame_range(video.shape[axis], ctx.sequence_size, ctx.sequence_rank)
    index = [slice(None)] * video.ndim
    index[axis] = slice(start, stop)
    return np.ascontiguousarray(video[tuple(index)])


# ================================================================
# Collectives of a sequence group (graph-mode cells)
# ================================================================


def alltoall_from_gathered(gathered, size: int, rank: int, split_dim: int, concat_dim: int):
    """What all-to-all delivers to `rank`, computed from `gathered`, the group's inputs concatenated
    along axis 0 in rank order: from each rank's input, part `rank` of `size` along `split_dim`,
    these parts concatenated along `concat_dim` in rank order (graph-mode safe)."""
    n = gathered.shape[0] // size
    parts = []
    for src in range(size):
        sent = gathered[src * n:(src + 1) * n]  # rank src's whole input
        step = sent.shape[split_dim] // size
        parts.append(ops.narrow(sent, split_dim, rank * step, step))  # the part rank src sends to `rank`
    return ops.concat(parts, axis=concat_dim)


class AllGatherSumBackward(nn.Cell):
    """AllGather along axis 0 over a sequence group, whose backward sums the gradient over the group
    (AllReduce) and keeps this rank's rows - MindSpore's own AllGather backward is a ReduceScatter,
    which CPU lacks. CPU collectives only know the world group, so a group smaller than the world
    gathers from every rank and keeps the group's rows (and sums only the group's gradients)."""

    def __init__(self, size: int, rank: int, first: int, world: int):
        super().__init__()
        self.size, self.rank, self.first, self.world = size, rank, first, world
        self.subgroup = size < world
        self.all_gather = ops.AllGather(GlobalComm.WORLD_COMM_GROUP)
        self.all_reduce = ops.AllReduce(group=GlobalComm.WORLD_COMM_GROUP)

    def construct(self, x):
        out = self.all_gather(x)  # [world * n, ...]
        if self.subgroup:
            n = x.shape[0]
            out = out[self.first * n:(self.first + self.size) * n]  # [size * n, ...]
        return out

    def bprop(self, x, out, dout):
        n = x.shape[0]
        if self.subgroup:
            every = self.all_gather(dout).reshape((self.world,) + dout.shape)  # every rank's dout
            total = every[self.first:self.first + self.size].sum(axis=0)
        else:
            total = self.all_reduce(dout)  # [size * n, ...] summed over the group
        return (total[self.rank * n:(self.rank + 1) * n],)


class ConcatGathered(nn.Cell):
    """Each rank's x [.., n, ..] -> the group's x's concatenated along `axis` in rank order."""

    def __init__(self, gather: nn.Cell, size: int, axis: int):
        super().__init__()
        self.gather, self.size, self.axis = gather, size, axis

    def construct(self, x):
        g = self.gather(x)  # [size * d0, ...]
        d0 = x.shape[0]
        return ops.concat([g[i * d0:(i + 1) * d0] for i in range(self.size)], axis=self.axis)


class NativeAllToAll(nn.Cell):
    """ops.AlltoAll over the group (Ascend): split `split_dim` in `size` parts, part j to rank j,
    received parts concatenated along `concat_dim` in rank order."""

    def __init__(self, size: int, split_dim: int, concat_dim: int, group: str):
        super().__init__()
        self.op = ops.AlltoAll(split_count=size, split_dim=split_dim, concat_dim=concat_dim, group=group)

    def construct(self, x):
        return self.op(x)


class GatheredAllToAll(nn.Cell):
    """The same all-to-all emulated by an AllGather and a slice (devices without AlltoAll): every
    rank gathers the group's inputs and keeps its own part of each; the backward pass of the gather
    brings each part's gradient back to the rank it came from."""

    def __init__(self, gather: nn.Cell, size: int, rank: int, split_dim: int, concat_dim: int):
        super().__init__()
        self.gather, self.size, self.rank = gather, size, rank
        self.split_dim, self.concat_dim = split_dim, concat_dim

    def construct(self, x):
        return alltoall_from_gathered(self.gather(x), self.size, self.rank, self.split_dim, self.concat_dim)


class UlyssesAttention(nn.Cell):
    """Temporal self-attention over all frames of a group whose ranks each hold T/sp frames:
    all-to-all frames -> heads, attention on H/sp heads, all-to-all back. Same parameters
    (qkv, proj) and maths as opensora.model.stdit.Attention over the whole sequence.
    to_heads / to_frames: all-to-all cells over (split_dim, concat_dim) = TO_HEADS / TO_FRAMES."""

    TO_HEADS = (2, 3)  # [3, B*S, H, T/sp, D]: split heads, concatenate frames
    TO_FRAMES = (2, 1)  # [B*S, H/sp, T, D]: split frames, concatenate heads

    def __init__(self, attn, to_heads: nn.Cell, to_frames: nn.Cell):
        super().__init__()
        self.qkv, self.proj = attn.qkv, attn.proj
        self.num_heads, self.head_dim, self.scale, self.use_flash = \
            attn.num_heads, attn.head_dim, attn.scale, attn.use_flash
        self.to_heads, self.to_frames = to_heads, to_frames

    def construct(self, x):
        Bs, Tl, C = x.shape  # [B*S, T/sp, C]
        qkv = self.qkv(x).reshape(Bs, Tl, 3, self.num_heads, self.head_dim)
        qkv = qkv.transpose(2, 0, 3, 1, 4)  # [B*S, T/sp, 3C] -> [3, B*S, H, T/sp, D]
        qkv = self.to_heads(qkv)  # [3, B*S, H, T/sp, D] -> [3, B*S, H/sp, T, D]
        out = attention(qkv[0], qkv[1], qkv[2], self.scale, self.use_flash)  # [B*S, H/sp, T, D]
        out = self.to_frames(out)  # [B*S, H/sp, T, D] -> [B*S, H, T/sp, D]
        out = out.transpose(0, 2, 1, 3).reshape(Bs, Tl, C)  # [B*S, T/sp, C]
        return self.proj(out)


class GatherKVAttention(nn.Cell):
    """Temporal self-attention over all frames of a group whose ranks each hold T/sp frames: the
    local frames' queries attend to keys and values gathered from the whole group."""

    def __init__(self, attn, gather_frames: nn.Cell):
        super().__init__()
        self.qkv, self.proj = attn.qkv, attn.proj
        self.num_heads, self.head_dim, self.scale, self.use_flash = \
            attn.num_heads, attn.head_dim, attn.scale, attn.use_flash
        self.gather_frames = gather_frames

    def construct(self, x):
        Bs, Tl, C = x.shape  # [B*S, T/sp, C]
        qkv = self.qkv(x).reshape(Bs, Tl, 3, self.num_heads, self.head_dim)
        qkv = qkv.transpose(2, 0, 3, 1, 4)  # [B*S, T/sp, 3C] -> [3, B*S, H, T/sp, D]
        kv = self.gather_frames(qkv[1:])  # [2, B*S, H, T/sp, D] -> [2, B*S, H, T, D]
        out = attention(qkv[0], kv[0], kv[1], self.scale, self.use_flash)  # [B*S, H, T/sp, D]
        out = out.transpose(0, 2, 1, 3).reshape(Bs, Tl, C)
        return self.proj(out)



def make_gather(ctx, device_target: str):
    """AllGather along axis 0 over this rank's sequence group, differentiable on every device."""
    if device_target == "CPU":
        return AllGatherSumBackward(ctx.sequence_size, ctx.sequence_rank, ctx.data_rank * ctx.sequence_size,
                                    ctx.world_size)
    return ops.AllGather(group_name(ctx))  # backward: ReduceScatter (sum) over the group


def make_alltoall(ctx, device_target: str, split_dim: int, concat_dim: int):
    """All-to-all over this rank's sequence group: native on Ascend, else AllGather + slice."""
    if device_target == "Ascend":
        return NativeAllToAll(ctx.sequence_size, split_dim, concat_dim, group_name(ctx))
    return GatheredAllToAll(make_gather(ctx, device_target), ctx.sequence_size, ctx.sequence_rank,
                            split_dim, concat_dim)


def temporal_attention_cell(attn, kind: str, ctx, device_target: str):
    """The sequence-parallel replacement of one block's temporal Attention (same parameters)."""
    if kind == "ulysses":
        return UlyssesAttention(attn, make_alltoall(ctx, device_target, *UlyssesAttention.TO_HEADS),
                                make_alltoall(ctx, device_target, *UlyssesAttention.TO_FRAMES))
    if kind == "allgather":
        return GatherKVAttention(attn, ConcatGathered(make_gather(ctx, device_target), ctx.sequence_size, axis=3))
    raise ValueError(f"temporal attention kind {kind!r} is not one of: ulysses, allgather")


_ALLTOALL_LOGGED = False


def apply_sequence_parallel(model, ctx, attention_kind: str = "auto") -> str:
    """Make `model` (an STDiT) run on this rank's frames of each video: the temporal position embedding
    keeps those frames' rows and every block's temporal attention exchanges frames within the sequence
    group. Parameters (and their names) are unchanged. Returns the attention kind used (`none` for a
    group of one rank)."""
    global _ALLTOALL_LOGGED
    size = ctx.sequence_size
    if size == 1:
        log.info("parallel.sequence_size=1: every rank holds whole videos (plain data parallelism)")
        return "none"
    device = ms.get_context("device_target")
    kind = resolve_attention(attention_kind, device)
    if model.num_temporal % size:
        raise ValueError(f"parallel.sequence_size={size} does not divide the model's {model.num_temporal} frames "
                         "after patching")
    if kind == "ulysses" and model.num_heads % size:
        raise ValueError(f"model.num_heads={model.num_heads} is not divisible by parallel.sequence_size={size} "
                         "(Ulysses attention); use parallel.sequence_attention=allgather")
    if kind == "ulysses" and device != "Ascend" and not _ALLTOALL_LOGGED:
        log.warning("sequence_attention=ulysses on %s: AlltoAll is Ascend-only, emulated with AllGather + slice "
                    "(same result, sequence_size x the traffic)", device)
        _ALLTOALL_LOGGED = True
    start, stop = frame_range(model.num_temporal, size, ctx.sequence_rank)
    model.pos_embed_temporal = ms.Tensor(model.pos_embed_temporal.asnumpy()[:, start:stop])  # [1, T/sp, C]
    names = {id(p): p.name for p in model.get_parameters()}
    for i, block in enumerate(model.blocks):
        cell = temporal_attention_cell(block.attn_temp, kind, ctx, device)
        block.attn_temp = cell
        if i < model.recompute_blocks:  # the block was marked before this cell existed
            cell.recompute()
    for p in model.get_parameters():  # nesting the moved layers renamed their parameters
        p.name = names[id(p)]
    log.info("sequence parallel: this rank holds frames [%d, %d) of %d (after patching), %s temporal attention",
             start, stop, model.num_temporal, kind)
    return kind


# ================================================================
# The strategy
# ================================================================


class SequenceParallel(ReplicatedStrategy):
    """parallel=sequence: each video's frames split over groups of `sequence_size` ranks (see the module
    docstring); gradients averaged over all ranks like data parallelism."""

    def prepare_model(self, model) -> None:
        apply_sequence_parallel(model, self.ctx, self.sequence_attention)
        super().prepare_model(model)

    def frames(self, video):
        return frame_shard(video, self.ctx)
