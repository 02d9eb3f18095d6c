"""Detokenizer tests on a real byte-level BPE tokenizer trained in the test (multi-byte characters
split across tokens): incremental text == full decode, no partial UTF-8 mid-stream, bounded decode
windows, stop strings across token boundaries, and the streaming holdback."""

from __future__ import annotations

import random

import pytest

from specray.engine.detokenizer import IncrementalDetokenizer, find_stop, stop_holdback
from specray.models.tokenizer import Tokenizer

CORPUS = [
    "Hello world, this is a café in Zürich.",
    "日本語のテキストです。日本は美しい。",
    "Emoji time 😀🎉👍 and more 😀!",
    "naïve résumé façade — déjà vu",
    "The quick brown fox jumps over the lazy dog.",
]
TEXTS = [
    "日本語 café 😀🎉 naïve, déjà vu — Zürich!",
    "The lazy dog 🐕 sleeps; 日本は美しい。 Ωμέγα ∑ x² ≠ y³",
    "plain ascii text with numbers 12345 and symbols #@!",
    "👍👍👍 résumé 🎉 façade 日本 😀",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,  # few merges: many multi-byte characters stay split across tokens
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(CORPUS * 3, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", clean_up_tokenization_spaces=False
    )
    return Tokenizer(hf)


def _chunks(ids: list[int], rng: random.Random, max_chunk: int) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(1, max_chunk)
        out.append(ids[i : i + n])
        i += n
    return out


def test_fixture_splits_characters_across_tokens(tokenizer):
    ids = tokenizer.encode(TEXTS[0], add_special_tokens=False)
    assert tokenizer.decode(ids) == TEXTS[0]
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # the hard case is exercised


@pytest.mark.parametrize("max_chunk", [1, 3, 8])
def test_valid_text_streams_without_replacement_chars(tokenizer, max_chunk):
    rng = random.Random(max_chunk)
    prompt = tokenizer.encode("日本 prompt 😀", add_special_tokens=True)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        detok = IncrementalDetokenizer(tokenizer, prompt)
        deltas = [detok.append(chunk) for chunk in _chunks(ids, rng, max_chunk)]
        assert all("\ufffd" not in d for d in deltas)
        assert "".join(deltas) == detok.text == tokenizer.decode(ids) == text
        assert detok.flush() == "" and detok.num_pending_ids == 0
        assert detok.output_ids == ids


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("with_prompt", [True, False])
def test_random_ids_match_full_decode(tokenizer, skip_special_tokens, with_prompt):
    rng = random.Random(int(skip_special_tokens) * 2 + int(with_prompt))
    vocab = tokenizer.vocab_size
    for _ in range(60):
        prompt = tokenizer.encode(rng.choice(TEXTS), add_special_tokens=True) if with_prompt else []
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 60))]
        final = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip_special_tokens)
        streamed = ""
        for chunk in _chunks(ids, rng, 4):
            streamed += detok.append(chunk)
            assert final.startswith(streamed)  # emitted text is never revised
            assert detok.text == streamed
        streamed += detok.flush()
        assert streamed == detok.text == final


def test_incomplete_character_is_held_back(tokenizer):
    # Byte-level tokens are strings of one mapped char per byte: split "😀" into one id per byte.
    emoji = tokenizer.encode("😀", add_special_tokens=False)
    vocab = tokenizer.hf.get_vocab()
    pieces = [vocab[ch] for ch in "".join(tokenizer.convert_ids_to_tokens(emoji))]
    assert len(pieces) == 4 and tokenizer.decode(pieces) == "😀"
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.append(pieces[:1]) == ""
    assert detok.append(pieces[1:3]) == ""
    assert detok.num_pending_ids == 3
    assert detok.append(pieces[3:] + tokenizer.encode("!", add_special_tokens=False)) == "😀!"
    # An incomplete character at the very end is released by flush().
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.append(pieces[:2]) == ""
    assert detok.flush() == tokenizer.decode(pieces[:2])
    assert detok.flush() == ""


def test_decode_window_stays_bounded(tokenizer):
    calls: list[int] = []

    class Counting(Tokenizer):
        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return super().decode(ids, skip_special_tokens)

    counting = Counting(tokenizer.hf)
    ids = tokenizer.encode(" ".join(TEXTS * 40), add_special_tokens=False)
    assert len(ids) > 1000
    detok = IncrementalDetokenizer(counting, tokenizer.encode(TEXTS[1]))
    for token_id in ids:
        detok.append([token_id])
    assert detok.text == tokenizer.decode(ids)
    assert max(calls) <= 12  # a few ids of context + at most one incomplete character
    assert len(calls) <= 2 * len(ids) + 1


def test_metaspace_prompt_context_keeps_leading_space():
    """SentencePiece-style decoders drop the leading space of a decode; with the prompt as context the
    first output word keeps its space, so prompt text + output text == decode(prompt + output)."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>"], show_progress=False)
    raw.train_from_iterator([CORPUS[0], CORPUS[4]] * 3, trainer)
    tok = Tokenizer(
        PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", clean_up_tokenization_spaces=False)
    )
    prompt = tok.encode("The quick", add_special_tokens=False)
    output = tok.encode(" brown fox jumps over", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt)
    for token_id in output:
        detok.append([token_id])
    assert tok.decode(prompt) + detok.text == tok.decode(prompt + output) == "The quick brown fox jumps over"
    assert detok.text == " brown fox jumps over"
    # Without a prompt there is no context, and the text is exactly the standalone decode.
    detok = IncrementalDetokenizer(tok, [])
    detok.append(output)
    assert detok.text == tok.decode(output) == "brown fox jumps over"


# ----------------------------------------------------------------------------- stop strings


def test_find_stop_basic():
    text = "hello world, goodbye"
    assert find_stop(text, len(text), ("world",), include_stop=False) == 6
    assert find_stop(text, len(text), ("world",), include_stop=True) == 11
    assert find_stop(text, len(text), ("nope",), include_stop=False) is None
    assert find_stop(text, 0, ("world",), include_stop=False) is None
    assert find_stop(text, len(text), (), include_stop=False) is None


def test_find_stop_only_matches_ending_in_new_text():
    text = "abc STOP def"
    # "STOP" ended before the last 4 chars: an older match is not reported again.
    assert find_stop(text, 4, ("STOP",), include_stop=False) is None
    # A match straddling old/new text is found: only "P" is new.
    assert find_stop("abc STOP", 1, ("STOP",), include_stop=False) == 4
    assert find_stop("abc STOP", 1, ("STOP",), include_stop=True) == 8
    assert find_stop("abc STO", 1, ("STOP",), include_stop=False) is None


def test_find_stop_first_completed_wins():
    # "b" completes before "abc"; between equal ends the earlier start (longer) stop wins.
    assert find_stop("xabc", 4, ("abc", "b"), include_stop=False) == 2
    assert find_stop("xabc", 4, ("bc", "abc"), include_stop=False) == 1
    assert find_stop("xabc", 4, ("bc", "abc"), include_stop=True) == 4


def test_stop_holdback():
    assert stop_holdback("Hello wor", ("world",)) == 3
    assert stop_holdback("Hello", ("world",)) == 0
    assert stop_holdback("abc", ("abc",)) == 0  # a full match is find_stop's job
    assert stop_holdback("xaa", ("aab",)) == 2
    assert stop_holdback("x<", ("</s>", "<|end|>")) == 1
    assert stop_holdback("x<|en", ("</s>", "<|end|>")) == 4
    assert stop_holdback("", ("abc",)) == 0
    assert stop_holdback("anything", ()) == 0


def _stream_with_stops(tokenizer, prompt, ids, stops, include, rng):
    """The engine's loop: append, look for a stop, stream what cannot be part of a stop string."""
    detok = IncrementalDetokenizer(tokenizer, prompt)
    streamed = ""
    history = []
    for chunk in _chunks(ids, rng, 3):
        delta = detok.append(chunk)
        text = detok.text
        cut = find_stop(text, len(delta), stops, include)
        if cut is not None:
            streamed += text[len(streamed) : cut]
            history.append(streamed)
            return streamed, history, True
        upto = len(text) - stop_holdback(text, stops)
        assert upto >= len(streamed), "the streamed length must never decrease"
        streamed += text[len(streamed) : upto]
        history.append(streamed)
    streamed += detok.text[len(streamed) :] + detok.flush()
    history.append(streamed)
    return streamed, history, False


def _expected_cut(full: str, stops, include) -> str | None:
    best = None
    for s in stops:
        i = full.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < best):
            best = (i + len(s), i)
    if best is None:
        return None
    return full[: best[0] if include else best[1]]


STOP_CASES = [
    ("日本語 café 😀🎉 naïve, déjà vu — Zürich!", ("é 😀",)),  # spans several tokens + split chars
    ("日本語 café 😀🎉 naïve, déjà vu — Zürich!", ("ïve",)),
    ("日本語 café 😀🎉 naïve, déjà vu — Zürich!", ("déjà", "Zür")),
    ("日本語 café 😀🎉 naïve, déjà vu — Zürich!", ("nomatch", "Zürich?")),
    ("The lazy dog 🐕 sleeps; 日本は美しい。", ("日本は", "lazy d")),
    ("The lazy dog 🐕 sleeps; 日本は美しい。", ("🐕 s",)),
    ("aaaab", ("aab",)),  # overlapping prefixes
]


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("case", range(len(STOP_CASES)))
def test_stop_strings_across_token_boundaries(tokenizer, case, include):
    text, stops = STOP_CASES[case]
    ids = tokenizer.encode(text, add_special_tokens=False)
    prompt = tokenizer.encode("prompt: ", add_special_tokens=True)
    expected = _expected_cut(text, stops, include)
    for seed in range(5):
        streamed, history, stopped = _stream_with_stops(tokenizer, prompt, ids, stops, include, random.Random(seed))
        assert stopped == (expected is not None)
        assert streamed == (text if expected is None else expected)
        for partial in history:
            assert streamed.startswith(partial)  # nothing streamed is ever taken back
            assert "\ufffd" not in partial
            if not include:
                assert not any(s in partial for s in stops)
