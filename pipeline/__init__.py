"""CUB-200-2011 to deterministic WebDataset shards (see shards/README.md for the format)."""
