"""Ray cluster connection and the placement group of one distributed engine.

Owns no long-lived state beyond the Ray connection. `connect` joins a cluster (`ray_address`, e.g.
"auto" or "ray://head:10001") or starts a local one. `engine_placement_group` reserves, on one node
(`STRICT_PACK`), `tensor_parallel_size` bundles for the target shards plus one bundle for a separate
draft: one GPU each on GPU clusters, one CPU each otherwise (CI runs the same code on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from specray.errors import ConfigError


def connect(address: str | None = None, **local_kwargs: Any) -> None:
    """Connect once per process; a local cluster gets `local_kwargs` (num_cpus, ...)."""
    import ray

    if ray.is_initialized():
        return
    if address is None:
        ray.init(include_dashboard=False, **local_kwargs)
    else:
        ray.init(address=address)


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


@dataclass
class EnginePlacement:
    group: Any  # ray.util.placement_group.PlacementGroup
    num_target: int
    separate_draft: bool
    use_gpu: bool

    def strategy(self, bundle: int) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=bundle,
            placement_group_capture_child_tasks=False,
        )

    def actor_options(self, bundle: int) -> dict[str, Any]:
        res = {"num_cpus": 1, "num_gpus": 1} if self.use_gpu else {"num_cpus": 1, "num_gpus": 0}
        return {**res, "scheduling_strategy": self.strategy(bundle), "max_concurrency": 8}

    def remove(self) -> None:
        from ray.util import remove_placement_group

        try:
            remove_placement_group(self.group)
        except Exception:  # noqa: BLE001 - already gone with the cluster
            pass


def engine_placement_group(tp: int, separate_draft: bool, use_gpu: bool, timeout_s: float = 120.0) -> EnginePlacement:
    """Reserve the engine's bundles; a ConfigError names what the cluster lacks if they never fit."""
    import ray
    from ray.util import placement_group

    bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}
    n = tp + int(separate_draft)
    pg = placement_group([dict(bundle) for _ in range(n)], strategy="STRICT_PACK")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        from ray.util import remove_placement_group

        remove_placement_group(pg)
        kind = "GPUs" if use_gpu else "CPUs"
        raise ConfigError(
            f"tensor_parallel_size {tp}{' + a separate draft' if separate_draft else ''} needs {n} {kind} on one "
            f"node; the Ray cluster could not place them within {timeout_s:.0f} s "
            f"(cluster resources: {ray.cluster_resources()})"
        ) from None
    return EnginePlacement(pg, tp, separate_draft, use_gpu)
