"""Ray cluster connection and the placement group of one distributed engine.

Owns no long-lived state beyond the Ray connection. `connect` joins a cluster (`ray_address`, e.g.
"auto" or "ray://head:10001") or starts a local one. `engine_placement_group` reserves, on one node
(`STRICT_PACK`), `tensor_parallel_size` bundles for the target shards plus one bundle for a separate
draft: one GPU each on GPU clusters, one CPU each otherwise (CI runs the same code on CPU). With
`draft_gpu_fraction` f < 1 the draft shares the last shard's GPU: that shard's bundle takes 1 - f of it and
the draft's bundle f, so TP=2 plus a draft fits on 2 GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from specray.config import check_draft_gpu_fraction
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
    gpus: tuple[float, ...] = ()  # GPUs per bundle (target ranks, then the draft); empty on CPU

    def strategy(self, bundle: int) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=bundle,
            placement_group_capture_child_tasks=False,
        )

    def actor_options(self, bundle: int) -> dict[str, Any]:
        res = {"num_cpus": 1, "num_gpus": self.gpus[bundle] if self.use_gpu else 0}
        return {**res, "scheduling_strategy": self.strategy(bundle), "max_concurrency": 8}

    def remove(self) -> None:
        from ray.util import remove_placement_group

        try:
            remove_placement_group(self.group)
        except Exception:  # noqa: BLE001 - already gone with the cluster
            pass


def bundle_gpus(tp: int, separate_draft: bool, draft_gpu_fraction: float = 1.0) -> tuple[float, ...]:
    """GPUs of each bundle: one per target rank and one for a separate draft, or, when the draft takes a
    fraction f < 1, the last rank 1 - f and the draft f of the same GPU."""
    check_draft_gpu_fraction(draft_gpu_fraction)
    gpus = [1.0] * tp
    if separate_draft:
        if draft_gpu_fraction < 1.0:
            gpus[-1] = round(1.0 - draft_gpu_fraction, 4)
        gpus.append(draft_gpu_fraction)
    return tuple(gpus)


def engine_placement_group(tp: int, separate_draft: bool, use_gpu: bool, timeout_s: float = 120.0,
                           draft_gpu_fraction: float = 1.0) -> EnginePlacement:
    """Reserve the engine's bundles; a ConfigError names what the cluster lacks if they never fit."""
    import ray
    from ray.util import placement_group

    gpus = bundle_gpus(tp, separate_draft, draft_gpu_fraction) if use_gpu else ()
    n = tp + int(separate_draft)
    bundles = [{"GPU": g, "CPU": 1} for g in gpus] if use_gpu else [{"CPU": 1} for _ in range(n)]
    pg = placement_group(bundles, strategy="STRICT_PACK")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        from ray.util import remove_placement_group

        remove_placement_group(pg)
        kind = "GPUs" if use_gpu else "CPUs"
        need = f"{sum(gpus):g}" if use_gpu else str(n)
        raise ConfigError(
            f"tensor_parallel_size {tp}{' + a separate draft' if separate_draft else ''} needs {need} {kind} on one "
            f"node; the Ray cluster could not place them within {timeout_s:.0f} s "
            f"(cluster resources: {ray.cluster_resources()})"
        ) from None
    return EnginePlacement(pg, tp, separate_draft, use_gpu, gpus)
