"""The training step central and federated runs share: setup, step, losses, evaluation."""
