"""Real weights: SmolLM2-135M-Instruct from its Q4_1 GGUF (registry package), against `transformers`
loading the same file with `gguf_file=`: greedy continuation and perplexity on real English text."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from specray.config import CacheConfig, EngineConfig, SchedulerConfig
from specray.engine.llm_engine import LLMEngine
from specray.engine.sampling_params import SamplingParams
from specray.models import registry

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return registry.pull("smollm2-135m")  # cached by `make test` before pytest runs


@pytest.fixture(scope="module")
def engine(gguf_path) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=str(gguf_path), device="cpu", dtype="float32",
        cache=CacheConfig(page_size=16, num_pages=256),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=512, max_model_len=2048),
    ))


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()


def english_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in ("assignment", "augassign", "class", "exceptions", "for"))


def test_greedy_continuation_matches_transformers(engine, hf_model):
    prompt = "The history of the printing press begins in"
    ids = engine.encode(prompt)
    ours = engine.generate([ids], SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))[0]
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=48, min_new_tokens=48, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert ours.token_ids == ref
    assert len(ours.text) > 50


def test_chat_template_and_eos(engine):
    ids = engine.encode_chat([{"role": "user", "content": "Say hello."}])
    assert engine.tokenizer.decode(ids, skip_special_tokens=False).startswith("<|im_start|>")
    out = engine.generate([ids], SamplingParams(temperature=0, max_tokens=200))[0]
    assert out.finish_reason == "stop" and out.stop_reason in engine.eos_token_ids
    assert out.text.strip()


def test_perplexity_matches_transformers(engine, hf_model):
    ids = engine.tokenizer.encode(english_text())[:1200]
    assert len(ids) >= 1000
    ours = engine.score(ids)
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0, :-1].float()
    ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    ppl_ours, ppl_ref = math.exp(-ours.mean().item()), math.exp(-ref.mean().item())
    assert abs(ppl_ours - ppl_ref) / ppl_ref < 0.01, (ppl_ours, ppl_ref)
    assert 2.0 < ppl_ours < 60.0  # a real model on real English, not noise (vocab 49152)
    assert engine.pages_in_use() == 0
