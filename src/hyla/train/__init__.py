"""Training: the loop, the optimizer and schedule, and checkpoints."""
