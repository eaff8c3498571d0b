"""Shard streams -> uint8 batches, for training (exact batch counts on every rank) and evaluation (every
sample exactly once).

A batch is a dict: {"image": uint8 tensor [B, 3, H, W] in channels_last memory, "label": int64 tensor [B],
"key": list[str], "bad": int}, where "bad" counts the corrupt samples the producing worker dropped since its
previous batch.
Batches are assembled inside the DataLoader workers (the DataLoader runs with batch_size=None over an
IterableDataset that yields whole batches) and stay uint8 until the device normalises them (a quarter of
the bytes of float32 through the worker pipes).
Each worker stacks its batches into a few shared-memory buffers it reuses (`batching._Ring`) instead of the
fresh shared memory torch would create per batch.

Each DataLoader worker runs a chain of small generators (`work`):
    shard paths/URLs -> tar members (pipeline.remote, pipeline.shardformat) -> samples (webdataset group_by_keys)
    -> [train: seeded shuffle buffer -> resume skip] -> decode + augment -> batches

Train: the shard order is shuffled by (seed, epoch), the same on every rank, and dealt round robin to the
world_size * max(workers, 1) streams (stream = rank * W + worker); with more streams than shards, streams
wrap around the shard list. Every worker yields an exact quota of full batches, cycling its shards as often
as needed, so every rank yields exactly `train_batches_per_epoch(...)` batches and DDP never waits on a rank
that ran dry. Node/worker splitting happens here: never `accelerator.prepare()` these loaders. A train
loader may span several epochs: each worker runs its jobs of one epoch after the other, so worker processes
start once per run and prefetching goes on across epoch ends.

Resume: the DataLoader takes batch i from worker i % W, so each worker knows how many of its own batches
were consumed and skips those samples (after the shuffle buffer, before decoding). A resumed loader also
rotates the workers' roles so that its first batch comes from the worker that owned batch `start_batch`
(and rotates them again at each later epoch whose batch count W does not divide):
the remaining batches are identical to the rest of an uninterrupted epoch. Limit: the skip stage only
checks what is cheap (member names, label, image header); a sample whose header parses but whose pixels do
not decode, inside the skipped span, shifts the resumed stream by one sample (batch counts stay exact).
An epoch yields whole optimizer steps only (`grad_accum`), so no batch spills into the next epoch.

Elastic resume (another processes x workers x batch size, the same global batch): a stream's samples are a
pure function of shard sample counts and seeds (`stages.stream_samples`), so `elastic` replays the earlier
topology on positions (shard, index in shard) to learn what it delivered, and gives each new stream a `Chunk`:
its consecutive share of the positions nobody delivered, exactly its remaining quota. A chunk stream reads
only the shards its chunk touches, keeps only those positions, shuffles them in its seeded buffer; the
unneeded rest of the epoch is dropped, as a normal epoch drops its remainder. Later epochs are normal.
Limits: the replay cannot see corrupt samples: each one dropped before the checkpoint makes the replay take
the next sample of its stream for unseen though it was trained (it is trained twice that epoch), and each
one in a chunk makes its stream cycle its chunk again for a replacement (a sample seen twice); a shard set
changed with --force between the runs is replayed as the new one.

Modules, from a shard to a batch:
    shards    the manifest's shards as `Shard`s, reading one (raw samples), ShardError and its one line
    stages    the train stream of an epoch (cycle, shuffle buffer, resume skip) and decode + augment
    batching  decoded samples -> batches, in each worker's reusable shared-memory ring
    work      what one worker runs: a train or eval job, the chain of stages it assembles
    topology  a run's processes x workers x batch x accumulation, and which batches each stream delivers
    assignment  batch counts, the shard order dealt to the streams, every worker's jobs from a (resumed) start
    loaders   train_loader, eval_loader: one DataLoader over the workers' jobs, iterated by `Batches`
    elastic   the chunks an epoch still owes when it resumes under another topology (not imported here)
    trainstream  a run's train stream and its resume state: epoch, step, topology, segments (not imported here)
"""

from train.data.assignment import Chunk, Position, epoch_batches, stream_shards, train_batches_per_epoch
from train.data.batching import RING_SLOTS, Batch
from train.data.loaders import Batches, eval_loader, train_loader
from train.data.shards import Shard, ShardError, shard_error_message, train_shards
from train.data.stages import Transform

__all__ = [
    "RING_SLOTS", "Batch", "Batches", "Chunk", "Position", "Shard", "ShardError", "Transform", "epoch_batches",
    "eval_loader", "shard_error_message", "stream_shards", "train_batches_per_epoch", "train_loader",
    "train_shards",
]
