"""A guess of the writing system of a token, from the Unicode names of its characters.

Letters give their script: the first word of the character's name (LATIN, CJK, CYRILLIC,
ARABIC, GREEK, HANGUL, ...), with hiragana and katakana as KANA. A token is the script of most
of its letters; a token without letters is DIGIT, PUNCTUATION (punctuation and symbols),
SPACE, BYTES (part of a UTF-8 character: byte-level tokenizers decode it to U+FFFD) or OTHER.
"""

from __future__ import annotations

import unicodedata
from collections import Counter

NON_LETTER = ("DIGIT", "PUNCTUATION", "SPACE", "BYTES", "OTHER")
ALIASES = {"HIRAGANA": "KANA", "KATAKANA": "KANA", "IDEOGRAPHIC": "CJK"}
WIDTHS = ("FULLWIDTH", "HALFWIDTH")  # FULLWIDTH LATIN ...: the script is the next word


def letter_script(ch: str) -> str | None:
    """The script of a letter; None for any other character."""
    if not unicodedata.category(ch).startswith("L"):
        return None
    words = [w for w in unicodedata.name(ch, "OTHER").split() if w not in WIDTHS] or ["OTHER"]
    return ALIASES.get(words[0], words[0])


def text_script(text: str) -> str:
    letters = Counter(s for s in map(letter_script, text) if s)
    if letters:
        return letters.most_common(1)[0][0]  # ties: the script seen first
    if "\ufffd" in text:
        return "BYTES"
    cats = {unicodedata.category(ch)[0] for ch in text}
    if "N" in cats:
        return "DIGIT"
    if cats & {"P", "S"}:
        return "PUNCTUATION"
    return "SPACE" if text and text.isspace() else "OTHER"


def cross_lingual(tokens: list[str], main: str) -> tuple[int, int]:
    """(tokens in a letter script other than `main`, tokens in any letter script)."""
    scripts = [s for s in map(text_script, tokens) if s not in NON_LETTER]
    return sum(s != main for s in scripts), len(scripts)
