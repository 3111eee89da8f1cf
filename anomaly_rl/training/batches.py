"""A seeded, resumable, endless stream of training batches.

Batch k is a pure function of (seed, k): the shuffle of epoch e depends only on (seed, e). A
resumed run sets `start_index` to the number of batches it had consumed, so "N steps" and
"N/2 + resume + N/2" see the same prompts in the same order — Lightning's own restart of a plain
DataLoader would begin the epoch again, and its prefetching makes an iterator's position an
unreliable thing to save.

Under data parallelism every process computes the same global batch k and keeps its own
positions of it (`shard`): the processes see disjoint prompts, together exactly the batch one
process would have seen, without any communication.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

import numpy as np

from anomaly_rl.data.records import Sample
from anomaly_rl.training.distributed import rank_prompt_positions

BatchT = TypeVar("BatchT")


class ResumableBatches(Generic[BatchT]):
    def __init__(
        self,
        samples: Sequence[Sample],
        batch_size: int,
        seed: int,
        collate: Callable[[list[Sample]], BatchT],
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(samples) < batch_size:
            raise ValueError(
                f"the training split has {len(samples)} samples, fewer than one batch of {batch_size}"
            )
        self.samples = list(samples)
        self.batch_size = batch_size
        self.seed = seed
        self.collate = collate
        self.start_index = 0
        # Positions of each global batch this process takes (None: all of them, one process).
        self.positions: list[int] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.samples) // self.batch_size

    def samples_at(self, index: int) -> list[Sample]:
        epoch, position = divmod(index, self.batches_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.samples))
        start = position * self.batch_size
        return [self.samples[i] for i in order[start : start + self.batch_size]]

    def shard(self, process: int, processes: int, mini_batches: int = 1) -> None:
        """Keep this process's prompts of every batch (see `distributed.rank_prompt_positions`)."""
        if processes == 1:
            self.positions = None
            return
        self.positions = rank_prompt_positions(self.batch_size, mini_batches, process, processes)

    def local_samples_at(self, index: int) -> list[Sample]:
        """This process's part of batch `index` (all of it with one process)."""
        batch = self.samples_at(index)
        return batch if self.positions is None else [batch[i] for i in self.positions]

    def __iter__(self) -> Iterator[BatchT]:
        index = self.start_index
        while True:
            yield self.collate(self.local_samples_at(index))
            index += 1
