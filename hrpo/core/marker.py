"""Answer-marker detection on token ids, exactly equivalent to checking the decoded text.

A row is "thinking" while `marker not in tokenizer.decode(generated, skip_special_tokens=True)`.
Instead of re-decoding every step, each token's text piece is run once through the
marker's KMP automaton from every state, giving a (len(marker) + 1, V) transition table;
a step is then one gather. The last state is absorbing: the marker has been written.
"""

from __future__ import annotations

import torch


def kmp_automaton(marker: str):
    """Return step(state, char) -> state for the marker's prefix automaton."""
    fail = [0] * len(marker)
    k = 0
    for i in range(1, len(marker)):
        while k and marker[i] != marker[k]:
            k = fail[k - 1]
        if marker[i] == marker[k]:
            k += 1
        fail[i] = k

    def step(state: int, ch: str) -> int:
        if state == len(marker):
            return state
        while state and ch != marker[state]:
            state = fail[state - 1]
        return state + 1 if ch == marker[state] else 0

    return step


def token_pieces(tokenizer) -> list[str]:
    """The text each token id adds when appended to a decoded sequence.

    Decoding a token after an anchor and removing the anchor's text keeps the leading
    space that sentencepiece-style tokenizers drop at the start of a text; special tokens
    give "" as they do under skip_special_tokens.
    """
    vocab = len(tokenizer)
    anchor = tokenizer.encode("a", add_special_tokens=False)[-1:]
    prefix = tokenizer.decode(anchor, skip_special_tokens=True)
    texts = tokenizer.batch_decode([anchor + [i] for i in range(vocab)], skip_special_tokens=True)
    return [t[len(prefix) :] if t.startswith(prefix) else t for t in texts]


class MarkerMatcher:
    """Per-row marker state over token ids. `table[state, token]` is the next state."""

    def __init__(self, tokenizer, marker: str = "####", vocab_size: int | None = None):
        if not marker:
            raise ValueError("answer marker must be a non-empty string")
        self.marker = marker
        self.found_state = len(marker)
        pieces = token_pieces(tokenizer)
        # The model's vocab may be padded past the tokenizer's; those ids never decode.
        vocab_size = max(vocab_size or 0, len(pieces))
        step = kmp_automaton(marker)
        marker_chars = set(marker)
        table = torch.zeros(self.found_state + 1, vocab_size, dtype=torch.long)
        table[self.found_state] = self.found_state
        for tok in range(vocab_size):
            piece = pieces[tok] if tok < len(pieces) else ""
            if not piece:
                table[: self.found_state, tok] = torch.arange(self.found_state)
            elif marker_chars.intersection(piece):
                for start in range(self.found_state):
                    state = start
                    for ch in piece:
                        state = step(state, ch)
                    table[start, tok] = state
            # else: any other piece breaks a partial match: state 0, the zero fill.
        self.table = table
        # the marker as token ids: what Soft Thinking's cold stop writes (hrpo/engine/rollout.py)
        self.marker_ids = tuple(tokenizer.encode(marker, add_special_tokens=False))

    def initial(self, batch: int, device=None) -> torch.Tensor:
        return torch.zeros(batch, dtype=torch.long, device=device)

    def advance(self, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if self.table.device != tokens.device:
            self.table = self.table.to(tokens.device)
        return self.table[states, tokens]

    def found(self, states: torch.Tensor) -> torch.Tensor:
        return states == self.found_state
