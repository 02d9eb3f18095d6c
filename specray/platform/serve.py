"""Ray Serve: one deployment class per engine (`SpecrayServer`), builders, and `specray serve`.

`SpecrayServer` owns one replica's engine: it builds an `LLMEngine` from an `EngineConfig` mapping
(through `engine_factory`), wraps it in an `AsyncLLMEngine` and an `OpenAIServing`, and exposes it

- over HTTP (`__call__`, the app's ingress when deployed alone), and
- to other deployments (the A/B ingress) through the streaming handle method `dispatch`, which
  yields one head dict `{status, headers, media_type}` and then bytes body chunks.

Both go through `OpenAIServing.handle`, so responses, errors and metrics are the same either way.
The class is not decorated: `build_server` decorates and binds it with the replica resources from
`deployment_options` (the engine config decides: one GPU when the engine runs on CUDA, else CPU
only), the Ray Serve LLM builder pattern. `build_app(args)` is the `serve run config.yaml` entry
point (`import_path: specray.platform.serve:build_app`).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specray.config import EngineConfig, load_engine_config
from specray.errors import ConfigError

if TYPE_CHECKING:
    from ray.serve import Application

    from specray.engine.llm_engine import LLMEngine

DEFAULT_ENGINE: dict[str, Any] = {"model": "smollm2-135m", "speculative_config": {"method": "sparse_self"}}
_APP_ARGS = ("engine", "config", "served_model_name", "arm", "num_replicas", "ray_actor_options",
             "max_ongoing_requests", "name")


def is_distributed(config: EngineConfig) -> bool:
    """Tensor-parallel targets and separate draft actors run as a `specray.actors.DistributedEngine`."""
    spec = config.speculative_config
    return config.tensor_parallel_size > 1 or (spec is not None and spec.draft_placement == "separate")


def engine_factory(config: EngineConfig) -> LLMEngine:
    """Build the engine of one replica: in process, or a `DistributedEngine` (same methods) whose shard
    and draft actors hold the GPUs of their own placement group."""
    if is_distributed(config):
        from specray.actors.engine import DistributedEngine

        return DistributedEngine.from_config(config)
    from specray.engine.llm_engine import LLMEngine

    return LLMEngine(config)


def _cluster_has_gpu() -> bool:
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    import torch

    return torch.cuda.is_available()


def deployment_options(config: EngineConfig) -> dict[str, Any]:
    """Replica resources from the engine's placement: `num_gpus=1` when the engine will run on CUDA
    (device `cuda`, or `auto` on a cluster with GPUs), otherwise one CPU and no GPU. A distributed engine's
    replica takes no GPU: its placement group's bundles hold them."""
    if is_distributed(config):
        return {"num_cpus": 1, "num_gpus": 0}
    use_gpu = config.device == "cuda" or (config.device == "auto" and _cluster_has_gpu())
    return {"num_cpus": 1, "num_gpus": 1 if use_gpu else 0}


class SpecrayServer:
    """One replica: an engine behind the OpenAI API."""

    def __init__(self, engine_config: dict[str, Any], served_model_name: str, arm: str = "default"):
        from specray.engine.async_engine import AsyncLLMEngine
        from specray.platform.openai_app import OpenAIServing

        self.config = load_engine_config(dict(engine_config))
        self.engine = engine_factory(self.config)
        self.async_engine = AsyncLLMEngine(self.engine)
        self.serving = OpenAIServing(self.async_engine, served_model_name, arm)

    async def __call__(self, request: Any) -> Any:
        """HTTP ingress (a Starlette request from the Serve proxy)."""
        from specray.platform.openai_app import respond

        return await respond(self.serving, request)

    async def dispatch(self, method: str, path: str, body: bytes,
                       headers: dict[str, str]) -> AsyncIterator[dict[str, Any] | bytes]:
        """For other deployments, via `dispatch_stream(handle, ...)`, i.e.
        `handle.options(stream=True, method_name="dispatch").remote(...)` (NOTE: `handle.dispatch` is
        Ray's own `DeploymentHandle.dispatch` since Ray 2.5x, so attribute access does not reach us). Yields
        `dict(status=int, headers=dict[str, str], media_type=str)` first, then `bytes` body chunks
        (one for a JSON response, one per SSE event for a stream). Cancelling the call aborts the
        request and frees its KV pages."""
        agen = self.serving.handle(method, path, body, headers)
        try:
            async for item in agen:
                yield item
        finally:
            await agen.aclose()

    def pages_in_use(self) -> int:
        """KV pages held by live requests (also the `specray:kv_cache_pages_in_use` gauge)."""
        return self.engine.pages_in_use()

    def check_health(self) -> None:
        """Serve's replica health check: a failed engine loop marks the replica unhealthy."""
        if self.async_engine.errored is not None:
            raise RuntimeError(f"engine failed: {self.async_engine.errored!r}")


def dispatch_stream(handle: Any, method: str, path: str, body: bytes, headers: dict[str, str]) -> Any:
    """Call `SpecrayServer.dispatch` through a deployment handle; returns the streaming response
    (iterate it, sync or async: a head dict, then bytes). Cancelling it aborts the engine request."""
    return handle.options(stream=True, method_name="dispatch").remote(method, path, body, headers)


def _deployment_name(arm: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in arm)
    return "SpecrayServer" if arm == "default" else f"SpecrayServer_{safe}"


def build_server(engine_cfg: dict[str, Any], served_model_name: str, arm: str = "default", num_replicas: int = 1,
                 *, name: str | None = None, ray_actor_options: dict[str, Any] | None = None,
                 max_ongoing_requests: int | None = None) -> Application:
    """A bound `SpecrayServer` deployment for one engine (one A/B arm). The config is validated here,
    so a bad field fails before any replica starts."""
    from ray import serve

    if num_replicas < 1:
        raise ConfigError(f"num_replicas must be >= 1, got {num_replicas}")
    cfg = load_engine_config(dict(engine_cfg))
    actor_opts = deployment_options(cfg)
    actor_opts.update(ray_actor_options or {})
    if max_ongoing_requests is None:  # the engine batches and queues; Serve must not throttle below that
        max_ongoing_requests = max(64, 2 * cfg.scheduler.max_num_seqs)
    deployment = serve.deployment(SpecrayServer).options(
        name=name or _deployment_name(arm), num_replicas=num_replicas, ray_actor_options=actor_opts,
        max_ongoing_requests=max_ongoing_requests, health_check_period_s=10,
    )
    return deployment.bind(dict(engine_cfg), served_model_name, arm)


def _engine_mapping(args: dict[str, Any]) -> dict[str, Any]:
    if "engine" in args and "config" in args:
        raise ConfigError("build_app args: give either `engine` (a mapping) or `config` (a file path), not both")
    if "config" in args:
        path = Path(args["config"])
        if not path.exists():
            raise ConfigError(f"build_app args.config: file {path} does not exist")
        import yaml

        data = yaml.safe_load(path.read_text()) or {}
        data = data.get("engine", data) if isinstance(data, dict) else data
    else:
        data = args.get("engine", DEFAULT_ENGINE)
    if not isinstance(data, dict):
        raise ConfigError(f"build_app args.engine must be a mapping, got {type(data).__name__}")
    load_engine_config(data)  # validate: errors name the field
    return data


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The `serve run` entry point. Args (all optional):

    engine: EngineConfig mapping (default: smollm2-135m with sparse_self speculation)
    config: path to a YAML/JSON engine config instead of `engine`
    served_model_name: the OpenAI `model` name (default: the engine's `model` string)
    arm, num_replicas, ray_actor_options, max_ongoing_requests, name: deployment options

    YAML::

        applications:
          - name: specray
            route_prefix: /
            import_path: specray.platform.serve:build_app
            args:
              engine: {model: smollm2-135m, speculative_config: {method: sparse_self}}
              served_model_name: smollm2-135m
    """
    args = dict(args or {})
    unknown = sorted(set(args) - set(_APP_ARGS))
    if unknown:
        raise ConfigError(f"unknown build_app arg {unknown[0]!r}; known: {', '.join(_APP_ARGS)}")
    engine = _engine_mapping(args)
    name = args.get("served_model_name") or str(engine.get("model", EngineConfig.model))
    return build_server(engine, name, args.get("arm", "default"), int(args.get("num_replicas", 1)),
                        name=args.get("name"), ray_actor_options=args.get("ray_actor_options"),
                        max_ongoing_requests=args.get("max_ongoing_requests"))


def run_blocking(apps: list[tuple[str, str, Application]], host: str, port: int) -> None:
    """Start Ray and Serve on this machine, run `(name, route_prefix, app)` entries, block until
    Ctrl-C or SIGTERM, then shut Serve and Ray down. Used by `specray serve`."""
    import signal
    import time

    import ray
    from ray import serve

    def _term(signum, frame):  # SIGTERM: leave the loop like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    ray.init(include_dashboard=False, num_cpus=os.cpu_count(), ignore_reinit_error=True)
    try:
        serve.start(http_options={"host": host, "port": port})
        for name, prefix, app in apps:
            serve.run(app, name=name, route_prefix=prefix, blocking=False)
        print(f"[specray] serving on http://{host}:{port} (Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("[specray] shutting down", flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def apps_from_config(path: str | Path) -> tuple[list[tuple[str, str, Application]], dict[str, Any]]:
    """Read a Ray Serve config (`applications:` list) or a plain engine config file into applications
    for `run_blocking`; also returns the file's `http_options` (may be empty)."""
    import importlib

    import yaml
    from ray.serve import Application

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping")
    if "applications" not in data:  # an engine config
        return [("specray", "/", build_app({"config": str(path)}))], {}
    apps = []
    for i, entry in enumerate(data["applications"] or []):
        if not isinstance(entry, dict) or "import_path" not in entry:
            raise ConfigError(f"{path}: applications[{i}] needs an import_path")
        module, _, attr = entry["import_path"].replace(":", ".").rpartition(".")
        try:
            target = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"{path}: applications[{i}].import_path {entry['import_path']!r}: {e}") from None
        app = target if isinstance(target, Application) else target(entry.get("args") or {})
        apps.append((entry.get("name", f"app{i}"), entry.get("route_prefix", "/"), app))
    return apps, dict(data.get("http_options") or {})


def _cmd_serve(args: Any) -> int:
    import json

    if args.config:
        apps, http = apps_from_config(args.config)
    else:
        try:
            spec = json.loads(args.speculative_config) if args.speculative_config else None
        except json.JSONDecodeError as e:
            raise ConfigError(f"--speculative-config is not valid JSON: {e}") from None
        engine: dict[str, Any] = {"model": args.model, "device": args.device, "speculative_config": spec}
        if args.max_model_len:
            engine["scheduler"] = {"max_model_len": args.max_model_len}
        app = build_app({"engine": engine, "served_model_name": args.served_model_name or args.model,
                         "num_replicas": args.num_replicas})
        apps, http = [("specray", "/", app)], {}
    host = args.host or http.get("host") or "127.0.0.1"
    port = int(args.port or http.get("port") or 8000)
    run_blocking(apps, host, port)
    return 0


def add_serve_parser(sub: Any) -> None:
    """`specray serve [CONFIG]`: wraps `serve run` (CONFIG: a Ray Serve config with `applications:`,
    or an engine config); without CONFIG serves --model with sparse_self speculation."""
    s = sub.add_parser("serve", help="serve the OpenAI-compatible API on Ray Serve (blocks until Ctrl-C)",
                       description=add_serve_parser.__doc__)
    s.add_argument("config", nargs="?", help="Ray Serve config YAML (applications: ...) or an engine config file")
    s.add_argument("--host", default=None, help="bind address (default 127.0.0.1, or the config's http_options)")
    s.add_argument("--port", type=int, default=None, help="port (default 8000, or the config's http_options)")
    s.add_argument("--model", default="smollm2-135m", help="registry name, HF directory or .gguf file")
    s.add_argument("--served-model-name", default=None, help="the OpenAI `model` name (default: --model)")
    s.add_argument("--speculative-config", default='{"method": "sparse_self"}',
                   help="speculative_config as JSON (vLLM style); '' for none")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--max-model-len", type=int, default=None)
    s.add_argument("--num-replicas", type=int, default=1)
    s.set_defaults(func=_cmd_serve)
