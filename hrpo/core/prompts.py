"""Examples and prompt rendering shared by data loading, training and evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ANSWER_MARKER = "####"

# The system prompt of the code behind the paper's numbers (the original's utils.py:6-11), for
# training and evaluation alike.
SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    f"the answer. The final answer is provided after the {ANSWER_MARKER} tag, i.e., "
    f"{{reasoning process}} {ANSWER_MARKER} {{answer}}."
)


@dataclass
class Example:
    """One task item: the question, the gold answer the reward compares against (a list of
    aliases for retrieval QA), and what the task's prompt shows besides the question."""

    question: str
    answer: str | list[str]
    choices: list[str] | None = None  # multiple choice, in the order they are lettered A, B, ...
    contexts: list[dict] | None = None  # retrieval QA: passages {"title", "text"}, best first
    meta: dict[str, Any] = field(default_factory=dict)


def format_prompt(tokenizer, message: str, system: str | None = SYSTEM_PROMPT) -> str:
    """Render a user message with the tokenizer's chat template, ready for generation."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": message})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompts(
    tokenizer, messages: list[str], max_length: int, system: str | None = SYSTEM_PROMPT
) -> list[list[int]]:
    """Token ids of each rendered prompt; a prompt over the limit is an error, not a silent cut."""
    encoded = []
    for index, message in enumerate(messages):
        ids = tokenizer(format_prompt(tokenizer, message, system), add_special_tokens=False)["input_ids"]
        if len(ids) > max_length:
            raise ValueError(f"prompt of example {index} has {len(ids)} tokens, over max_prompt_length {max_length}")
        encoded.append(ids)
    return encoded
