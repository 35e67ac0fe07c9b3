"""logitcache.kernels: fused sparse-KD losses (Triton) and their plain-PyTorch references."""
