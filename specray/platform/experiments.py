"""A/B experiments: the experiment YAML, sticky arm assignment, and the Ray Serve ingress in front of the arms.

Owns the experiment definition (`Experiment`, loaded and validated from YAML with errors that name
the field) and, in the ingress replica, the per-arm request counts. Data flow of one request:

    client -> ExperimentIngress (FastAPI on Ray Serve) --assign(user | x-session-id)--> arm handle
           -> SpecrayServer.dispatch (one deployment per arm, `serve.py`) -> head dict, body chunks
           -> streamed back with `x-specray-arm: <arm>`

Assignment is sticky and deterministic: u = sha256("<experiment>\\0<key>") as a uniform number in
[0, 1), and the arm is the first whose cumulative normalised weight exceeds u. The key is the
request's `user` field, else its `x-session-id` header; a request with neither is assigned at random
(and counted as `unkeyed`). Each arm is its own deployment with its own speculation config and
replicas (Ray Serve has no weighted traffic split; see `reference/ecosystem.md` A1.2).

`build_experiment_app(args)` is the `serve run` entry point
(`import_path: specray.platform.experiments:build_experiment_app`, `args: {experiment: path}`).
"""

# no `from __future__ import annotations`: FastAPI resolves the ingress's `Request` annotations at
# definition time, inside `_ingress_class`, where `Request` is a local name
import copy
import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from specray.errors import ConfigError

if TYPE_CHECKING:
    from ray.serve import Application

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ROUTES = ("/v1/completions", "/v1/chat/completions")


@dataclass(frozen=True)
class Arm:
    name: str
    weight: float  # normalised: the weights of an experiment sum to 1
    engine: dict[str, Any]  # the arm's full EngineConfig mapping (experiment engine + overrides)
    replicas: int = 1


@dataclass(frozen=True)
class Experiment:
    name: str
    model: str  # the OpenAI `model` name every arm serves
    arms: tuple[Arm, ...]
    control: str  # the arm the others are compared against (default: the first)
    traffic: dict[str, Any] = field(default_factory=dict)  # load-generator settings for `specray ab run`
    decision: dict[str, Any] = field(default_factory=dict)  # statistics settings for `specray ab run`

    def arm(self, name: str) -> "Arm":
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "control": self.control, "traffic": self.traffic,
                "decision": self.decision,
                "arms": [{"name": a.name, "weight": a.weight, "replicas": a.replicas, "engine": a.engine}
                         for a in self.arms]}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _need(d: dict[str, Any], key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    if key not in d:
        raise ConfigError(f"{where}{key} is required")
    if not isinstance(d[key], kind) or isinstance(d[key], bool) and kind is not bool:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{where}{key} must be {names}, got {type(d[key]).__name__} {d[key]!r}")
    return d[key]


_TOP = ("name", "model", "served_model_name", "engine", "arms", "control", "traffic", "decision")
_ARM = ("name", "weight", "replicas", "speculative_config", "engine")


def load_experiment(source: str | Path | dict[str, Any]) -> Experiment:
    """Validate an experiment from a YAML file or a mapping. Each arm's engine = `engine` (shared, with
    `model` defaulting to the top-level `model`) deep-merged with the arm's `engine` overrides and its
    `speculative_config`; it is checked with `load_engine_config` so a bad field fails here."""
    from specray.config import load_engine_config

    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"experiment file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse experiment file {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"an experiment must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_TOP))
    if unknown:
        raise ConfigError(f"unknown experiment field {unknown[0]!r}; known: {', '.join(_TOP)}")
    name = _need(data, "name", "", str)
    if not _NAME.match(name):
        raise ConfigError(f"name must match {_NAME.pattern} (it names the MLflow experiment), got {name!r}")
    base = dict(data.get("engine") or {})
    if not isinstance(base, dict):
        raise ConfigError(f"engine must be a mapping, got {type(base).__name__}")
    if "model" in data:
        base.setdefault("model", _need(data, "model", "", str))
    if "model" not in base:
        raise ConfigError("model is required (the checkpoint every arm serves), at the top level or in engine")
    served = data.get("served_model_name") or str(base["model"])
    arms_raw = _need(data, "arms", "", list)
    if len(arms_raw) < 2:
        raise ConfigError(f"arms must list at least 2 arms, got {len(arms_raw)}")
    arms: list[Arm] = []
    for i, raw in enumerate(arms_raw):
        where = f"arms[{i}]."
        if not isinstance(raw, dict):
            raise ConfigError(f"arms[{i}] must be a mapping, got {type(raw).__name__}")
        bad = sorted(set(raw) - set(_ARM))
        if bad:
            raise ConfigError(f"unknown field {where}{bad[0]}; known: {', '.join(_ARM)}")
        arm_name = _need(raw, "name", where, str)
        if not _NAME.match(arm_name):
            raise ConfigError(f"{where}name must match {_NAME.pattern}, got {arm_name!r}")
        if any(a.name == arm_name for a in arms):
            raise ConfigError(f"{where}name {arm_name!r} is used by two arms")
        weight = float(_need(raw, "weight", where, (int, float)))
        if not weight > 0:
            raise ConfigError(f"{where}weight must be > 0, got {weight}")
        replicas = int(raw.get("replicas", 1)) if not isinstance(raw.get("replicas", 1), bool) else 0
        if replicas < 1:
            raise ConfigError(f"{where}replicas must be an integer >= 1, got {raw.get('replicas')!r}")
        engine = _merge(base, dict(raw.get("engine") or {}))
        if "speculative_config" in raw:
            engine["speculative_config"] = copy.deepcopy(raw["speculative_config"])
        try:
            load_engine_config(engine)
        except ConfigError as e:
            raise ConfigError(f"arms[{i}] ({arm_name}): {e}") from None
        arms.append(Arm(arm_name, weight, engine, replicas))
    total = sum(a.weight for a in arms)
    arms = [Arm(a.name, a.weight / total, a.engine, a.replicas) for a in arms]
    control = data.get("control", arms[0].name)
    if control not in [a.name for a in arms]:
        raise ConfigError(f"control must name an arm ({', '.join(a.name for a in arms)}), got {control!r}")
    for key in ("traffic", "decision"):
        if not isinstance(data.get(key) or {}, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(data[key]).__name__}")
    return Experiment(name, served, tuple(arms), control, dict(data.get("traffic") or {}),
                      dict(data.get("decision") or {}))


def assignment_point(experiment: str, key: str) -> float:
    """sha256 of (experiment, key) as a uniform number in [0, 1)."""
    digest = hashlib.sha256(f"{experiment}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign(experiment: Experiment, key: str | None) -> str:
    """The arm of `key` (sticky); a random arm (by weight) when there is no key."""
    u = assignment_point(experiment.name, key if key is not None else uuid.uuid4().hex)
    acc = 0.0
    for a in experiment.arms:
        acc += a.weight
        if u < acc:
            return a.name
    return experiment.arms[-1].name  # rounding of the cumulative sum


def request_key(body: bytes, headers: dict[str, str]) -> str | None:
    """The request's `user` field, else its `x-session-id` header, else None."""
    try:
        user = json.loads(body).get("user") if body else None
    except (ValueError, AttributeError):
        user = None
    if isinstance(user, str) and user:
        return "user:" + user
    session = {k.lower(): v for k, v in headers.items()}.get("x-session-id")
    return "session:" + session if session else None


def merge_prometheus(texts: dict[str, str]) -> str:
    """Merge the Prometheus text of several arms into one valid exposition: one HELP/TYPE per family,
    each family's samples together; samples without an `arm` label get one (so no series repeats)."""
    families: dict[str, dict[str, Any]] = {}
    for arm, text in texts.items():
        current: dict[str, Any] | None = None
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                fam = line.split(" ", 3)[2]
                current = families.setdefault(fam, {"help": None, "type": None, "samples": []})
                current["help" if line.startswith("# HELP") else "type"] = line
                continue
            if line.startswith("#"):
                continue
            if current is None:
                current = families.setdefault(line.split("{")[0].split(" ")[0],
                                              {"help": None, "type": None, "samples": []})
            if 'arm="' not in line:
                name, rest = re.match(r"^([^{\s]+)(.*)$", line).groups()
                if rest.startswith("{"):
                    rest = "{" + f'arm="{arm}",' + rest[1:]
                else:
                    rest = "{" + f'arm="{arm}"' + "}" + rest
                line = name + rest
            current["samples"].append(line)
    out: list[str] = []
    for fam in families.values():
        out += [x for x in (fam["help"], fam["type"]) if x] + fam["samples"]
    return "\n".join(out) + "\n"


def _ingress_class() -> type:
    """The FastAPI ingress class (built lazily so importing this module needs neither Ray nor FastAPI)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from ray import serve

    app = FastAPI(title="specray experiment ingress")

    @serve.ingress(app)
    class ExperimentIngress:
        def __init__(self, experiment: dict[str, Any], handles: dict[str, Any]):
            self.experiment = load_experiment_dict(experiment)
            self.handles = handles  # arm name -> DeploymentHandle of its SpecrayServer
            self.counts: dict[str, int] = {a.name: 0 for a in self.experiment.arms}
            self.status_counts: dict[str, dict[str, int]] = {a.name: {} for a in self.experiment.arms}
            self.unkeyed = 0

        async def _forward(self, arm: str, method: str, path: str, body: bytes,
                           headers: dict[str, str]) -> tuple[dict[str, Any], Any]:
            # NOTE: `handle.dispatch` is DeploymentHandle's own method in Ray >= 2.5x, so the deployment's
            # `dispatch` is named through `method_name`
            handle = self.handles[arm].options(method_name="dispatch", stream=True)
            stream = handle.remote(method, path, body, headers)
            head = await stream.__anext__()
            return head, stream

        @app.post("/v1/completions")
        @app.post("/v1/chat/completions")
        async def generate(self, request: Request):
            body = await request.body()
            headers = dict(request.headers)
            key = request_key(body, headers)
            self.unkeyed += key is None
            arm = assign(self.experiment, key)
            self.counts[arm] += 1
            head, stream = await self._forward(arm, "POST", request.url.path, body, headers)
            status = str(head["status"])
            self.status_counts[arm][status] = self.status_counts[arm].get(status, 0) + 1
            # the Serve proxy sets its own x-request-id; the OpenAI id is in the body
            arm_headers = {k: v for k, v in head.get("headers", {}).items() if k.lower() != "x-request-id"}
            out_headers = {**arm_headers, "x-specray-arm": arm,
                           "x-specray-experiment": self.experiment.name}
            if head.get("media_type") != "text/event-stream":
                body_out = b"".join([c async for c in stream])
                return Response(body_out, status_code=head["status"], headers=out_headers,
                                media_type=head.get("media_type"))

            async def body_iter():
                done = False
                try:
                    async for chunk in stream:
                        yield chunk
                    done = True
                finally:
                    if not done:
                        stream.cancel()  # the client went away: the arm aborts the request and frees its pages

            return StreamingResponse(body_iter(), status_code=head["status"], headers=out_headers,
                                     media_type=head.get("media_type"))

        async def _collect(self, arm: str, path: str) -> tuple[int, bytes]:
            head, stream = await self._forward(arm, "GET", path, b"", {})
            return head["status"], b"".join([c async for c in stream])

        @app.get("/v1/models")
        async def models(self):
            status, body = await self._collect(self.experiment.control, "/v1/models")
            return Response(body, status_code=status, media_type="application/json")

        @app.get("/health")
        async def health(self):
            bad = {}
            for arm in self.handles:
                try:
                    status, body = await self._collect(arm, "/health")
                except Exception as e:  # noqa: BLE001 - a dead arm is reported, not raised
                    status, body = 503, str(e).encode()
                if status != 200:
                    bad[arm] = body.decode(errors="replace")[:500]
            if bad:
                return JSONResponse({"status": "unhealthy", "arms": bad}, status_code=503)
            return PlainTextResponse("")

        @app.get("/metrics")
        async def metrics(self):
            texts = {arm: (await self._collect(arm, "/metrics"))[1].decode() for arm in self.handles}
            lines = ["# HELP specray:experiment_requests Requests the ingress assigned to each arm.",
                     "# TYPE specray:experiment_requests counter"]
            for arm, n in self.counts.items():
                lines.append(f'specray:experiment_requests_total{{experiment="{self.experiment.name}",'
                             f'arm="{arm}"}} {n}')
            texts["__ingress__"] = "\n".join(lines)
            return PlainTextResponse(merge_prometheus(texts), media_type="text/plain; version=0.0.4")

        @app.get("/experiments")
        async def experiments(self):
            exp = self.experiment
            return {"name": exp.name, "model": exp.model, "control": exp.control, "unkeyed": self.unkeyed,
                    "total": sum(self.counts.values()),
                    "arms": [{"name": a.name, "weight": a.weight, "replicas": a.replicas, "count": self.counts[a.name],
                              "status_counts": self.status_counts[a.name],
                              "speculative_config": a.engine.get("speculative_config")} for a in exp.arms]}

    return ExperimentIngress


def load_experiment_dict(d: dict[str, Any]) -> Experiment:
    """Rebuild an `Experiment` from `Experiment.to_dict()` (as shipped to the ingress replica)."""
    arms = tuple(Arm(a["name"], float(a["weight"]), a["engine"], int(a["replicas"])) for a in d["arms"])
    return Experiment(d["name"], d["model"], arms, d["control"], d.get("traffic", {}), d.get("decision", {}))


def build_experiment_app(args: "dict[str, Any] | Experiment | str") -> "Application":
    """The A/B application: one `SpecrayServer` deployment per arm behind `ExperimentIngress`.

    args: `{experiment: path-or-mapping}` (or the experiment itself); optional
    `ray_actor_options` applied to every arm (e.g. `{num_cpus: 0.5}` on a small machine).
    """
    from ray import serve

    from specray.platform.serve import build_server

    actor_opts = None
    if isinstance(args, Experiment):
        exp = args
    elif isinstance(args, str | Path):
        exp = load_experiment(args)
    else:
        if "experiment" not in args:
            raise ConfigError("build_experiment_app args.experiment (a YAML path or a mapping) is required")
        exp = args["experiment"] if isinstance(args["experiment"], Experiment) else load_experiment(args["experiment"])
        actor_opts = args.get("ray_actor_options")
    handles = {a.name: build_server(a.engine, exp.model, a.name, a.replicas,
                                    name=f"{exp.name}-{a.name}", ray_actor_options=actor_opts)
               for a in exp.arms}
    ingress = serve.deployment(_ingress_class()).options(name=f"{exp.name}-ingress", ray_actor_options={"num_cpus": 0})
    return ingress.bind(exp.to_dict(), handles)
