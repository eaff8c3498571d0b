"""Training: streams cubstream shards into a ResNet (model, data, optimizer, loops, reports)."""
