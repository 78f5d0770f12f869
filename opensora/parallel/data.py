"""parallel=data: data parallel over the ranks msrun starts.

Every rank starts from rank 0's weights, trains on its own slice of each global batch and averages loss and
gradients with AllReduce inside the compiled step, so the result equals one process with the global batch.
Rank 0 writes checkpoints after checking that all ranks hold identical weights.
"""
from __future__ import annotations

from opensora.parallel.strategy import ReplicatedStrategy


class DataParallel(ReplicatedStrategy):
    """See the module docstring."""
