"""Training batches as a plan: which rows, padded to which length, per step.

Every batch of every epoch is a pure function of the rows' token lengths,
the batch size, the length step and (seed, epoch). So every host of a pod
computes the same plan and feeds its own rows of each global batch, a run
resumed at step k feeds exactly the batches an uninterrupted run feeds from
step k, and nothing depends on what ran before in the process.

Rows of similar length train together: each row goes to the bucket of its
length rounded up to `length_step`; a bucket emits a batch whenever it holds
`batch_size` rows, in a seeded random order. The rows left in partly filled
buckets at the end of an epoch are batched together (padded to the longest
of them), the last such batch filled with zero-weight rows, so every row
trains once per epoch and every epoch has the same number of steps.

Example:
```python
rows, _ = formatter.encode(df)  # EncodedRows, responses cut
batches = TrainingBatches(rows, batch_size=8, sequence_length=512, length_step=64, seed=0)
for batch in batches.epoch(0):
    x, y, sample_weight = rows.arrays(batch)  # numpy, the whole global batch
```
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Batch:
    rows: tuple  # row indices; -1 is a zero-weight filler row
    length: int  # positions the model sees (a multiple of the length step, or sequence_length)


@dataclasses.dataclass
class EncodedRows:
    """`<bos> prompt response <eos>` token ids of each row, and where its
    response starts; the sample weight is 1 on the response tokens only."""

    ids: list  # np.int32 arrays
    prompt_lengths: list  # tokens before the response (<bos> included)
    pad_id: int

    def __len__(self):
        return len(self.ids)

    def arrays(self, batch):
        """(x, y, sample_weight) of a batch, shifted for next-token prediction."""
        n = len(batch.rows)
        ids = np.full((n, batch.length + 1), self.pad_id, np.int32)
        weight = np.zeros((n, batch.length + 1), np.float32)
        mask = np.zeros((n, batch.length), bool)
        for r, row in enumerate(batch.rows):
            if row < 0:
                continue
            tokens = self.ids[row]
            ids[r, : len(tokens)] = tokens
            weight[r, self.prompt_lengths[row] : len(tokens)] = 1.0
            mask[r, : len(tokens)] = True
        x = {"token_ids": ids[:, :-1], "padding_mask": mask}
        return x, ids[:, 1:], weight[:, 1:]


def padded_lengths(rows, sequence_length, length_step):
    """Positions each row trains on (n tokens: n - 1), rounded up to the
    step (0: every row padded to sequence_length)."""
    step = length_step or sequence_length
    return [min(-(-(len(ids) - 1) // step) * step, sequence_length) for ids in rows.ids]


class TrainingBatches:
    def __init__(self, rows, batch_size, sequence_length, length_step, seed):
        self.batch_size = batch_size
        self.seed = seed
        self.lengths = padded_lengths(rows, sequence_length, length_step)
        first = self.epoch(0)
        self.steps_per_epoch = len(first)
        # Tokens the model reads of an epoch (padding excluded), and positions it computes.
        self.real_tokens = sum(len(ids) for ids in rows.ids)
        self.computed_tokens = sum(b.length * batch_size for b in first)

    def epoch(self, epoch):
        """The epoch's batches, in training order."""
        rng = np.random.default_rng([self.seed, epoch])
        buckets, batches = {}, []
        for row in rng.permutation(len(self.lengths)):
            bucket = buckets.setdefault(self.lengths[row], [])
            bucket.append(int(row))
            if len(bucket) == self.batch_size:
                batches.append(Batch(tuple(bucket), self.lengths[row]))
                bucket.clear()
        left = [row for length in sorted(buckets) for row in buckets[length]]
        batches += filled_batches(left, self.lengths, self.batch_size)
        return [batches[i] for i in rng.permutation(len(batches))]


def evaluation_batches(rows, batch_size, sequence_length, length_step):
    """Every row once, in length order, batches filled with zero-weight rows."""
    lengths = padded_lengths(rows, sequence_length, length_step)
    return filled_batches(
        sorted(range(len(lengths)), key=lambda r: lengths[r]), lengths, batch_size
    )


def filled_batches(order, lengths, batch_size):
    """`order` cut into batches, each padded to its longest row, the last
    filled with zero-weight rows (-1)."""
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = list(order[start : start + batch_size])
        batches.append(
            Batch(tuple(chunk + [-1] * (batch_size - len(chunk))), max(lengths[r] for r in chunk))
        )
    return batches
