"""Training: streams cubstream shards into a ResNet or a torchvision classifier (model, data, optimizer, loops, reports)."""
