"""Fine-grained datasets (CUB-200-2011, NABirds, ImageFolder trees) to deterministic WebDataset shards (see shards/README.md for the format)."""
