"""The exception types specray raises for bad input; each message names the field or the numbers.

Every error a user can cause derives from `SpecrayError`. The serving layer maps them to HTTP codes:
`ConfigError`/`RequestError` -> 400, `ModelNotFoundError` -> 404.
"""

from __future__ import annotations


class SpecrayError(Exception):
    """Base class of all errors specray raises on purpose."""


class ConfigError(SpecrayError, ValueError):
    """A configuration field has an invalid value; the message names the field."""


class RequestError(SpecrayError, ValueError):
    """A request is invalid (sampling parameter out of range, prompt too long, ...)."""


class PromptTooLongError(RequestError):
    """The prompt (plus room for one generated token) exceeds `max_model_len` or the KV capacity."""


class UnsupportedModelError(SpecrayError, ValueError):
    """The checkpoint uses an architecture or a quantization type specray does not implement."""


class CheckpointError(SpecrayError):
    """A checkpoint is incomplete or corrupt: truncated file, missing tensor, missing tokenizer."""


class ModelNotFoundError(SpecrayError, FileNotFoundError):
    """Neither a path nor a known registry name."""
