"""The PyTorch side: the ViT and its split, data sets and partitioners, trainer and daemon."""
