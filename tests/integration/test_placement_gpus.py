"""Placement-group bundles on a Ray cluster that declares 2 GPUs (Ray hands out GPU ids without a real
GPU): TP=2 plus a separate draft needs 3 GPUs at the default `draft_gpu_fraction` 1 and is refused with a
clear ConfigError; at 0.5 it fits, each shard gets its own GPU id and the draft shares the last shard's."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from specray.actors import placement  # noqa: E402
from specray.config import SpeculativeConfig  # noqa: E402
from specray.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def test_bundle_gpus_split_the_last_gpu():
    assert placement.bundle_gpus(2, False) == (1.0, 1.0)
    assert placement.bundle_gpus(2, True) == (1.0, 1.0, 1.0)
    assert placement.bundle_gpus(2, True, 0.25) == (1.0, 0.75, 0.25)
    with pytest.raises(ConfigError, match="draft_gpu_fraction"):
        placement.bundle_gpus(2, True, 0.0)
    with pytest.raises(ConfigError, match="draft_gpu_fraction"):
        SpeculativeConfig(method="draft_model", model="x", draft_gpu_fraction=1.5)


@pytest.fixture(scope="module")
def two_gpu_cluster():
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_tp2_plus_draft_on_two_gpus(two_gpu_cluster):
    with pytest.raises(ConfigError, match=r"needs 3 GPUs on one node"):
        placement.engine_placement_group(2, True, use_gpu=True, timeout_s=3)
    pg = placement.engine_placement_group(2, True, use_gpu=True, timeout_s=30, draft_gpu_fraction=0.5)
    try:

        class Probe:  # defined here so Ray pickles it by value (workers cannot import test modules)
            def gpu_ids(self) -> list[str]:
                return [str(g) for g in ray.get_gpu_ids()]

        probe = ray.remote(Probe)
        actors = [probe.options(**pg.actor_options(b)).remote() for b in range(3)]
        ids = ray.get([a.gpu_ids.remote() for a in actors])
        assert [len(i) for i in ids] == [1, 1, 1]
        assert ids[0] != ids[1], "each target shard must own a GPU"
        assert ids[1] == ids[2], "the draft shares the last shard's GPU"
        for a in actors:
            ray.kill(a)
    finally:
        pg.remove()
