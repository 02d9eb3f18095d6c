"""specray: lossless speculative decoding for long-context LLMs, served on Ray.

The public entry points are re-exported lazily here so that `import specray` stays cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["LLMEngine", "AsyncLLMEngine", "EngineConfig", "SamplingParams", "__version__"]


def __getattr__(name: str):  # lazy re-exports
    if name == "LLMEngine":
        from specray.engine.llm_engine import LLMEngine

        return LLMEngine
    if name == "AsyncLLMEngine":
        from specray.engine.async_engine import AsyncLLMEngine

        return AsyncLLMEngine
    if name == "EngineConfig":
        from specray.config import EngineConfig

        return EngineConfig
    if name == "SamplingParams":
        from specray.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
