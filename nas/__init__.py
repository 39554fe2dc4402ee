"""nas: search spaces, the ViT supernet, samplers, training, batched evaluation, search and export on top of
elastic_ops."""
