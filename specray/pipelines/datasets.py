"""Benchmark prompts built from real text and code found on the machine (no downloads).

Owns nothing persistent: each builder returns token-id prompts of a requested length.
`code_completion_prompt`: repo-level code completion (RepoBench/LCC stand-in). The last part is a
Python file of an installed package cut at a function boundary; before it come the package's other
files, each under a `# file: <path>` header, until the prompt has the requested number of tokens
(the oldest context is cut from the front).
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
