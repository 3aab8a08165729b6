"""Training: the backbone and table optimizers, the train step, the loop and checkpoints."""
