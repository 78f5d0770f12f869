"""Configuration: typed sections (schema.py), resolvers (resolvers.py), the validation pass (validate.py), runs
rebuilt from their directory (resume.py) and the Hydra callback that runs both before a run starts (callback.py)."""
from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from opensora.config.resolvers import RESOLVERS, hf_config_value, launch_time, latent_size, sweep_name
from opensora.config.schema import (TASKS, DeviceConfig, ParallelConfig, PathsConfig, PrecisionConfig, RootConfig,
                                    StageConfig)
from opensora.config.validate import ConfigError, validate


def register_configs() -> None:
    """Register the schemas and resolvers (idempotent). Called by run.py and the tests."""
    cs = ConfigStore.instance()
    cs.store(name="root_schema", node=RootConfig)
    cs.store(group="schema", name="precision", node=PrecisionConfig)
    cs.store(group="schema", name="parallel", node=ParallelConfig)
    cs.store(group="schema", name="device", node=DeviceConfig)
    for name, node in TASKS.items():
        cs.store(group="schema/task", name=name, node=node)
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


__all__ = ["ConfigError", "DeviceConfig", "ParallelConfig", "PathsConfig", "PrecisionConfig", "RootConfig",
           "StageConfig", "hf_config_value", "launch_time", "latent_size", "register_configs", "sweep_name",
           "validate"]
