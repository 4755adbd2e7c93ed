"""TRL's GRPOTrainer on the arith task with the arith recipe (the embedded model, or `model`: a name
`hrpo.model.loading.load_base_model` reads, e.g. smollm2-135m), for the whole-step comparisons
(benchmarks/test_train_step_bench.py, test_real_model_bench.py). trl is not a dependency of hrpo: this file is
imported only when it is installed.

Matched: the model and tokenizer, LoRA rank 32 / alpha 64 on every projection, 4 prompts x 8
completions of up to 64 new tokens sampled at temperature 0.5 / top-k 50, the reward, AdamW
(betas 0.9 / 0.99, weight decay 0.1, lr 5e-4, cosine with 10% warm-up, clip 1.0), KL 0.005,
one update per rollout. TRL has no latent reasoning: it is the peer of `hrpo_grpo`.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch


def trl_step_seconds(steps: int, workdir: Path, model: str | None = None) -> float:
    """The median wall time of TRL's optimizer steps after the first two (seconds)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from hrpo.model.loading import load_base_model
    from hrpo.tasks.rewards import get_reward_fn
    from hrpo.tasks.synthetic import synthetic_split
    from hrpo.training.config import LORA_TARGETS

    torch.manual_seed(0)
    model, tok = load_base_model(model, torch.device("cpu"), torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:  # a GGUF file: dequantised on load, but TRL
        model.hf_quantizer = None  # refuses to train a model that still carries the quantizer's marker
        del model.config.quantization_config
        model.is_quantized = False
    examples = synthetic_split("train", 4000, seed=0)
    data = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": ex.question}], "answer": ex.answer} for ex in examples]
    )
    score = get_reward_fn("arith")

    def reward(prompts, completions, answer, **_):
        return score(completions, answer)

    args = GRPOConfig(
        output_dir=str(workdir / "trl"),
        per_device_train_batch_size=32,
        num_generations=8,
        gradient_accumulation_steps=1,
        max_completion_length=64,
        temperature=0.5,
        top_k=50,
        learning_rate=5e-4,
        beta=0.005,
        adam_beta1=0.9,
        adam_beta2=0.99,
        weight_decay=0.1,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        max_grad_norm=1.0,
        num_iterations=1,
        loss_type="grpo",
        max_steps=steps,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
    )
    ticks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            ticks.append(time.perf_counter())

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=data,
        processing_class=tok,
        peft_config=LoraConfig(r=32, lora_alpha=64, target_modules=list(LORA_TARGETS)),
        callbacks=[Clock()],
    )
    trainer.train()
    return statistics.median(b - a for a, b in zip(ticks[1:], ticks[2:]))
