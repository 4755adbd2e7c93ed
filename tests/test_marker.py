import random

import torch

from hrpo.core.marker import MarkerMatcher, kmp_automaton

MARKER = "####"


def text_check(tokenizer, ids):
    return MARKER in tokenizer.decode(ids, skip_special_tokens=True)


def run(matcher, ids):
    states = matcher.initial(1)
    found = []
    for t in ids:
        states = matcher.advance(states, torch.tensor([t]))
        found.append(bool(matcher.found(states)[0]))
    return found


def test_kmp_automaton_on_overlaps():
    step = kmp_automaton("abab")
    s = 0
    for ch in "aabaabab":
        s = step(s, ch)
    assert s == 4
    s = 0
    for ch in "ababa":
        s = step(s, ch)
    assert s == 4  # absorbing once found


def test_split_across_tokens(tokenizer):
    m = MarkerMatcher(tokenizer, MARKER)
    hash_id = tokenizer.convert_tokens_to_ids("#")
    pair = tokenizer.convert_tokens_to_ids("##")
    assert run(m, [hash_id, hash_id, hash_id, hash_id]) == [False, False, False, True]
    assert run(m, [pair, pair]) == [False, True]
    assert run(m, [hash_id, pair, hash_id]) == [False, False, True]


def test_merged_with_neighbouring_characters(tokenizer):
    m = MarkerMatcher(tokenizer, MARKER)
    ids = tokenizer.encode("so.## ##.##7", add_special_tokens=False)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert ".##" in pieces  # the marker's characters glued to a neighbour
    assert run(m, ids)[-1] is False  # "## ##" and ".##" are not a marker
    ids = tokenizer.encode("x.####7", add_special_tokens=False)
    assert run(m, ids)[-1] is True
    ids = tokenizer.encode("it is #### 19", add_special_tokens=False)
    assert "Ġ####" in tokenizer.convert_ids_to_tokens(ids)
    found = run(m, ids)
    assert found == [text_check(tokenizer, ids[: t + 1]) for t in range(len(ids))]


def test_equals_text_check_on_random_sequences(tokenizer):
    m = MarkerMatcher(tokenizer, MARKER)
    rng = random.Random(0)
    vocab = list(range(len(tokenizer)))
    hashy = [i for i in vocab if "#" in tokenizer.convert_ids_to_tokens(i)]
    assert len(hashy) >= 4
    for _ in range(300):
        ids = [rng.choice(hashy) if rng.random() < 0.4 else rng.choice(vocab) for _ in range(rng.randint(1, 12))]
        assert run(m, ids) == [text_check(tokenizer, ids[: t + 1]) for t in range(len(ids))], ids


def test_special_tokens_do_not_break_a_partial_marker(tokenizer):
    m = MarkerMatcher(tokenizer, MARKER)
    pair = tokenizer.convert_tokens_to_ids("##")
    eos = tokenizer.eos_token_id
    assert run(m, [pair, eos, pair]) == [False, False, True]  # decode skips the special token


def test_vocab_padded_past_tokenizer(tokenizer):
    m = MarkerMatcher(tokenizer, MARKER, vocab_size=len(tokenizer) + 7)
    assert m.table.shape == (5, len(tokenizer) + 7)
    pair = tokenizer.convert_tokens_to_ids("##")
    assert run(m, [pair, len(tokenizer) + 3, pair]) == [False, False, True]


def test_never_produced_stays_thinking(tokenizer):
    m = MarkerMatcher(tokenizer, MARKER)
    ids = tokenizer.encode("## # ## 19 . #3 #", add_special_tokens=False)
    assert run(m, ids) == [False] * len(ids)
    assert MARKER not in tokenizer.decode(ids)
