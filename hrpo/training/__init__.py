"""The training layer: the run's config, the GRPO loss, the update over micro-batches, checkpoints,
run folders, metrics logs and curves; the evaluation core (scoring a policy on examples); and the
trainer in three parts read one at a time: setup (model, data, optimizer, resume), step (rollout,
reward, reference, update) and loop (schedule, checkpoints, held-out evaluation, summary)."""
