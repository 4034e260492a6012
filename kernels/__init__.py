"""Kernel families: CUDA sources (kernels/cuda), their generators, and numpy references."""
