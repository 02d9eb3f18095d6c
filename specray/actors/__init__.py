"""specray on Ray: tensor-parallel target shards, a separate draft actor, and `DistributedEngine`.

    from specray.actors.engine import DistributedEngine
    engine = DistributedEngine(EngineConfig(model=..., tensor_parallel_size=2,
                                            speculative_config=SpeculativeConfig(method="draft_model", model=...,
                                                                                 draft_placement="separate")))
    engine.generate(["def fib(n):"])      # or AsyncLLMEngine(engine).generate(...)

Modules: `placement` (cluster connection, placement group), `world` (torch.distributed ranks and
groups), `shard` (a target rank's engine and the per-step plan), `draft` (colocated / remote draft,
overlap), `actors` (the Ray actor classes), `engine` (`DistributedEngine`, faults, restart).
"""
