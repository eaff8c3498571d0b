"""Training: streams cubstream shards into a model of any source (our ResNets, torchvision, timm)."""
