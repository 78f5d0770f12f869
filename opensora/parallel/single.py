"""parallel=single: one process on one device (the base behaviour of opensora.parallel.strategy)."""
from __future__ import annotations

from opensora.parallel.strategy import ParallelStrategy


class SingleProcess(ParallelStrategy):
    """One process: nothing to share, average or gather."""
