"""Everything shared by all training: optimizer, train state, the train step (data, checkpoints,
metrics and the pre-training loop follow in later issues)."""
