"""A resumable batch loader over a map-style dataset returning (video, caption)."""
from __future__ import annotations

from typing import Iterator

import numpy as np


class BatchLoader:
    """Shuffled, seeded batches; `state()` / `load_state()` make resume exact.

    Epoch e visits the dataset in the order of `default_rng(seed + e).permutation(len)`;
    the state is (epoch, position in that order), so a resumed run continues with the very next
    sample, neither repeating nor skipping any. Incomplete final batches are dropped.
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = True):
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if len(dataset) < batch_size:
            raise ValueError(f"the dataset has {len(dataset)} samples, fewer than data.batch_size={batch_size}")
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.drop_last = drop_last
        self.epoch, self.position = 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.dataset)
        return np.random.default_rng(self.seed + epoch).permutation(n) if self.shuffle else np.arange(n)

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self) -> Iterator[tuple[np.ndarray, list[str]]]:
        while True:
            order = self._order(self.epoch)
            while self.position + self.batch_size <= len(order):
                idx = order[self.position:self.position + self.batch_size]
                self.position += self.batch_size
                items = [self.dataset[int(i)] for i in idx]
                yield np.stack([v for v, _ in items]).astype(np.float32), [c for _, c in items]
            self.epoch, self.position = self.epoch + 1, 0
