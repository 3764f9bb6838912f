"""Flax Linen modules only: no data loading, no training loop, no mesh axes."""
