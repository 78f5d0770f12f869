"""Weights & Biases tracking: one run per job, always finished, offline by default."""
from __future__ import annotations

import logging
import os
from typing import Optional

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class NullLogger:
    """Tracking turned off (logger=none): every call is accepted and does nothing."""

    run_id: Optional[str] = None

    def log(self, metrics: dict, step: Optional[int] = None) -> None:
        pass

    def log_video(self, key: str, path: str, caption: str = "", step: Optional[int] = None, fps: int = 8) -> None:
        pass

    def log_image(self, key: str, path: str, caption: str = "", step: Optional[int] = None) -> None:
        pass

    def log_table(self, key: str, table, step: Optional[int] = None) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbLogger(NullLogger):
    """A W&B run holding the fully resolved config as a plain dict.

    `mode` is "offline" (default: files under <dir>/wandb, upload later with `wandb sync`),
    "online" (needs WANDB_API_KEY) or "disabled". `resume_id` continues an earlier run.
    """

    def __init__(self, project: str, entity: Optional[str] = None, group: Optional[str] = None,
                 name: Optional[str] = None, tags: Optional[list] = None, mode: str = "offline",
                 dir: str = ".", run_config: Optional[dict] = None, resume_id: Optional[str] = None,
                 if_unreachable: str = "fail", reach_timeout_s: float = 5.0):
        import wandb

        if if_unreachable not in ("fail", "offline"):
            raise ValueError(f"logger.if_unreachable={if_unreachable!r}: expected fail or offline")
        if mode == "online":
            problem = server_unreachable(float(reach_timeout_s))
            if problem and if_unreachable == "fail":
                raise ConnectionError(f"logger.mode=online but {problem}. Use logger.mode=offline (upload later with "
                                      "`wandb sync <run>/wandb/offline-run-*`), logger=none, or "
                                      "logger.if_unreachable=offline to fall back to offline mode")
            if problem:
                log.warning("%s: W&B falls back to offline mode (logger.if_unreachable=offline); upload later with "
                            "`wandb sync %s/wandb/offline-run-*`", problem, dir)
                mode = "offline"
        os.makedirs(dir, exist_ok=True)
        self._wandb = wandb
        self.run = wandb.init(
            project=project, entity=entity, group=group, name=name, tags=list(tags or []),
            mode=mode, dir=dir, config=run_config, id=resume_id, resume="allow" if resume_id else None,
            reinit="finish_previous",
        )
        self.run_id = self.run.id
        log.info("W&B run %s (%s mode) in %s", self.run_id, mode, dir)

    def log(self, metrics: dict, step: Optional[int] = None) -> None:
        self.run.log(metrics, step=step)

    def log_video(self, key: str, path: str, caption: str = "", step: Optional[int] = None, fps: int = 8) -> None:
        self.run.log({key: self._wandb.Video(path, caption=caption, format=os.path.splitext(path)[1][1:])}, step=step)

    def log_image(self, key: str, path: str, caption: str = "", step: Optional[int] = None) -> None:
        self.run.log({key: self._wandb.Image(path, caption=caption)}, step=step)

    def log_table(self, key: str, table, step: Optional[int] = None) -> None:
        """A pandas DataFrame as a W&B Table."""
        self.run.log({key: self._wandb.Table(dataframe=table)}, step=step)

    def summary(self, values: dict) -> None:
        for k, v in values.items():
            self.run.summary[k] = v

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


def server_unreachable(timeout_s: float) -> Optional[str]:
    """Why the W&B server (WANDB_BASE_URL, default https://api.wandb.ai) cannot be reached within `timeout_s`
    (a TCP connection to it), or None when it can. W&B's own client waits about 90 s before it gives up."""
    import socket
    from urllib.parse import urlparse

    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    parsed = urlparse(url)
    host, port = parsed.hostname or url, parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as e:
        return f"the W&B server {url} cannot be reached within {timeout_s:g} s ({type(e).__name__}: {e})"


def build_logger(cfg: DictConfig, resume_id: Optional[str] = None, rank: int = 0) -> NullLogger:
    """The configured logger on rank 0, a NullLogger elsewhere or when `logger` is null."""
    if cfg.get("logger") is None or rank != 0:
        return NullLogger()
    from hydra.utils import instantiate

    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    # Built as a partial and called, so the config dict is passed as data, not instantiated.
    return instantiate(cfg.logger, _partial_=True)(run_config=resolved, resume_id=resume_id)


def read_offline_run(path: str) -> dict:
    """Read back an offline W&B run file (`<run>/wandb/offline-run-*/run-<id>.wandb`) without syncing it.

    Returns {"history": [ {metric: value, "_step": n}, ...], "summary": {...}, "config": {...}}.
    The file is W&B's LevelDB-style log: a 7-byte header, then 32 KiB blocks of records
    (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last) holding protobuf `Record`s.
    """
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    block, pos, payloads, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a record header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            payloads.append(pending)
            pending = b""

    def items(updates):
        return {(u.key or "/".join(u.nested_key)): json.loads(u.value_json) for u in updates}

    out = {"history": [], "summary": {}, "config": {}}
    for payload in payloads:
        rec = pb.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            out["history"].append(items(rec.history.item))
        elif kind == "summary":
            out["summary"].update(items(rec.summary.update))
        elif kind == "config":
            out["config"].update(items(rec.config.update))
        elif kind == "run":
            out["config"].update(items(rec.run.config.update))
    return out
