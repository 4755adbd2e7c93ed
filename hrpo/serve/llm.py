"""The serving model without HTTP: a policy, its tokenizer and the continuous-batching
scheduler, turning text requests into scheduler requests and tokens back into text. The
HTTP app (app.py) and the Python API (LLM.generate, generate) both stand on it."""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass, replace
from pathlib import Path

from hrpo.core.errors import ConfigError
from hrpo.core.marker import MarkerMatcher
from hrpo.core.prompts import ANSWER_MARKER, SYSTEM_PROMPT
from hrpo.engine.rollout import ColdStop
from hrpo.engine.rollout_engine import RolloutEngine, make_engine
from hrpo.engine.scheduler import Request, RequestError, Scheduler
from hrpo.eval import add_latent_arguments, load_policy, recorded_latent, resolve_checkpoint
from hrpo.model.loading import eos_token_ids, resolve_device
from hrpo_kernels.latent_input import LatentParams

EMBEDDED_NAME = "hrpo-embedded"
GREEDY_TEMPERATURE = 0.5  # hrpo.eval's --temperature: the latent mixture's under greedy decoding
TOP_K = 50  # hrpo.eval's --top-k


@dataclass
class Completion:
    """One choice as text: the tokens drawn, why it ended, and the hybrid part (thinking
    tokens blended, mean gate coefficient over them)."""

    text: str
    tokens: list[int]
    finish_reason: str
    thinking_tokens: int
    gate_mean: float | None


class LLM:
    """A served policy: an HRPO checkpoint (adapters and gate on its base model), a base
    model (`model`, hub name or folder), or without either the embedded model. `latent`: the
    hybrid requests' default latent mode and numbers: LatentParams, or the flags of hrpo.eval's
    add_latent_arguments (argparse.Namespace) whose unset mode and sigma are the checkpoint's;
    None: both as the checkpoint was trained, the rest at hrpo.eval's defaults.

        llm = LLM("runs/gsm8k/checkpoint")
        llm.generate(["What is 2 + 3?"], max_tokens=64)[0][0].text
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        model: str | None = None,
        *,
        dtype: str = "auto",
        device: str = "auto",
        max_batch: int = 32,
        max_model_len: int | None = None,
        max_queue: int = 256,
        token_budget: int | None = None,
        system_prompt: bool | None = None,
        temperature: float = GREEDY_TEMPERATURE,
        top_k: int = TOP_K,
        latent: LatentParams | argparse.Namespace | None = None,
        top_p: float = 1.0,
    ):
        checkpoint = resolve_checkpoint(checkpoint) if checkpoint else None
        hm, self.tokenizer, meta = load_policy(checkpoint, model, resolve_device(device), dtype)
        self.name = served_name(checkpoint or model)
        self.hybrid = bool(meta.get("hybrid", True))  # as the checkpoint was trained (hrpo.eval's default)
        if not isinstance(latent, LatentParams):
            latent = recorded_latent(latent or latent_flags([]), meta)
        self.latent = latent
        use_system = meta.get("system_prompt", True) if system_prompt is None else system_prompt
        self.system = SYSTEM_PROMPT if use_system else None
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        matcher = MarkerMatcher(self.tokenizer, meta.get("marker", ANSWER_MARKER), hm.config.vocab_size)
        engine = make_engine(hm, matcher, eos_token_ids(hm.causal_lm, self.tokenizer), self.tokenizer.pad_token_id)
        if not isinstance(engine, RolloutEngine):
            raise ConfigError("hrpo.serve runs models the fast engine runs (Qwen2/2.5/3, Llama); this one it cannot")
        limit = getattr(hm.config, "max_position_embeddings", None) or 2048
        self.max_model_len = max_model_len or min(limit, 2048)
        if self.max_model_len > limit:
            raise ConfigError(f"--max-model-len {self.max_model_len} is past the model's {limit} positions")
        self.scheduler = Scheduler(engine, max_batch, self.max_model_len, max_queue, token_budget)

    # ------------------------------------------------------------------ prompts
    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """A conversation through the tokenizer's chat template, the paper's system prompt
        first when the conversation has none and the server uses it."""
        if self.system and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": self.system}] + list(messages)
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text_prompt(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------ requests
    def request(
        self,
        prompt: list[int],
        *,
        max_tokens: int | None = None,
        n: int = 1,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        hybrid: bool | None = None,
        latent_mode: str | None = None,
        latent_options: dict | None = None,
        cold_stop: ColdStop | None = None,
        stop: list[str] | None = None,
        top_logprobs: int | None = None,
        ignore_eos: bool = False,
        on_update=None,
    ) -> Request:
        """A scheduler request. temperature None or 0: greedy (the latent mixture and the
        log-probs at the server's temperature, as hrpo.eval decodes); > 0: sampling, seeded
        by `seed` or, without one, a seed drawn here. max_tokens None: the rest of the context.
        latent_mode / latent_options (LatentParams' fields but the mode): the server's latent
        settings with these replaced (ValueError when invalid); naming a mode turns hybrid on
        unless hybrid is False. cold_stop: Soft Thinking's early end of thinking (None: off)."""
        greedy = not temperature
        latent = replace(self.latent, **({"mode": latent_mode} if latent_mode else {}), **(latent_options or {}))
        if hybrid is None:
            hybrid = True if latent_mode else self.hybrid
        stops = [s for s in (stop or []) if s]
        return Request(
            prompt=prompt,
            max_tokens=self.max_model_len - len(prompt) if max_tokens is None else max_tokens,
            n=n,
            temperature=self.temperature if greedy else float(temperature),
            top_k=self.top_k if top_k is None else top_k,
            top_p=self.top_p if top_p is None else top_p,
            greedy=greedy,
            seed=random.getrandbits(62) if seed is None and not greedy else (seed or 0),
            hybrid=hybrid,
            latent=latent,
            cold_stop=cold_stop,
            top_logprobs=top_logprobs,
            ignore_eos=ignore_eos,
            stop=(lambda j, tokens: self.cut(tokens, stops) is not None) if stops else None,
            on_update=on_update,
        )

    def cut(self, tokens: list[int], stops: list[str]) -> int | None:
        """Where the first stop string starts in the tokens' text (None: nowhere)."""
        return stop_at(self.decode(tokens), stops)

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def visible(self, tokens: list[int], stops: list[str], final: bool) -> str:
        """The text a client sees of a choice so far: cut before a stop string; while it runs,
        short of what could still become a stop string or an unfinished character."""
        text = self.decode(tokens)
        at = stop_at(text, stops)
        if at is not None:
            return text[:at]
        if final:
            return text
        hold = max((len(s) - 1 for s in stops), default=0)
        text = text[: len(text) - hold] if hold else text
        return text.rstrip("\ufffd")

    def completions(self, req: Request, stops: list[str] | None = None) -> list[Completion]:
        if req.error is not None:
            raise RuntimeError(req.error)
        return [
            Completion(self.visible(c.tokens, stops or [], True), c.tokens, c.finish, c.thinking_tokens, c.gate_mean)
            for c in req.choices
        ]

    # ------------------------------------------------------------------ the Python API
    def generate(
        self, prompts: list[str | list[dict]], *, raw: bool = False, stop: list[str] | None = None, **sampling
    ) -> list[list[Completion]]:
        """Every prompt's choices, generated together on this thread: a string is one user
        turn in the chat template (as hrpo.eval asks), a list of messages a conversation,
        raw=True passes strings as they are. sampling: request()'s fields (max_tokens, n,
        temperature, top_k, top_p, seed, hybrid, latent_mode, latent_options)."""
        if isinstance(prompts, (str, dict)):
            raise ValueError("generate takes a list of prompts")
        reqs = []
        for p in prompts:
            if raw:
                ids = self.text_prompt(p)
            else:
                ids = self.chat_prompt([{"role": "user", "content": p}] if isinstance(p, str) else p)
            try:
                reqs.append(self.scheduler.submit(self.request(ids, stop=stop, **sampling)))
            except RequestError as err:
                raise ValueError(f"prompt {len(reqs)}: {err}") from None
            while len(self.scheduler.waiting) >= self.scheduler.max_queue:  # room for the rest
                self.scheduler.step()
        while self.scheduler.busy():
            self.scheduler.step()
        return [self.completions(r, stop) for r in reqs]


def served_name(source: str | None) -> str:
    """The model id clients name: a local checkpoint's or model's folder name (never its path,
    which an error message would otherwise show), a hub name as it is."""
    if source is None:
        return EMBEDDED_NAME
    return Path(source).name if Path(source).exists() else source


def latent_flags(argv: list[str]) -> argparse.Namespace:
    """hrpo.eval's latent flags parsed from argv (the empty list: all at their defaults)."""
    p = argparse.ArgumentParser(add_help=False)
    add_latent_arguments(p)
    return p.parse_args(argv)


def stop_at(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def generate(
    prompts: list[str | list[dict]], checkpoint: str | None = None, model: str | None = None, **sampling
) -> list[str]:
    """The first choice's text for each prompt, from a one-off LLM (see LLM.generate)."""
    return [out[0].text for out in LLM(checkpoint, model).generate(prompts, **sampling)]
