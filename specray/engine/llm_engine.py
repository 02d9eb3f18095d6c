"""`LLMEngine`: the in-process engine. add_request / step / abort over a continuous batch.

Owns the loaded model, the paged KV cache, the scheduler and the live `Sequence`s by request id.
Each `step()` schedules a batch, runs one forward (prefill chunks and decodes together), samples,
applies stop conditions (EOS, stop token ids, stop strings, max_tokens, max_model_len) and returns
a `RequestOutput` for every sequence that produced a token or finished.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from specray.config import EngineConfig, SpeculativeConfig
from specray.engine.attention import TorchAttentionBackend, TritonAttentionBackend
from specray.engine.kv_cache import KVCache, KVCacheSpec, PageAllocator, num_pages_for, pages_needed
from specray.engine.model_runner import DecodeLaunch, ModelRunner
from specray.engine.sampler import Sampler
from specray.engine.sampling_params import SamplingParams
from specray.engine.scheduler import ScheduledBatch, Scheduler
from specray.engine.sequence import RequestOutput, Sequence, SequenceStatus
from specray.errors import PromptTooLongError, RequestError
from specray.models.arch import ModelArch
from specray.models.checkpoint import Checkpoint
from specray.models.decoder import DecoderLM

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(cfg: EngineConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RequestError("device='cuda' was asked for, but no CUDA device is available")
    return torch.device(cfg.device)


class LLMEngine:
    def __init__(self, config: EngineConfig, checkpoint: Checkpoint | None = None):
        from specray.models.loader import load_checkpoint

        self.config = config
        self.device = resolve_device(config)
        self.dtype = _DTYPES.get(config.dtype) or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        want_tok = not config.skip_tokenizer_init and config.tokenizer is None
        ckpt = checkpoint if checkpoint is not None else load_checkpoint(config.model, load_tokenizer=want_tok)
        self.checkpoint = ckpt
        self.tokenizer = ckpt.tokenizer if not config.skip_tokenizer_init else None
        if config.tokenizer is not None and not config.skip_tokenizer_init:
            from pathlib import Path

            from specray.models.tokenizer import Tokenizer

            tok = Path(config.tokenizer)
            if tok.is_dir() and not (tok / "config.json").exists():  # a tokenizer-only directory
                self.tokenizer = Tokenizer.from_hf_dir(tok)
            else:
                self.tokenizer = load_checkpoint(config.tokenizer).tokenizer
        self.arch = ModelArch.from_hf_config(ckpt.hf_config)
        self.max_model_len = config.scheduler.max_model_len or self.arch.max_position_embeddings
        eos = set(ckpt.generation.eos_token_ids) | set(self.arch.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)

        self.model = self._build_model(ckpt)
        self.model.eval()
        if self.device.type == "cuda" and config.fused_ops:
            self.model.use_fused_ops(True)
            if config.fuse_allreduce_rmsnorm and hasattr(self.model, "fuse_all_reduce_norm"):  # a TP shard
                self.model.fuse_all_reduce_norm(config.tp_weight_prefetch_mb)

        page_size = config.cache.page_size
        spec = KVCacheSpec.of(self.model.arch, page_size, self.dtype)  # a TP shard holds its KV heads only
        self.cache = KVCache(spec, self._num_pages(spec), self.device)
        self.allocator = PageAllocator(self.cache.num_pages)
        self.scheduler = Scheduler(config.scheduler, self.allocator, page_size)
        backend_name = config.attention_backend
        if backend_name == "auto":
            backend_name = "triton" if self.device.type == "cuda" else "torch"
        max_bs = config.scheduler.max_num_seqs
        if backend_name == "triton":
            self.backend = TritonAttentionBackend(self.cache, self.model.arch.num_heads, max_bs, self.max_model_len)
        else:
            self.backend = TorchAttentionBackend(self.cache)
        gen = torch.Generator(device=self.device).manual_seed(config.seed)
        self.sampler = Sampler(gen)
        graph_sizes = ()
        if self.device.type == "cuda" and config.cuda_graphs and backend_name == "triton":
            graph_sizes = config.graph_batch_sizes()
        self.runner = self._build_runner(graph_sizes)
        self.seqs: dict[str, Sequence] = {}
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.device.type == "cuda")
        self._ahead: _Ahead | None = None  # a greedy decode step launched before its batch was scheduled
        self.async_stats = {"ahead_launched": 0, "ahead_used": 0}  # launched ahead; of them, used (not dropped)
        self.spec = None  # SpeculativeDecoder when speculative_config.method != none
        if config.speculative_config is not None and config.speculative_config.method != "none":
            from specray.spec.step import SpeculativeDecoder

            self.spec = SpeculativeDecoder(self, self._build_proposer(config.speculative_config),
                                           config.speculative_config)

    def set_speculative_config(self, cfg: SpeculativeConfig | None) -> None:
        """Swap the speculation method between requests (benchmarks, in-process A/B); None = plain AR."""
        if self.has_unfinished_requests():
            raise RequestError("cannot change speculation while requests are running")
        from specray.spec.step import SpeculativeDecoder

        self.spec = None
        if cfg is not None and cfg.method != "none":
            self.spec = SpeculativeDecoder(self, self._build_proposer(cfg), cfg)

    # ---- construction hooks (specray.actors overrides them for tensor-parallel shards) ----------
    def _build_model(self, ckpt: Checkpoint) -> DecoderLM:
        model = DecoderLM.empty(self.arch, self.max_model_len + 1, self.dtype, self.device)
        model.load_weights(ckpt.weights)
        return model

    def _num_pages(self, spec: KVCacheSpec) -> int:
        return num_pages_for(spec, self.config.cache, self.device)

    def _build_runner(self, graph_sizes: tuple[int, ...]) -> ModelRunner:
        return ModelRunner(self.model, self.cache, self.backend, self.sampler, self.max_model_len, graph_sizes)

    def _build_proposer(self, cfg: SpeculativeConfig):
        from specray.spec.proposers import build_proposer

        return build_proposer(self, cfg)

    def build_verify_graphs(self, num_nodes: int, capture_layer: int | None):
        """`VerifyGraphs` for tree verification on CUDA with the Triton backend and graphs on; else None."""
        if not (self.device.type == "cuda" and self.config.cuda_graphs and isinstance(self.backend,
                                                                                     TritonAttentionBackend)):
            return None
        if any(w is not None for w in self.arch.sliding_windows):
            return None
        from specray.spec.verify_graph import VerifyGraphs

        return VerifyGraphs(self, num_nodes, self.runner.graph_batch_sizes or (1,), capture_layer)

    # ---- requests ------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this engine has no tokenizer: pass prompt token ids")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        if self.tokenizer is None:
            raise RequestError("this engine has no tokenizer: chat needs one")
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages), add_special_tokens=False)

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None
    ) -> None:
        params = params or SamplingParams()
        if request_id in self.seqs:
            raise RequestError(f"request id {request_id!r} is already in use")
        ids = self.encode(prompt)
        if not ids:
            raise RequestError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.arch.vocab_size]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.arch.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens, but max_model_len is {self.max_model_len}: "
                f"at most {self.max_model_len - 1} prompt tokens leave room for one generated token"
            )
        need = pages_needed(len(ids) + 1, self.cache.spec.page_size)
        if need > self.allocator.num_usable:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens and needs {need} KV pages, but the cache has only "
                f"{self.allocator.num_usable} pages of {self.cache.spec.page_size} tokens"
            )
        max_out = self.max_model_len - len(ids)
        if params.max_tokens is not None:
            max_out = min(max_out, params.max_tokens)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        seq = Sequence(request_id, ids, params, max_out, generator)
        seq.metrics.num_prompt_tokens = len(ids)
        if self.tokenizer is not None:
            from specray.engine.detokenizer import IncrementalDetokenizer

            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its pages at once. Returns False if it is unknown or finished."""
        seq = self.seqs.pop(request_id, None)
        if seq is None or seq.finished:
            return False
        self.scheduler.finish(seq, "abort")
        if self.spec is not None:
            self.spec.proposer.release(request_id)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        ahead, self._ahead = self._ahead, None
        batch = self.scheduler.schedule()
        outputs: list[RequestOutput] = []
        for seq in batch.out_of_pages:
            self.scheduler.finish(seq, "length")
            outputs.append(self._output(seq, []))
        if batch.empty:
            return outputs
        now = time.monotonic()
        for seq in batch.seqs:
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = now
        if self.spec is not None and batch.decode_only:
            drafted = self.spec.step(batch.seqs)
            if drafted is not None:  # None: not enough pages or context for the tree; run plain AR
                for seq, tokens in zip(batch.seqs, drafted, strict=True):
                    kept = []  # tokens past a stop are dropped
                    for token in tokens:
                        if seq.finished:
                            break
                        self._append_token(seq, token)
                        kept.append(token)
                    outputs.append(self._output(seq, kept))
                self._drop_finished(batch.seqs)
                return outputs
        if self._async_greedy(batch):
            if ahead is not None and ahead.matches(batch):
                self.async_stats["ahead_used"] += 1
                launch = ahead.launch
            else:  # none, or the batch changed: run it now
                launch = self.runner.launch_greedy_decode(self.runner.batch_inputs(batch))
            self._ahead = self._launch_ahead(batch, launch)  # before this step's tokens are read
            sampled = self.runner.collect(launch)
        else:
            sampled = self.runner.execute(batch)
        for seq, n, token in zip(batch.seqs, batch.num_new_tokens, sampled, strict=True):
            seq.num_computed += n
            if token is None:
                continue
            self._append_token(seq, token)
            outputs.append(self._output(seq, [token]))
        self._drop_finished(batch.seqs)
        return outputs

    def _async_greedy(self, batch: ScheduledBatch) -> bool:
        """A decode step of greedy rows only, without speculation: it can run launched ahead."""
        return (self.async_scheduling and self.spec is None and batch.decode_only
                and all(s.params.greedy and s.num_computed + 1 == s.num_tokens for s in batch.seqs))

    def _launch_ahead(self, batch: ScheduledBatch, launch: DecodeLaunch) -> _Ahead | None:
        """Launch the step after `batch`'s, taking `launch`'s device tokens as input ids, when that step
        will be scheduled as is: no request can be admitted, no sequence ends by length with this
        token, and pages for one more token are free (allocated now; the scheduler finds them). A
        sequence that stops on a token, or an abort, changes the next batch, and the step is dropped:
        its K/V writes land where the next step writes again, or in freed pages whose next owner writes
        after it on the same stream. With every sequence slot taken, waiting requests cannot join the next
        batch, so they do not stop it."""
        if self.scheduler.can_admit():
            return None  # the next step may admit a request (if one finishes instead, the step is dropped)
        if any(len(s.output_ids) + 2 > s.max_output_tokens for s in batch.seqs):
            return None
        if not self.scheduler.reserve_next_token(batch.seqs):
            return None
        starts = [s.num_computed + 1 for s in batch.seqs]
        inputs = self.runner.host_inputs([s.pages for s in batch.seqs], [[0]] * len(starts), starts)
        self.async_stats["ahead_launched"] += 1
        return _Ahead(list(batch.seqs), starts, self.runner.launch_greedy_decode(inputs, launch.tokens))

    def _drop_finished(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            if seq.finished:
                self.seqs.pop(seq.request_id, None)
                if self.spec is not None:
                    self.spec.proposer.release(seq.request_id)

    def _append_token(self, seq: Sequence, token: int) -> None:
        now = time.monotonic()
        seq.output_ids.append(token)
        seq.metrics.num_output_tokens = len(seq.output_ids)
        if seq.metrics.first_token_time is None:
            seq.metrics.first_token_time = now
        params = seq.params
        reason: str | None = None
        if not params.ignore_eos and token in self.eos_token_ids:
            reason, seq.stop_reason = "stop", token
        elif token in params.stop_token_ids:
            reason, seq.stop_reason = "stop", token
        if seq.detokenizer is not None:
            from specray.engine.detokenizer import find_stop

            delta = seq.detokenizer.append([token])
            text = seq.detokenizer.text
            if reason is None and params.stop and delta:
                cut = find_stop(text, len(delta), params.stop, params.include_stop_str_in_output)
                if cut is not None:
                    reason = "stop"
                    seq.stop_reason = next(
                        (s for s in params.stop if text.startswith(s, cut) or text[:cut].endswith(s)), None
                    )
                    text = text[:cut]
            seq.text = text
        if reason is None and len(seq.output_ids) >= seq.max_output_tokens:
            reason = "length"
            if seq.detokenizer is not None:  # release bytes held back for an unfinished character
                seq.detokenizer.flush()
                seq.text = seq.detokenizer.text
        if reason is not None:
            seq.metrics.finished_time = now
            self.scheduler.finish(seq, reason)

    def _output(self, seq: Sequence, new_ids: list[int]) -> RequestOutput:
        text = seq.text
        if not seq.finished and seq.params.stop:
            from specray.engine.detokenizer import stop_holdback

            text = text[: len(text) - stop_holdback(text, seq.params.stop)]
        delta = text[seq.sent_text_len :] if len(text) > seq.sent_text_len else ""
        seq.sent_text_len = max(seq.sent_text_len, len(text))
        return RequestOutput(
            request_id=seq.request_id, prompt_token_ids=seq.prompt_ids, token_ids=list(seq.output_ids),
            new_token_ids=new_ids, text=text, delta_text=delta, finished=seq.finished,
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason, metrics=seq.metrics,
            spec_metrics=seq.spec_stats.as_dict() if seq.spec_stats is not None else None,
        )

    # ---- convenience ---------------------------------------------------------------------------
    def generate(
        self, prompts: Iterable[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Run prompts to completion (offline batch); outputs in prompt order."""
        return generate_all(self, prompts, params)

    def score(self, token_ids: list[int]) -> torch.Tensor:
        """[n-1] fp32 log-probabilities log p(t_i | t_<i) of a token sequence (for perplexity),
        computed in prefill chunks of `max_num_batched_tokens` through the paged cache."""
        ids = self.encode(token_ids)
        if not 2 <= len(ids) <= self.max_model_len:
            raise RequestError(f"score needs 2..{self.max_model_len} tokens, got {len(ids)}")
        need = pages_needed(len(ids), self.cache.spec.page_size)
        if not self.allocator.can_allocate(need):
            raise RequestError(f"score needs {need} free KV pages, {self.allocator.num_free} are free")
        seq = Sequence("score", ids, SamplingParams(max_tokens=1), 1)
        seq.pages = self.allocator.allocate(need)
        chunk = self.config.scheduler.max_num_batched_tokens
        logps = []
        try:
            while seq.num_computed < len(ids):
                n = min(chunk, len(ids) - seq.num_computed)
                logits = self.runner.all_token_logits(ScheduledBatch([seq], [n]))  # [n, V]
                logps.append(torch.log_softmax(logits, dim=-1))
                seq.num_computed += n
        finally:
            self.allocator.free(seq.pages)
        logp = torch.cat(logps)[:-1]  # [n-1, V]: the last position predicts past the end
        target = torch.tensor(ids[1:], device=logp.device)
        return logp.gather(1, target[:, None]).squeeze(1).cpu()

    def pages_in_use(self) -> int:
        return self.allocator.num_used

    def running_request_ids(self) -> list[str]:
        return [s.request_id for s in self.seqs.values() if s.status is SequenceStatus.RUNNING]


@dataclass
class _Ahead:
    """A launched greedy decode step: valid for a batch of the same sequences at the same positions."""

    seqs: list[Sequence]
    starts: list[int]  # the position each sequence computes
    launch: DecodeLaunch

    def matches(self, batch: ScheduledBatch) -> bool:
        return (len(batch.seqs) == len(self.seqs) and all(a is b for a, b in zip(batch.seqs, self.seqs, strict=True))
                and [s.num_computed for s in batch.seqs] == self.starts)


def generate_all(
    engine, prompts: Iterable[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None
) -> list[RequestOutput]:
    """Add every prompt to `engine` (an `LLMEngine` or a `DistributedEngine`: add_request / step /
    has_unfinished_requests) and step until each has finished; outputs in prompt order."""
    prompts = list(prompts)
    plist = params if isinstance(params, list) else [params] * len(prompts)
    ids = [f"gen-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for rid, p, sp in zip(ids, prompts, plist, strict=True):
        engine.add_request(rid, p, sp)
    final: dict[str, RequestOutput] = {}
    while len(final) < len(ids):
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        if not engine.has_unfinished_requests() and len(final) < len(ids):
            raise RuntimeError("engine stopped with unfinished requests")
    return [final[r] for r in ids]
