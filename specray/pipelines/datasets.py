"""Benchmark prompts built from real text and code found on the machine (no downloads).

Owns nothing persistent: each builder returns token-id prompts of a requested length.
`code_completion_prompt`: repo-level code completion (RepoBench/LCC stand-in). The last part is a
Python file of an installed package cut at a function boundary; before it come the package's other
files, each under a `# file: <path>` header, until the prompt has the requested number of tokens
(the oldest context is cut from the front).

`build_dataset(name, tokenizer, num_prompts, input_lens, seed)` returns `Sample`s for the load
generator (`bench.py`), spread round-robin over the context-length buckets `input_lens` (tokens):
- `long_doc`: a passage of an Austen novel, a Shakespeare play or a KJV book (PG-19 stand-in; the
  corpora of `corpora.py`; absent ones are skipped with a warning, the stdlib's pydoc topics are the
  last resort), cut at a paragraph start, for the model to continue;
- `code`: `code_completion_prompt` over installed packages;
- `needle`: needle-in-a-haystack: a random fact ("The special magic number for <city> is <7
  digits>.") planted at a random depth of long-document text, then a question that asks for it;
  `Sample.expected` holds the answer;
- `random`: random vocabulary tokens (vLLM's `random`; for tiny test models).
The same (name, tokenizer, sizes, seed) gives the same prompts.
"""

from __future__ import annotations

import importlib.util
import random
import re
from dataclasses import dataclass
from pathlib import Path

from specray.models.tokenizer import Tokenizer

_BOUNDARY = re.compile(r"\n(?=(?:    )?def \w)")


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    source: str  # the file whose continuation is asked for
    cut_at: int  # character offset of the cut in that file


def package_root(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {package!r} is not installed as a package directory")
    return Path(next(iter(spec.submodule_search_locations)))


def code_completion_prompt(tokenizer: Tokenizer, num_tokens: int, package: str = "transformers",
                           seed: int = 0) -> Prompt:
    root = package_root(package)
    files = sorted(p for p in root.rglob("*.py") if p.stat().st_size > 2000)
    rng = random.Random(seed)
    rng.shuffle(files)
    for current in files:
        text = current.read_text(errors="replace")
        cuts = [m.start() for m in _BOUNDARY.finditer(text) if m.start() > len(text) // 2]
        if len(cuts) >= 2:
            break
    else:
        raise ValueError(f"no Python file of {package} has a function boundary to cut at")
    cut = rng.choice(cuts[:-1])
    tail = f"# file: {current.relative_to(root.parent)}\n{text[:cut + 1]}"
    tail_ids = tokenizer.encode(tail, add_special_tokens=False)
    context: list[int] = []
    siblings = sorted(current.parent.glob("*.py")) + files  # same folder first, then the package
    need = num_tokens - len(tail_ids)
    for f in siblings:
        if need - len(context) <= 0:
            break
        if f == current:
            continue
        ids = tokenizer.encode(f"# file: {f.relative_to(root.parent)}\n{f.read_text(errors='replace')}\n",
                               add_special_tokens=False)
        context = ids + context  # earlier files further from the cut
    ids = (context + tail_ids)[-num_tokens:]
    if len(ids) < num_tokens:
        raise ValueError(f"{package} has only {len(ids)} tokens of Python source; asked for {num_tokens}")
    return Prompt(ids, str(current), cut)


# --- datasets for the load generator -----------------------------------------------------------------

DATASETS = ("long_doc", "code", "needle", "random")
LONG_DOC_CORPORA = ("austen", "shakespeare", "kjv")
CODE_PACKAGES = ("transformers", "torch", "numpy", "ray", "mlflow")
_CITIES = ("Lisbon", "Nairobi", "Osaka", "Quito", "Tromso", "Hanoi", "Tbilisi", "Valparaiso", "Reykjavik", "Dakar")


@dataclass(frozen=True)
class Sample:
    prompt: str  # the text sent over HTTP (decoded from token_ids)
    token_ids: list[int]
    bucket: int  # the requested context length in tokens
    dataset: str
    source: str  # corpus/document or file the prompt came from
    expected: str | None = None  # needle: the planted answer

    @property
    def prompt_len(self) -> int:
        return len(self.token_ids)


def load_tokenizer(ref: str) -> Tokenizer:
    """A registry name, HF directory or GGUF file -> its tokenizer."""
    from specray.models.registry import resolve

    path = resolve(ref)
    return Tokenizer.from_hf_dir(path) if path.is_dir() else Tokenizer.from_gguf(path)


Docs = list[list[tuple[str, str]]]  # per corpus: (corpus/document, text)


def _long_docs(corpora: tuple[str, ...]) -> Docs:
    import warnings

    from specray.pipelines.corpora import CorpusUnavailable, load_corpus

    docs: Docs = []
    for c in corpora:
        try:
            docs.append([(f"{c}/{d.name}", d.text) for d in load_corpus(c) if len(d.text) > 2000])
        except CorpusUnavailable as e:
            warnings.warn(f"skipping corpus {c}: {e}", stacklevel=3)
    if not docs:
        warnings.warn(f"none of {', '.join(corpora)} is installed; using the stdlib's pydoc topics", stacklevel=3)
        docs = [[("pydoc/" + d.name, d.text) for d in load_corpus("pydoc")]]
    return docs


def _passage(tokenizer: Tokenizer, corpora: Docs, n: int, rng: random.Random) -> tuple[list[int], str]:
    """`n` tokens of running text from a random paragraph start of a random document of a random corpus;
    the corpus's next documents are appended when one is short."""
    docs = corpora[rng.randrange(len(corpora))]
    name, text = docs[rng.randrange(len(docs))]
    paras = [m.end() for m in re.finditer(r"\n\s*\n", text)] or [0]
    start = rng.choice(paras[: max(1, len(paras) * 3 // 4)])
    ids: list[int] = []
    chars = 6 * n + 200  # enough characters for n tokens of English
    piece, i = text[start: start + chars], 0
    while True:
        ids += tokenizer.encode(piece, add_special_tokens=False)
        if len(ids) >= n:
            return ids[:n], name
        i += 1
        if i > 4 * len(docs) + 8:
            raise ValueError(f"the corpora hold fewer than {n} tokens")
        name2, text2 = docs[(docs.index((name, text)) + i) % len(docs)]
        piece = "\n\n" + text2[: chars]
        name = f"{name}+{name2.split('/')[-1]}"


def _needle(tokenizer: Tokenizer, docs: Docs, n: int,
            rng: random.Random) -> tuple[list[int], str, str]:
    city, number = rng.choice(_CITIES), f"{rng.randrange(10**6, 10**7)}"
    fact = tokenizer.encode(f" The special magic number for {city} is {number}. ", add_special_tokens=False)
    question = tokenizer.encode(f"\n\nWhat is the special magic number for {city} mentioned in the text above? "
                                f"The special magic number for {city} is", add_special_tokens=False)
    room = n - len(fact) - len(question)
    if room < 16:
        raise ValueError(f"input length {n} is too short for a needle prompt (needs > {n - room + 16} tokens)")
    hay, name = _passage(tokenizer, docs, room, rng)
    depth = rng.random()
    at = int(depth * len(hay))
    return hay[:at] + fact + hay[at:] + question, f"{name}@depth={depth:.2f}", number


def _settle(tokenizer: Tokenizer, ids: list[int], n: int, rng: random.Random, pool: list[int]) -> list[int]:
    """Random ids whose decoded text re-tokenises to `n` tokens (decode/encode is not an identity)."""
    for _ in range(8):
        again = tokenizer.encode(tokenizer.decode(ids, skip_special_tokens=True), add_special_tokens=False)
        if len(again) == n:
            return again
        ids = again[:n] + [rng.choice(pool) for _ in range(n - len(again))]
    return ids


def build_dataset(name: str, tokenizer: Tokenizer, num_prompts: int, input_lens: int | list[int], seed: int = 0,
                  corpora: tuple[str, ...] = LONG_DOC_CORPORA,
                  packages: tuple[str, ...] = CODE_PACKAGES) -> list[Sample]:
    """`num_prompts` prompts of dataset `name`, round-robin over the buckets `input_lens` (tokens)."""
    if name not in DATASETS:
        raise ValueError(f"--dataset-name must be one of {', '.join(DATASETS)}; got {name!r}")
    lens = [input_lens] if isinstance(input_lens, int) else list(input_lens)
    if not lens or any(n < 8 for n in lens):
        raise ValueError(f"--input-len buckets must be >= 8 tokens, got {lens}")
    if num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {num_prompts}")
    rng = random.Random(f"{name}:{seed}")
    docs = _long_docs(corpora) if name in ("long_doc", "needle") else []
    installed = [p for p in packages if importlib.util.find_spec(p) is not None] if name == "code" else []
    if name == "code" and not installed:
        raise ValueError(f"none of the packages {', '.join(packages)} is installed for the code dataset")
    specials = set(tokenizer.hf.all_special_ids)
    pool = [t for t in range(min(tokenizer.vocab_size, 1 << 17)) if t not in specials] if name == "random" else []
    out: list[Sample] = []
    for i in range(num_prompts):
        n = lens[i % len(lens)]
        expected = None
        if name == "long_doc":
            ids, source = _passage(tokenizer, docs, n, rng)
        elif name == "needle":
            ids, source, expected = _needle(tokenizer, docs, n, rng)
        elif name == "code":
            p = code_completion_prompt(tokenizer, n, package=rng.choice(installed), seed=rng.randrange(2**31))
            ids, source = p.token_ids, f"{p.source}@{p.cut_at}"
        else:
            ids, source = _settle(tokenizer, [rng.choice(pool) for _ in range(n)], n, rng, pool), "random"
        out.append(Sample(tokenizer.decode(ids, skip_special_tokens=True), ids, n, name, source, expected))
    return out
