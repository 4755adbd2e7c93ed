"""Examples and prompt rendering shared by data loading, training and evaluation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ANSWER_MARKER = "####"

# One instruction for every reasoning task: the reward reads the text after the marker.
SYSTEM_PROMPT = (
    "Think through the problem step by step, then write the final answer on the last line "
    f"after '{ANSWER_MARKER}', for example '{ANSWER_MARKER} 42'."
)


@dataclass
class Example:
    """One task item: the user message (choices and contexts already rendered into it) and
    the gold answer the reward compares against (a list of aliases for retrieval QA)."""

    question: str
    answer: str | list[str]
    meta: dict[str, Any] = field(default_factory=dict)


def format_prompt(tokenizer, question: str, system: str | None = SYSTEM_PROMPT) -> str:
    """Render a question with the tokenizer's chat template, ready for generation."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": question})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompts(tokenizer, examples: list[Example], max_length: int, system: str | None = SYSTEM_PROMPT) -> list[list[int]]:
    """Token ids of each rendered prompt; a prompt over the limit is an error, not a silent cut."""
    encoded = []
    for index, ex in enumerate(examples):
        ids = tokenizer(format_prompt(tokenizer, ex.question, system), add_special_tokens=False)["input_ids"]
        if len(ids) > max_length:
            raise ValueError(
                f"prompt of example {index} has {len(ids)} tokens, over max_prompt_length {max_length}"
            )
        encoded.append(ids)
    return encoded
