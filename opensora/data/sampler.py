"""The batch sampler of bucketed training (Open-Sora 1.1's VariableVideoBatchSampler, SPEC-1.1 §1.4).

Per epoch e (`BucketSampler.plan`):
1. every row's bucket by the rule of opensora/data/bucket.py, drawn for (seed, e);
2. each bucket's rows shuffled (default_rng([seed, e, 1])) and cut into micro-batches of its batch size; the rows
   left over (fewer than a batch) are dropped for the epoch;
3. the micro-batches shuffled (same generator) into the access order, cut to a multiple of the slots of a step
   (`slots` = data-parallel ranks x micro-batches per rank and step), the rest dropped;
4. step i takes the slots [i * slots, (i + 1) * slots); rank r trains slots [r * A, (r + 1) * A) of it (A
   micro-batches per rank, accumulated). Within a micro-batch every sample has the same shape; ranks (and the
   micro-batches of one rank) may train different shapes in one step.
So every rank computes the same plan and all ranks together see each planned sample once per epoch.

Resume: the position (epoch, step within it) is in every checkpoint with the plan's fingerprint (the table's
rows and sizes and the settings above), so a resume continues with the very next step. When the CSV (or the
bucket settings, or the number of slots) changed since, the epoch cannot continue as planned (v1.1.0 crashes
with an IndexError or silently retrains rows): the old plan is rebuilt from the snapshot the run directory keeps
of the table it trained on (`<run>/data/plan-<fingerprint>.npz`), the rows it already trained this epoch are
identified by content (path and caption), and the epoch is re-planned over the rest of the new table, with one
log line saying so; later epochs use the whole new table.

Deliberate differences from v1.1.0: a bucket's remainder is dropped after shuffling (the original drops the
same last rows of the CSV every epoch, before shuffling); buckets are processed in bucket order (resolution,
frames, aspect ratio), not in the order the CSV first reaches them; shuffles come from numpy, not torch.randperm
(so the original's exact sample order is not reproduced, only its rule); incomplete micro-batches are always
dropped (its train script's drop_last=True).
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from opensora.data.bucket import DROP_REASONS, Bucket

log = logging.getLogger(__name__)


# ================================================================
# The table a plan is built from
# ================================================================


@dataclass
class SizeTable:
    """What planning needs of each CSV row: a content key (hash of path and caption), frames, height, width."""

    keys: np.ndarray  # uint64 [n]
    num_frames: np.ndarray  # float64 [n] (NaN: unknown)
    height: np.ndarray
    width: np.ndarray

    @classmethod
    def from_frame(cls, df: pd.DataFrame) -> "SizeTable":
        """From a table with video, caption, num_frames, height, width columns (values that are not numbers ->
        NaN: the row is dropped as size_unknown)."""
        keys = pd.util.hash_pandas_object(df[["video", "caption"]].astype(str), index=False).to_numpy(np.uint64)
        num = {c: pd.to_numeric(df[c], errors="coerce").to_numpy(np.float64) for c in ("num_frames", "height", "width")}
        return cls(keys, num["num_frames"], num["height"], num["width"])

    def __len__(self) -> int:
        return len(self.keys)

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for a in (self.keys, self.num_frames, self.height, self.width):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]

    def save(self, path: Path, settings: dict) -> None:
        from opensora.utils.tensor_files import atomic_savez

        atomic_savez(path, keys=self.keys, num_frames=self.num_frames, height=self.height, width=self.width,
                     settings=np.array(json.dumps(settings, sort_keys=True)))

    @classmethod
    def load(cls, path: Path) -> tuple["SizeTable", dict]:
        with np.load(path) as f:
            return cls(f["keys"], f["num_frames"], f["height"], f["width"]), json.loads(str(f["settings"]))


# ================================================================
# Plans
# ================================================================


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch: its bucket (resolution, t, ar), rows (CSV indices) and spare rows of the same bucket (in
    the order to use them in place of bad samples)."""

    bucket: tuple
    rows: np.ndarray
    spares: np.ndarray


@dataclass
class EpochPlan:
    """The steps of one epoch: steps[i] = the micro-batches of its slots, in slot order."""

    epoch: int
    steps: list
    assigned: Counter  # bucket -> rows assigned to it this epoch
    dropped: Counter  # reason -> rows
    rows: int  # rows considered (not excluded)
    excluded: int = 0  # rows left out because they were already trained this epoch (a re-planned epoch)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def trained(self) -> Counter:
        c: Counter = Counter()
        for step in self.steps:
            for mb in step:
                c[mb.bucket] += len(mb.rows)
        return c

    def rows_in(self, steps) -> np.ndarray:
        """CSV rows of the given steps' micro-batches."""
        parts = [mb.rows for step in steps for mb in step]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def plan_settings(bucket: Bucket, frame_interval: int, seed: int, slots: int, seeding: str) -> dict:
    from opensora.data.aspect import ASPECT_RATIOS

    own = {r: {"pixels": p, "ratios": {k: list(v) for k, v in t.items()}} for r, (p, t) in bucket.tables.items()
           if r not in ASPECT_RATIOS and r in bucket.config}
    return {"bucket_config": {r: {str(t): list(v) for t, v in bucket.config[r].items()} for r in bucket.resolutions},
            "resolutions": own, "frame_interval": int(frame_interval), "seed": int(seed), "slots": int(slots),
            "seeding": str(seeding)}


class BucketSampler:
    """Plans the epochs of a table under a bucket config (see the module docstring).

    `slots`: micro-batches per step over all ranks (data-parallel ranks x micro-batches per rank). `spares`:
    how many other rows of its bucket each micro-batch carries to replace bad samples."""

    def __init__(self, bucket: Bucket, table: SizeTable, frame_interval: int, seed: int, slots: int = 1,
                 seeding: str = "independent", spares: int = 10):
        if slots < 1:
            raise ValueError(f"slots per step must be >= 1, got {slots}")
        self.bucket, self.table = bucket, table
        self.frame_interval, self.seed, self.slots, self.seeding = int(frame_interval), int(seed), int(slots), seeding
        self.spares = int(spares)
        self.settings = plan_settings(bucket, frame_interval, seed, slots, seeding)
        h = hashlib.sha1((table.fingerprint() + json.dumps(self.settings, sort_keys=True)).encode())
        self.fingerprint = h.hexdigest()[:16]
        self._cache: dict = {}

    def plan(self, epoch: int, exclude: Optional[np.ndarray] = None) -> EpochPlan:
        """The plan of `epoch`; rows whose key is in `exclude` (uint64 keys) are left out."""
        key = (int(epoch), None if exclude is None else hashlib.sha1(np.sort(exclude).tobytes()).hexdigest())
        if key not in self._cache:
            self._cache = {key: self._plan(int(epoch), exclude)}  # one epoch at a time
        return self._cache[key]

    def _plan(self, epoch: int, exclude: Optional[np.ndarray]) -> EpochPlan:
        t = self.table
        rows = np.arange(len(t))
        excluded = 0
        if exclude is not None and len(exclude):
            keep = ~np.isin(t.keys, exclude)
            excluded = int((~keep).sum())
            rows = rows[keep]
        ids, reason = self.bucket.assign(t.num_frames[rows], t.height[rows], t.width[rows], self.frame_interval,
                                         self.seed, epoch, self.seeding, rows=rows)
        dropped = Counter(r for r in reason if r)
        rng = np.random.default_rng([self.seed, epoch, 1])
        micro: list[MicroBatch] = []
        assigned: Counter = Counter()
        shuffled = {}
        for b in np.unique(ids[ids >= 0]):  # bucket order
            members = rows[ids == b]
            shuffled[int(b)] = members[rng.permutation(len(members))]
        for b, members in shuffled.items():
            bucket = self.bucket.buckets[b]
            assigned[bucket] = len(members)
            bs = int(self.bucket.batch_size(bucket))
            n = len(members) // bs
            dropped["batch_remainder"] += len(members) - n * bs
            # spares: the bucket's other rows, then rows of other buckets with as many frames (loaded at this
            # bucket's size), so a bad sample alone in its bucket still has a stand-in
            same_t = [m for c, m in shuffled.items() if c != b and self.bucket.buckets[c][1] == bucket[1]]
            for j in range(n):
                spare = self._spares([members[(j + 1) * bs:], members[:j * bs], *same_t])
                micro.append(MicroBatch(bucket, members[j * bs:(j + 1) * bs],
                                        spare if len(spare) else members[j * bs:(j + 1) * bs]))
        order = rng.permutation(len(micro))
        num_steps = len(micro) // self.slots
        for i in order[num_steps * self.slots:]:
            dropped["step_remainder"] += len(micro[i].rows)
        steps = [[micro[i] for i in order[s * self.slots:(s + 1) * self.slots]] for s in range(num_steps)]
        return EpochPlan(epoch, steps, assigned, dropped, len(rows), excluded)


    def _spares(self, pools) -> np.ndarray:
        """The first `spares` rows of the pools, in order."""
        out, need = [], self.spares
        for pool in pools:
            if need <= 0:
                break
            out.append(pool[:need])
            need -= len(out[-1])
        return np.concatenate(out) if out else np.zeros(0, np.int64)


# ================================================================
# Position, resume and re-planning
# ================================================================


@dataclass
class Position:
    """Where the sampler is: `epoch`, steps done in it, the plan they came from and the rows that plan left out
    (keys of rows trained earlier in the epoch, before a re-plan)."""

    epoch: int = 0
    step: int = 0
    plan: Optional[str] = None
    exclude: Optional[np.ndarray] = field(default=None, repr=False)
    excluded: Optional[str] = None  # the record of `exclude` (PlanRecords.load_excluded)


class PlanRecords:
    """The run directory's record of the tables it planned from (`data/plan-<fingerprint>.npz`) and of the rows a
    re-planned epoch left out (`data/excluded-<hash>.npy`); only rank 0 writes."""

    def __init__(self, folder: Optional[Path], write: bool = True):
        self.folder = None if folder is None else Path(folder)
        self.write = write

    def plan_file(self, fingerprint: str) -> Optional[Path]:
        return None if self.folder is None else self.folder / f"plan-{fingerprint}.npz"

    def keep(self, sampler: BucketSampler) -> None:
        path = self.plan_file(sampler.fingerprint)
        if path is not None and self.write and not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            sampler.table.save(path, sampler.settings)

    def excluded_name(self, keys: np.ndarray) -> str:
        return hashlib.sha1(np.sort(keys).tobytes()).hexdigest()[:16]

    def save_excluded(self, keys: np.ndarray) -> str:
        name = self.excluded_name(keys)
        if self.folder is not None and self.write:
            from opensora.utils.tensor_files import atomic_write

            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(self.folder / f"excluded-{name}.npy", lambda tmp: np.save(tmp, np.sort(keys)))
        return name

    def load_excluded(self, name: str) -> np.ndarray:
        path = None if self.folder is None else self.folder / f"excluded-{name}.npy"
        if path is None or not path.is_file():
            raise FileNotFoundError(f"{path}: the rows an earlier re-plan left out of this epoch are not recorded")
        return np.load(path)

    def old_sampler(self, fingerprint: str, like: BucketSampler) -> Optional[BucketSampler]:
        """The sampler a checkpoint's plan came from, rebuilt from its record (None when not recorded)."""
        path = self.plan_file(fingerprint)
        if path is None or not path.is_file():
            return None
        table, s = SizeTable.load(path)
        return BucketSampler(Bucket(s["bucket_config"], resolutions=s.get("resolutions")), table, s["frame_interval"], s["seed"], s["slots"],
                             s["seeding"], like.spares)


def resume_position(sampler: BucketSampler, saved: dict, records: PlanRecords) -> tuple[Position, Optional[str]]:
    """The position to continue from, given a checkpoint's data state; and a log line when the epoch had to be
    re-planned (None when the resume is exact)."""
    epoch, step = int(saved.get("epoch", 0)), int(saved.get("step", saved.get("position", 0)))
    old_fp, old_ex = saved.get("plan"), saved.get("excluded")
    exclude = records.load_excluded(old_ex) if old_ex else None
    if old_fp == sampler.fingerprint:
        return Position(epoch, step, old_fp, exclude, old_ex), None
    old = records.old_sampler(old_fp, sampler) if old_fp else None
    if old is None:
        return Position(epoch + 1, 0, sampler.fingerprint), (
            f"data: the table or the bucket settings changed since the checkpoint, and the run directory has no "
            f"record of the plan it trained epoch {epoch} with ({records.plan_file(old_fp or '?')}); the rest of "
            f"epoch {epoch} is skipped and epoch {epoch + 1} starts with the new table")
    old_plan = old.plan(epoch, exclude)
    done = old.table.keys[old_plan.rows_in(old_plan.steps[:step])]
    trained = np.unique(np.concatenate([done, exclude])) if exclude is not None else np.unique(done)
    new_keys = set(sampler.table.keys.tolist())
    old_keys = set(old.table.keys.tolist())
    changes = [f"rows {len(old.table)} -> {len(sampler.table)} ({len(new_keys - old_keys)} new, "
               f"{len(old_keys - new_keys)} gone)"] if old.table.fingerprint() != sampler.table.fingerprint() else []
    changes += [f"{k} {old.settings[k]} -> {v}" for k, v in sampler.settings.items() if old.settings.get(k) != v]
    name = records.save_excluded(trained)
    plan = sampler.plan(epoch, trained)
    message = (f"data: {'; '.join(changes) or 'sizes of some rows'} since the checkpoint (epoch {epoch}, step {step} "
               f"of {old_plan.num_steps}): epoch {epoch} is re-planned over the {plan.rows} rows not trained yet this "
               f"epoch ({plan.excluded} already trained are left out): {plan.num_steps} more steps, then whole "
               "epochs of the new table")
    return Position(epoch, 0, sampler.fingerprint, trained, name), message


# ================================================================
# The report
# ================================================================


def report(sampler: BucketSampler, plan: EpochPlan, ranks: int, per_rank: int) -> tuple[str, list[list]]:
    """(text for the log, table rows for W&B) of a plan: samples per bucket, micro-batches and steps per epoch,
    every dropped row counted by reason."""
    b = sampler.bucket
    trained = plan.trained()
    lines = [f"buckets: {b.num_buckets} (resolution x frames x aspect ratio) from data.bucket_config, "
             f"{len(b.enabled())} (resolution, frames) pairs enabled; {len(sampler.table)} rows in the CSV"
             + (f", {plan.excluded} already trained this epoch" if plan.excluded else "")]
    rows = []
    header = f"  {'resolution':>10} {'frames':>6} {'ar':>5} {'HxW':>10} {'batch':>5} {'samples':>8} {'trained':>8}"
    lines.append(header)
    for bucket in sorted(plan.assigned, key=b.index.get):
        t, h, w = b.get_thw(bucket)
        bs = b.batch_size(bucket)
        lines.append(f"  {bucket[0]:>10} {t:>6} {bucket[2]:>5} {f'{h}x{w}':>10} {bs:>5} {plan.assigned[bucket]:>8} "
                     f"{trained[bucket]:>8}")
        rows.append([bucket[0], t, bucket[2], h, w, bs, plan.assigned[bucket], trained[bucket]])
    by_pair: Counter = Counter()
    for bucket, n in plan.assigned.items():
        by_pair[(bucket[0], bucket[1])] += n
    if by_pair:
        lines.append("  by resolution x frames: " + ", ".join(f"{r}x{t}: {n}" for (r, t), n in
                                                              sorted(by_pair.items(), key=lambda kv: b.pair_id[kv[0]])))
    total = sum(trained.values())
    lines.append(f"epoch {plan.epoch}: {total} of {plan.rows} rows trained in {plan.num_steps} steps "
                 f"({ranks} rank{'s' if ranks > 1 else ''} x {per_rank} micro-batch{'es' if per_rank > 1 else ''} "
                 f"per step)")
    reasons = dict(DROP_REASONS, batch_remainder="left over after the bucket's last whole micro-batch",
                   step_remainder="in micro-batches beyond a whole number of steps")
    dropped = [f"{plan.dropped[k]} {k} ({reasons[k]})" for k in reasons if plan.dropped.get(k)]
    lines.append("dropped this epoch: " + ("; ".join(dropped) if dropped else "none"))
    return "\n".join(lines), rows


def empty_plan_message(sampler: BucketSampler, plan: EpochPlan, ranks: int, per_rank: int) -> str:
    """Why an epoch has no step, for the error that stops the run."""
    text, _ = report(sampler, plan, ranks, per_rank)
    need = f"{sampler.slots} micro-batches per step ({ranks} rank(s) x {per_rank})"
    return (f"the bucket plan of epoch {plan.epoch} has no step: {sum(plan.assigned.values())} of {plan.rows} rows "
            f"got a bucket, fewer than {need} of whole micro-batches. Report:\n{text}\nAdd clips, lower batch "
            "sizes or raise keep probabilities in data.bucket_config, or check the CSV's num_frames/height/width "
            "(task=scan_videos measures them)")
