"""Compute dtypes: names used in configs, and a start-up check that the device has kernels for one.

Mixed precision in this project: parameters are fp32 master weights; the model casts them to its
compute dtype where a matmul uses them (`STDiT(dtype=...)`), and keeps LayerNorm, attention
scores/softmax, timestep and position embeddings and the diffusion loss in fp32.
"""
from __future__ import annotations

import logging

import mindspore as ms
import numpy as np

from opensora.utils.tensor_files import DTYPES, resolve_dtype  # noqa: F401 - the dtype table, re-exported

log = logging.getLogger(__name__)

_CHECKED: dict = {}


def _probe(dtype) -> None:
    """Run the kernels a low-precision train step needs (matmul, batched matmul, elementwise,
    reductions, casts) on a tiny input; raises whatever MindSpore raises for a missing kernel."""
    from mindspore import ops

    x = ms.Tensor(np.linspace(-1, 1, 16, dtype=np.float32).reshape(4, 4)).astype(dtype)
    y = ops.MatMul(transpose_b=True)(x, x)
    y = ops.BatchMatMul()(y[None], x[None])[0]
    y = ops.sigmoid(y) * ops.square(y) + x
    s = ops.cast(y.sum(), ms.float32)
    if not np.isfinite(s.asnumpy()):
        raise RuntimeError(f"a tiny {dtype} computation returned {s}")


def check_dtype_supported(name: str, device_target: str, setting: str = "precision.dtype") -> None:
    """Fail at start-up, naming the setting, when `device_target` lacks kernels for dtype `name`.

    The result is cached per (dtype, device), so the probe runs once per process.
    """
    dtype = resolve_dtype(name)
    if dtype == ms.float32:
        return
    key = (name, device_target)
    if key not in _CHECKED:
        try:
            _probe(dtype)
            _CHECKED[key] = None
        except (RuntimeError, TypeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            _CHECKED[key] = first
    if _CHECKED[key] is not None:
        raise RuntimeError(f"{setting}={name} is not supported on device_target={device_target}: MindSpore has no "
                           f"{name} kernels there ({_CHECKED[key]}); choose another dtype (fp32 runs everywhere, "
                           "fp16 also runs on CPU)")
    log.info("%s compute kernels are available on %s", name, device_target)
