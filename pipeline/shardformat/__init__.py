"""The shard format: what a sample is inside a tar, and the code that writes, reads, checks and decodes it.

    schema    member names (key + suffix), their order in a sample, refused suffixes, shard file names
    tarwrite  the ustar bytes of a shard, byte-identical to `tarfile` with fixed metadata
    tarread   the fast header reader of the train stream, and verify's strict grouping into samples
    check     the one sample check (cheap, or with a full decode) and the decoder of the train stream

Nothing outside this package names a member suffix: `build` asks schema for a sample's members, `verify`
and the train stream ask check whether a sample is usable (and get the same reason for the same defect).
"""
