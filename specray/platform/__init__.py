"""Serving: the OpenAI-compatible app (`openai_app`, `protocol`), Prometheus metrics (`metrics`), Ray Serve
deployments and builders (`serve`) and the A/B experiment ingress (`experiments`).

Names are resolved lazily, so importing `specray.platform` does not import torch, Ray or FastAPI.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "OpenAIServing": "specray.platform.openai_app",
    "make_fastapi_app": "specray.platform.openai_app",
    "ServerMetrics": "specray.platform.metrics",
    "SpecrayServer": "specray.platform.serve",
    "build_app": "specray.platform.serve",
    "build_server": "specray.platform.serve",
    "dispatch_stream": "specray.platform.serve",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'specray.platform' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
