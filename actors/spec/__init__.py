"""Speculative decoding math in plain PyTorch: trees, sampling, verification, statistics."""
