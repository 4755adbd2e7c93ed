"""Where the trainer's parts meet: a device step whose rollout fails (hrpo.training.step) hands
the loop (hrpo.training.loop) the RNG state from before the step, and the loop saves it."""

import pytest
import torch
from conftest import small_config

from hrpo.training.checkpoint import complete_checkpoints, step_folder
from hrpo.training.loop import Trainer


def test_a_failed_rollout_saves_the_state_before_its_step_and_raises_its_error(
    model_dir, tmp_path, monkeypatch, capsys
):
    cfg = small_config(model_dir, tmp_path / "run", max_steps=4, eval_limit=2)
    trainer = Trainer(cfg, None, progress=False)
    real, seeds = trainer.engine.generate, []

    def generate(prompts, sampling, *args, seed=None, **kwargs):
        if seed is not None:  # a training rollout (held-out ones pass a generator)
            seeds.append(seed)
            if len(seeds) == 3:
                raise OSError("disk unplugged")
        return real(prompts, sampling, *args, seed=seed, **kwargs)

    monkeypatch.setattr(trainer.engine, "generate", generate)
    with pytest.raises(OSError, match="^disk unplugged$"):  # the rollout's own error, as main() reports it
        trainer.run()
    assert complete_checkpoints(trainer.ckpt_root) == [step_folder(trainer.ckpt_root, 2)]
    assert (
        f"hrpo: step 2 failed; the state before it is saved in {step_folder(trainer.ckpt_root, 2)}"
        in capsys.readouterr().err
    )

    resumed = Trainer(
        small_config(model_dir, tmp_path / "run", max_steps=4, eval_limit=2, resume=True), None, progress=False
    )
    assert resumed.state.step == 2 and resumed.state.opt_step == 2
    # The checkpoint holds the generator as it was before step 2 drew its rollout seed: resumed,
    # step 2 draws the same seed again (one drawn after it would differ).
    again = int(torch.randint(0, 2**62, (1,), generator=resumed.generator))
    assert again == seeds[2] and seeds[2] != seeds[1]
