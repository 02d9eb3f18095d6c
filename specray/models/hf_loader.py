"""Load a Hugging Face checkpoint directory: config.json, (sharded) safetensors, tokenizer, generation config.

Owns the mapping from tensor name to the safetensors file holding it; tensors are read lazily, one
at a time (`SafetensorsWeightSource.get`), so a tensor-parallel rank can later read only its slices.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from specray.errors import CheckpointError
from specray.models.checkpoint import Checkpoint, GenerationDefaults
from specray.models.tokenizer import Tokenizer


def _check_safetensors_file(path: Path) -> list[str]:
    """Validate the header and that the file holds every byte the header promises; return names."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is truncated: {size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", raw)
        if 8 + header_len > size:
            raise CheckpointError(
                f"{path} is truncated: header says {header_len} header bytes, file has {size} bytes"
            )
        try:
            header = json.loads(f.read(header_len))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} has a corrupt safetensors header: {e}") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    expected = 8 + header_len + end
    if size < expected:
        raise CheckpointError(f"{path} is truncated: expected {expected} bytes, found {size}")
    return [k for k in header if k != "__metadata__"]


class SafetensorsWeightSource:
    def __init__(self, files: list[Path]):
        self._where: dict[str, Path] = {}
        for f in files:
            for name in _check_safetensors_file(f):
                self._where[name] = f
        self._handles: dict[Path, Any] = {}

    def names(self):
        return self._where.keys()

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return self._handles[path]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(self._where[name]).get_tensor(name)

    def get_slice(self, name: str):
        """A lazy slice view (`[a:b]` indexing reads only those rows)."""
        return self._handle(self._where[name]).get_slice(name)


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{path}: shards listed in the index are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors files")
    return files


def _generation_defaults(path: Path, cfg: dict[str, Any]) -> GenerationDefaults:
    gen: dict[str, Any] = {}
    gpath = path / "generation_config.json"
    if gpath.exists():
        gen = json.loads(gpath.read_text())
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    eos_ids = () if eos is None else ((eos,) if isinstance(eos, int) else tuple(eos))
    sampling = {k: gen[k] for k in ("temperature", "top_p", "top_k", "min_p") if k in gen}
    return GenerationDefaults(eos_token_ids=eos_ids, bos_token_id=gen.get("bos_token_id", cfg.get("bos_token_id")),
                              sampling=sampling)


def load_hf_dir(path: str | Path, load_tokenizer: bool = True) -> Checkpoint:
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{path} has no config.json")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from None
    weights = SafetensorsWeightSource(_safetensors_files(path))
    tokenizer = Tokenizer.from_hf_dir(path) if load_tokenizer else None
    return Checkpoint(
        path=str(path), hf_config=cfg, weights=weights, tokenizer=tokenizer,
        generation=_generation_defaults(path, cfg), format="hf",
    )
