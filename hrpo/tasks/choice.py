"""Multiple choice: MMLU (training), MMLU-STEM and ARC-Challenge (evaluation).

Asked as the paper asks it: `Question: ...\\nOptions:\\nA. ...\\nB. ...`; options are always
lettered A, B, C, ... (up to J), and a gold given as an index, a letter or one of ARC's own
labels ("1"-"4" on some items) is mapped onto that lettering. The answer is the option letter
written after the marker. `official_letter` is the paper's own scoring (eval_mmlust.py,
eval_arcc.py), kept apart from read_choice.
"""

from __future__ import annotations

import re

from hrpo.core.prompts import Example
from hrpo.tasks.records import Rejected, get_field, kind, options_field, text_field

from .base import Official, Task, first_line, official_text, official_trim, register, unwrap

LETTERS = "ABCDEFGHIJ"


def _arc_official(rec: dict) -> tuple[str, list[str], list[str]]:
    """AI2's ARC JSONL: {"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}."""
    q = rec["question"]
    stem = text_field(q, "stem")
    items = get_field(q, "choices", "question.choices")
    if not isinstance(items, list) or not all(isinstance(c, dict) for c in items):
        raise Rejected(f"field 'question.choices': expected a list of objects, got {kind(items)}")
    texts = options_field([c.get("text") for c in items], "question.choices.text")
    labels = options_field([c.get("label") for c in items], "question.choices.label")
    return stem, texts, labels


def convert(rec: dict) -> Example:
    labels: list[str] | None = None
    if isinstance(rec.get("question"), dict):
        question, choices, labels = _arc_official(rec)
    else:
        question = text_field(rec, "question")
        choices = get_field(rec, "choices")
        if isinstance(choices, dict):  # ARC on the hub: {"text": [...], "label": [...]}
            labels = options_field(get_field(choices, "label", "choices.label"), "choices.label")
            choices = options_field(get_field(choices, "text", "choices.text"), "choices.text")
        else:
            choices = options_field(choices, "choices")  # a string such as "wxyz" is not a list of options
    if labels is not None and len(labels) != len(choices):
        raise Rejected(f"field 'choices.label': expected one label per option, got {len(labels)} for {len(choices)}")
    if "answer" not in rec and "answerKey" not in rec:
        raise Rejected("missing field 'answer' (or 'answerKey')")
    name = "answerKey" if "answerKey" in rec else "answer"
    key = rec[name]
    n = len(choices)
    if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < n:
        index = key
    elif isinstance(key, str) and labels is not None and key.strip() in labels:  # ARC labels may be "1".."4"
        index = labels.index(key.strip())
    elif isinstance(key, str) and len(key.strip()) == 1 and key.strip().upper() in LETTERS[:n]:
        index = LETTERS.index(key.strip().upper())
    else:
        what = f"an index 0-{n - 1} or a letter A-{LETTERS[n - 1]}"
        what += f" or a label {'/'.join(labels)}" if labels else ""
        shown = f"{key!r:.20}" if isinstance(key, (int, str)) and not isinstance(key, bool) else kind(key)
        raise Rejected(f"field {name!r}: expected {what}, got {shown}")
    meta = {k: rec[k] for k in ("subject", "type", "id") if k in rec}
    if name == "answerKey" and str(key) != LETTERS[index]:  # ARC's "1"-"4": the official script scores against it
        meta["key"] = key
    return Example(question=question, answer=LETTERS[index], choices=list(choices), meta=meta)


def render(ex: Example) -> str:
    options = "\n".join(f"{LETTERS[j]}. {c}" for j, c in enumerate(ex.choices or []))
    return f"Question: {ex.question}\nOptions:\n{options}"


_OFFICIAL_LETTER = re.compile(r"\b([A-J])\b")


def official_letter(text: str) -> str:
    """process_mmlu_answer (utils.py:298-310): the LAST standalone letter A-J of the trimmed
    text after upper-casing it all -- so the pronoun "I" and the article "a" count as options
    ("B, as I said" -> "I"; "B is a guess" -> "A"); with none, the whole trimmed text, its
    dots stripped at both ends, then trailing slashes (an ARC key "1" so matches only a
    completion whose whole answer is "1", never a letter)."""
    text = official_trim(text)
    letters = _OFFICIAL_LETTER.findall(text.upper())
    return (letters[-1] if letters else text.strip().strip(".")).rstrip(".").rstrip("/")


# eval_mmlust.py:114-118 and eval_arcc.py:118-122: both sides through process_mmlu_answer,
# compared with ==; the gold is chr(65 + answer) for MMLU-STEM and ARC's answerKey as written.
OFFICIAL = Official(
    answer=lambda completion: official_letter(official_text(completion)),
    golds=lambda key: [official_letter(str(key))],
    source=lambda ex: ex.meta.get("key", ex.answer),
)


_CUE = re.compile(rf"\b(?i:answer|option|choice)\s*(?i:is|would be|:|=)?\s*:?\s*[(\[]?([{LETTERS}])(?![A-Za-z0-9])")
_LEADING = re.compile(rf"[(\[]?([{LETTERS}])(?:[.):\]]|\s*$)")
# A lower-case letter only as the whole line or marked as an option ("c", "(c)", "c) text"):
# "a total of 5" is prose, and "i.e." / "e.g." are not options I and E.
_LOWER = re.compile(rf"[(\[]?([{LETTERS.lower()}])(?:[.):\]](?![A-Za-z])|\s*$)")
_LONE = re.compile(rf"(?<![A-Za-z0-9'])([{LETTERS}])(?![A-Za-z0-9'])")
_WORD = re.compile(r"(?<![A-Za-z0-9'])([AI])(?=\s+[a-z])")  # the article "A", the pronoun "I"


def read_choice(after: str) -> str | None:
    """The option letter (A-J) on the answer line (the first non-empty line after the marker):
    the letter after "answer", "option" or "choice" ("The answer is (B)", "Answer: C"), else a
    leading letter marked as one ("B", "(B)", "B.", "B) text"; \\boxed{}, bold and $ removed),
    or such a letter in lower case ("c", "(c)", "c) text", read as C; not "a total of 5"),
    else the line's only standalone capital A-J, not counting an "A" or "I" used as a word when
    there are others ("I pick D", "A is correct", "A tough one, but C"); several: unreadable.
    Letters only: a numeral or the option's text in place of its letter reads as nothing, as
    the options are asked by letter; a letter past the item's options just scores 0."""
    line = unwrap(first_line(after))
    line = re.sub(r"\\(?:text|textbf|mathrm)\{([^{}]*)\}", r"\1", line)
    m = _CUE.search(line) or _LEADING.match(line) or _LOWER.match(line)
    if m:
        return m.group(1).upper()
    letters = set(_LONE.findall(line))
    if len(letters) > 1:
        letters -= set(_WORD.findall(line))
    return letters.pop() if len(letters) == 1 else None


def choice_score(pred: str, gold) -> float:
    return float(pred == str(gold).strip().upper())


def _choice_task(name: str, hub: str, splits: tuple[str, str] = ("train", "test")) -> Task:
    """The three multiple-choice benchmarks differ only in name and dataset."""
    return Task(
        name,
        recipe="mmlu",
        convert=convert,
        render=render,
        read=read_choice,
        score=choice_score,
        official=OFFICIAL,
        hub=hub,
        splits=splits,
    )


register(
    _choice_task("mmlu", "cais/mmlu:all"),
    _choice_task("mmlu-stem", "TIGER-Lab/MMLU-STEM", splits=("test", "test")),
    _choice_task("arc-c", "allenai/ai2_arc:ARC-Challenge"),
)
