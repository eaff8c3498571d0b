"""The shard format: what a sample is inside a tar, and the code that writes, reads, checks and decodes it.

    schema    `Sample`, member names (key + suffix), their order in a sample, refused suffixes, shard file names
    tarwrite  the ustar bytes of a shard, byte-identical to `tarfile` with fixed metadata
    tarread   the fast header reader of the train stream, and verify's strict grouping into samples
    check     the one sample check (cheap, or with a full decode) and the decoder of the train stream

Nothing outside this package names a member suffix: `build` writes a `Sample`'s members, `verify`
and the train stream ask check whether a sample is usable (and get the same reason for the same defect).

A sample is a `Sample` wherever it has meaning: the writer builds one and writes its members, decoding
returns one, and verify and the train stream use its fields. Between the tar and decoding it is a raw mapping
of member suffix -> payload plus webdataset's `__key__` and `__url__`, which is what the checks inspect (a
sample can be damaged in ways a `Sample` cannot hold). The format and how it is versioned:
shards/README.md.
"""

from pipeline.shardformat.schema import Sample

__all__ = ["Sample"]
