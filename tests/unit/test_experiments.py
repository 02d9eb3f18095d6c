"""Experiment YAML validation, sticky weighted assignment, request keys and Prometheus merging."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from specray.errors import ConfigError
from specray.platform.experiments import assign, assignment_point, load_experiment, merge_prometheus, request_key

BASE = {
    "name": "sparse-vs-none",
    "model": "/models/tiny",
    "engine": {"device": "cpu", "scheduler": {"max_num_seqs": 4}},
    "arms": [
        {"name": "none", "weight": 1, "speculative_config": {"method": "none"}},
        {"name": "sparse_self", "weight": 1, "replicas": 2,
         "speculative_config": {"method": "sparse_self", "sparse": {"page_size": 16, "budget_tokens": 64}}},
    ],
}


def _exp(**over):
    d = {**BASE, **over}
    return load_experiment(d)


def test_loads_arms_with_merged_engines():
    exp = _exp()
    assert [a.name for a in exp.arms] == ["none", "sparse_self"] and exp.control == "none"
    assert [a.weight for a in exp.arms] == [0.5, 0.5]
    sparse = exp.arm("sparse_self")
    assert sparse.replicas == 2 and sparse.engine["model"] == "/models/tiny"
    assert sparse.engine["scheduler"] == {"max_num_seqs": 4}
    assert sparse.engine["speculative_config"]["sparse"]["budget_tokens"] == 64
    assert exp.model == "/models/tiny"  # served name defaults to the model


@pytest.mark.parametrize("name", ["sparse-vs-none", "qwen-gpu"])
def test_example_experiment_files_load(name):
    from specray.pipelines.ab import DECISION_KEYS, TRAFFIC_KEYS

    path = Path(__file__).resolve().parents[2] / "configs" / "experiments" / f"{name}.yaml"
    exp = load_experiment(path)
    assert {a.name for a in exp.arms} == {"none", "sparse_self"}
    assert set(exp.traffic) <= set(TRAFFIC_KEYS) and set(exp.decision) <= set(DECISION_KEYS)


@pytest.mark.parametrize("over, match", [
    ({"arms": [BASE["arms"][0]]}, "at least 2 arms"),
    ({"arms": [BASE["arms"][0], {**BASE["arms"][1], "weight": 0}]}, r"arms\[1\].weight must be > 0"),
    ({"arms": [BASE["arms"][0], {**BASE["arms"][1], "weight": "half"}]}, r"arms\[1\].weight must be"),
    ({"arms": [BASE["arms"][0], {**BASE["arms"][1], "name": "none"}]}, r"arms\[1\].name 'none' is used by two"),
    ({"arms": [BASE["arms"][0], {**BASE["arms"][1], "replicas": 0}]}, r"arms\[1\].replicas must be"),
    ({"arms": [BASE["arms"][0], {**BASE["arms"][1], "colour": "red"}]}, r"unknown field arms\[1\].colour"),
    ({"arms": [BASE["arms"][0], {"name": "x", "weight": 1, "speculative_config": {"method": "magic"}}]},
     r"arms\[1\] \(x\): speculative_config.method must be one of"),
    ({"arms": [BASE["arms"][0], {"name": "x", "weight": 1,
                                 "speculative_config": {"method": "sparse_self", "tree": {"kind": "bush"}}}]},
     r"speculative_config.tree.kind"),
    ({"name": "has space"}, "name must match"),
    ({"control": "other"}, "control must name an arm"),
    ({"colour": 1}, "unknown experiment field 'colour'"),
])
def test_bad_experiments_name_the_field(over, match):
    with pytest.raises(ConfigError, match=match):
        _exp(**over)


def test_missing_fields_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="arms is required"):
        load_experiment({"name": "x", "model": "m"})
    with pytest.raises(ConfigError, match="model is required"):
        load_experiment({"name": "x", "arms": BASE["arms"]})
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\narms: [\n  - oops")
    with pytest.raises(ConfigError, match="cannot parse experiment file"):
        load_experiment(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_experiment(tmp_path / "list.yaml")


def test_assignment_is_sticky_and_deterministic():
    exp = _exp()
    first = {f"s{i}": assign(exp, f"session:s{i}") for i in range(200)}
    again = {f"s{i}": assign(exp, f"session:s{i}") for i in range(200)}
    assert first == again
    assert set(first.values()) == {"none", "sparse_self"}
    # the hash depends on the experiment name: another experiment re-randomises users
    other = _exp(name="other-exp")
    moved = sum(assign(other, f"session:s{i}") != first[f"s{i}"] for i in range(200))
    assert 60 < moved < 140


@pytest.mark.parametrize("weights", [(1, 1), (9, 1), (1, 3)])
def test_weights_respected_within_binomial_tolerance(weights):
    arms = [{**BASE["arms"][0], "weight": weights[0]}, {**BASE["arms"][1], "weight": weights[1]}]
    exp = _exp(arms=arms)
    n = 20000
    hits = sum(assign(exp, f"user:u{i}") == "none" for i in range(n))
    p = weights[0] / sum(weights)
    assert abs(hits - n * p) <= 4 * math.sqrt(n * p * (1 - p)), (hits, n * p)


def test_assignment_point_is_uniform():
    pts = sorted(assignment_point("e", str(i)) for i in range(5000))
    # Kolmogorov-Smirnov distance to U(0,1); 1.63/sqrt(n) is the 1% critical value
    ks = max(max(abs((i + 1) / len(pts) - x), abs(i / len(pts) - x)) for i, x in enumerate(pts))
    assert ks < 1.63 / math.sqrt(len(pts))


def test_request_key_prefers_user_then_session():
    assert request_key(b'{"user": "alice"}', {"X-Session-Id": "s1"}) == "user:alice"
    assert request_key(b'{"prompt": "hi"}', {"X-Session-Id": "s1"}) == "session:s1"
    assert request_key(b"not json", {"x-session-id": "s2"}) == "session:s2"
    assert request_key(b"[1, 2]", {}) is None
    exp = _exp()
    assert {assign(exp, None) for _ in range(200)} == {"none", "sparse_self"}  # unkeyed: random


def test_merge_prometheus_is_valid_and_keeps_every_arm():
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    texts = {}
    for arm, n in (("none", 3), ("sparse_self", 5)):
        r = CollectorRegistry()
        c = Counter("specray:spec_decode_num_drafts", "drafts", ("model_name", "arm"), registry=r)
        c.labels(model_name="m", arm=arm).inc(n)
        h = Histogram("specray:e2e_request_latency_seconds", "e2e", ("model_name", "arm"), registry=r,
                      buckets=(0.5, 1.0))
        h.labels(model_name="m", arm=arm).observe(0.7)
        g = Counter("python_gc_like", "no arm label", registry=r)  # a process metric without labels
        g.inc(n)
        texts[arm] = generate_latest(r).decode()
    merged = merge_prometheus(texts)
    fams = {f.name: f for f in text_string_to_metric_families(merged)}
    drafts = {s.labels["arm"]: s.value for s in fams["specray:spec_decode_num_drafts"].samples
              if s.name.endswith("_total")}
    assert drafts == {"none": 3.0, "sparse_self": 5.0}
    gc = {s.labels["arm"]: s.value for s in fams["python_gc_like"].samples if s.name.endswith("_total")}
    assert gc == {"none": 3.0, "sparse_self": 5.0}
    assert merged.count("# TYPE specray:e2e_request_latency_seconds histogram") == 1
    counts = [s for s in fams["specray:e2e_request_latency_seconds"].samples if s.name.endswith("_count")]
    assert len(counts) == 2


def test_builder_for_serve_run(tmp_path):
    import yaml
    from ray.serve import Application

    from specray.platform.experiments import build_experiment_app

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert isinstance(build_experiment_app({"experiment": str(path)}), Application)  # `serve run` passes strings
    assert isinstance(build_experiment_app(str(path)), Application)
    with pytest.raises(ConfigError, match="args.experiment"):
        build_experiment_app({"config": str(path)})
    with pytest.raises(ConfigError, match=r"arms\[1\].weight"):
        build_experiment_app({"experiment": {**BASE, "arms": [BASE["arms"][0], {**BASE["arms"][1], "weight": -1}]}})
