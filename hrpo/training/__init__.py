"""The training layer: the run's config, the GRPO loss, the update over micro-batches, checkpoints,
run folders, metrics logs and curves."""
