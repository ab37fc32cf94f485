"""Training: every check before weights load, the two engines, the optimizer step loop, checkpoints and export."""
