"""Config loading errors name the field; the CLI runs generate on a tiny checkpoint."""

from __future__ import annotations

import pytest

from specray.cli import main
from specray.config import load_engine_config
from specray.errors import ConfigError
from tests.support.tiny import make_checkpoint


def test_yaml_config_roundtrip_and_errors(tmp_path):
    f = tmp_path / "engine.yaml"
    f.write_text("engine:\n  model: /x\n  cache: {page_size: 8, num_pages: 10}\n  scheduler: {max_model_len: 64}\n")
    cfg = load_engine_config(f)
    assert cfg.cache.page_size == 8 and cfg.scheduler.max_model_len == 64
    with pytest.raises(ConfigError, match="cache.page_size"):
        load_engine_config({"cache": {"page_size": 12}})
    with pytest.raises(ConfigError, match="unknown field scheduler.max_seqs"):
        load_engine_config({"scheduler": {"max_seqs": 3}})
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        load_engine_config({"cache": {"gpu_memory_utilization": 1.5}})
    with pytest.raises(ConfigError, match="dtype"):
        load_engine_config({"dtype": "fp8"})


def test_cli_generate(tmp_path, capsys):
    path = make_checkpoint(tmp_path / "m", "llama")
    rc = main(["generate", "--model", str(path), "--prompt", "w5 w6 w7", "--max-tokens", "5", "--device", "cpu"])
    assert rc == 0
    captured = capsys.readouterr()
    assert len(captured.out.split()) == 5 or "finish_reason=stop" in captured.err
    assert "tok/s" in captured.err


def test_cli_reports_errors(tmp_path, capsys):
    rc = main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"])
    assert rc == 2
    assert "nope" in capsys.readouterr().err
