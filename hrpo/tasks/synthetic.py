"""Deterministic multi-step arithmetic word problems, used to build and train the tiny model.

Each problem starts from a count of objects and applies 2 to 4 operations (+, -, x2/x3); the
worked solution writes one equation per step, then the answer after the marker:
``7 + 5 = 12. 12 - 3 = 9. #### 9``. Numbers stay small and non-negative so a model of a few
million parameters can learn the arithmetic from digit tokens.
"""

from __future__ import annotations

import hashlib
import random

from hrpo.core.prompts import ANSWER_MARKER, Example

NAMES = [
    ("Tom", "he", "his"),
    ("Anna", "she", "her"),
    ("Ben", "he", "his"),
    ("Lily", "she", "her"),
    ("Sam", "he", "his"),
    ("Maria", "she", "her"),
    ("Leo", "he", "his"),
    ("Emma", "she", "her"),
]
OBJECTS = ["apples", "marbles", "stickers", "coins", "books", "cards", "pencils", "shells"]

# Phrases per operation; {pr} is the pronoun, {poss} the possessive, {n} the operand.
PHRASES = {
    "+": ["{pr} buys {n} more", "{pr} finds {n} more", "{pr} gets {n} more from a friend", "{pr} picks up {n} more"],
    "-": ["{pr} gives away {n}", "{pr} loses {n}", "{pr} gives {n} to a friend", "{pr} sells {n}"],
    "*": ["{pr} doubles {poss} {obj}", "{pr} triples {poss} {obj}"],  # indexed by factor - 2
}
CONNECTORS = ["Then", "After that,", "Next,"]
QUESTIONS = ["How many {obj} does {name} have now?", "How many {obj} does {name} have in the end?"]

MAX_VALUE = 99  # keep every intermediate result at two digits or fewer
TEST_BUCKETS = 8  # 1 in 8 question texts belongs to the test split (see _split_of)


def apply_op(value: int, op: str, n: int) -> int:
    """The arithmetic of one step; tests recompute solutions with this instead of eval()."""
    return {"+": value + n, "-": value - n, "*": value * n}[op]


def _pick_op(rng: random.Random, value: int) -> tuple[str, int]:
    """Choose an operation that keeps the value in [0, MAX_VALUE]."""
    choices = ["+", "+", "-", "-"] + (["*"] if 0 < value <= 30 else [])
    if value == 0:
        choices = ["+"]
    op = rng.choice(choices)
    if op == "+":
        n = rng.randint(1, min(12, MAX_VALUE - value))
    elif op == "-":
        n = rng.randint(1, min(12, value))
    else:
        n = 2 if value > 20 else rng.choice([2, 3])
    return op, n


def make_example(rng: random.Random) -> Example:
    """One word problem with its worked solution in meta["solution"] and the steps in meta["ops"]."""
    name, pr, poss = rng.choice(NAMES)
    obj = rng.choice(OBJECTS)
    start = rng.randint(2, 20)
    sentences = [f"{name} has {start} {obj}."]
    steps, ops, value = [], [], start
    for i in range(rng.randint(2, 4)):
        op, n = _pick_op(rng, value)
        template = PHRASES["*"][n - 2] if op == "*" else rng.choice(PHRASES[op])
        clause = template.format(pr=pr, poss=poss, obj=obj, n=n)
        if i == 0:
            sentences.append(clause[0].upper() + clause[1:] + ".")
        else:
            sentences.append(f"{rng.choice(CONNECTORS)} {clause}.")
        new = apply_op(value, op, n)
        steps.append(f"{value} {op} {n} = {new}.")
        ops.append([op, n])
        value = new
    sentences.append(rng.choice(QUESTIONS).format(obj=obj, name=name))
    solution = " ".join(steps) + f" {ANSWER_MARKER} {value}"
    return Example(
        question=" ".join(sentences), answer=str(value), meta={"solution": solution, "start": start, "ops": ops}
    )


def _split_of(question: str) -> str:
    """Assign a question text to a split by a stable hash, so train and test are disjoint
    whatever seeds and sizes are asked for."""
    bucket = hashlib.sha256(question.encode()).digest()[0] % TEST_BUCKETS
    return "test" if bucket == 0 else "train"


def synthetic_split(split: str, n: int, seed: int = 0) -> list[Example]:
    """n distinct problems of one split; the same arguments always give the same list."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    # Different streams per split (a string seed is hashed deterministically by random).
    rng = random.Random(f"hrpo-synthetic-{split}-{seed}")
    out, seen = [], set()
    while len(out) < n:
        ex = make_example(rng)
        if _split_of(ex.question) != split or ex.question in seen:
            continue
        seen.add(ex.question)
        out.append(ex)
    return out
