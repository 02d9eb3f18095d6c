"""LLMEngine end to end on tiny random checkpoints: greedy parity with HF `generate()`, continuous
batching invariance, page accounting, admission waiting for pages, stop conditions, bad input."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from specray.config import CacheConfig, EngineConfig, SchedulerConfig
from specray.engine.llm_engine import LLMEngine
from specray.engine.sampling_params import SamplingParams
from specray.errors import CheckpointError, PromptTooLongError, RequestError, UnsupportedModelError
from tests.support.tiny import FAMILIES, make_checkpoint

GREEDY = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)


def _engine(path, **kw) -> LLMEngine:
    cache = kw.pop("cache", CacheConfig(page_size=8, num_pages=256))
    sched = kw.pop("scheduler", SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=64))
    return LLMEngine(EngineConfig(model=str(path), device="cpu", dtype="float32", cache=cache, scheduler=sched, **kw))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_hf_generate(tmp_path, family):
    path = make_checkpoint(tmp_path / family, family, tie_word_embeddings=family == "qwen2")
    engine = _engine(path)
    prompts = [[5, 9, 17, 33, 4, 8, 100, 7, 21, 90, 11], [44, 45, 46], list(range(10, 40))]
    outs = engine.generate(prompts, GREEDY)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([prompt]), max_new_tokens=64, do_sample=False, min_new_tokens=64,
                pad_token_id=0, eos_token_id=None,
            )[0, len(prompt) :].tolist()
        assert out.token_ids == ref, f"{family}: ours {out.token_ids} != HF {ref}"
        assert out.finish_reason == "length"
    assert engine.pages_in_use() == 0


def test_16_concurrent_requests_match_solo_runs(llama):
    g = torch.Generator().manual_seed(3)
    lengths = [int(x) for x in torch.randint(1, 90, (16,), generator=g)]
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]
    params = []
    for i in range(16):
        if i % 3 == 0:  # seeded sampling: must also be batch-invariant
            params.append(SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=100 + i,
                                         max_tokens=10 + i, ignore_eos=True))
        else:
            params.append(SamplingParams(temperature=0.0, max_tokens=5 + 2 * i, ignore_eos=True))
    engine = _engine(llama, scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=48))
    batched = engine.generate(prompts, params)
    assert engine.pages_in_use() == 0
    for prompt, p, out in zip(prompts, params, batched, strict=True):
        solo = _engine(llama).generate([prompt], p)[0]
        assert out.token_ids == solo.token_ids
        assert len(out.token_ids) == p.max_tokens


def test_request_waits_for_pages_then_runs(llama):
    # 12 usable pages of 8 tokens; A holds 8 pages, B needs 6 more than are free: it must wait.
    engine = _engine(llama, cache=CacheConfig(page_size=8, num_pages=12))
    engine.add_request("A", list(range(3, 60)), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    engine.step()
    engine.add_request("B", list(range(3, 43)), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    finished = {}
    saw_waiting = False
    while engine.has_unfinished_requests():
        if "A" not in finished:
            saw_waiting |= engine.num_waiting == 1
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert saw_waiting
    assert finished["A"].finish_reason == finished["B"].finish_reason == "length"
    assert len(finished["B"].token_ids) == 4
    assert engine.pages_in_use() == 0


def test_prompt_larger_than_the_whole_cache_is_rejected(llama):
    engine = _engine(llama, cache=CacheConfig(page_size=8, num_pages=4))
    with pytest.raises(PromptTooLongError, match="4 pages"):
        engine.add_request("x", list(range(3, 100)))


def test_preemption_keeps_greedy_output(llama):
    prompts = [list(range(3 + i, 30 + i)) for i in range(4)]
    p = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    small = _engine(llama, cache=CacheConfig(page_size=8, num_pages=20))
    outs = small.generate(prompts, p)
    big = _engine(llama).generate(prompts, p)
    assert [o.token_ids for o in outs] == [o.token_ids for o in big]
    assert small.pages_in_use() == 0


def test_abort_frees_pages_at_once(llama):
    engine = _engine(llama)
    engine.add_request("a", list(range(3, 50)), SamplingParams(temperature=0, max_tokens=100))
    engine.add_request("b", list(range(3, 20)), SamplingParams(temperature=0, max_tokens=100))
    engine.step()
    engine.step()
    assert engine.pages_in_use() > 0
    assert engine.abort("a")
    assert engine.abort("b")
    assert engine.pages_in_use() == 0
    assert not engine.has_unfinished_requests()
    assert not engine.abort("a")


def test_chunked_prefill_does_not_stall_decodes(llama):
    engine = _engine(llama, scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16))
    engine.add_request("short", [5, 6, 7], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    engine.step()
    engine.add_request("long", list(range(3, 200)), SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    tokens_while_long_prefills = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        long_done = any(o.request_id == "long" for o in outs)
        tokens_while_long_prefills += sum(1 for o in outs if o.request_id == "short") if not long_done else 0
        if long_done:
            break
    # the 197-token prompt takes >= 12 steps of 16 tokens; the decode advanced in each of them
    assert tokens_while_long_prefills >= 11


def test_stop_strings_and_eos(llama):
    engine = _engine(llama)
    free = engine.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    words = free.text.split()
    assert len(words) == 12
    stop_word = words[4]
    out = engine.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=12, stop=[stop_word],
                                                      ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_word
    assert out.text == free.text[: free.text.index(stop_word)]
    # the 3rd generated token as a stop token id, and as EOS via engine.eos_token_ids
    tok = free.token_ids[2]
    out = engine.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[tok],
                                                      ignore_eos=True))[0]
    assert out.token_ids == free.token_ids[:3] and out.finish_reason == "stop"
    engine.eos_token_ids = frozenset({tok})
    out = engine.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=12))[0]
    assert out.token_ids == free.token_ids[:3] and out.stop_reason == tok


def test_text_prompt_and_chat(llama):
    engine = _engine(llama)
    out = engine.generate(["w5 w6 w7"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    assert out.prompt_token_ids == [5, 6, 7]
    ids = engine.encode_chat([{"role": "user", "content": "w9 w10"}])
    assert ids[-1] == 3  # the template's generation prompt "w3"


# ---- bad input ---------------------------------------------------------------------------------
def test_prompt_longer_than_max_model_len(llama):
    engine = _engine(llama, scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=50))
    with pytest.raises(PromptTooLongError, match="60 tokens.*max_model_len is 50"):
        engine.add_request("x", list(range(3, 63)))
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "kwargs, field",
    [({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -3}, "max_tokens"), ({"top_p": 0.0}, "top_p"),
     ({"top_p": 1.5}, "top_p"), ({"temperature": -1.0}, "temperature"), ({"min_p": 2.0}, "min_p")],
)
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(RequestError, match=field):
        SamplingParams(**kwargs)


def test_out_of_vocab_and_duplicate_ids(llama):
    engine = _engine(llama)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.add_request("x", [5, 999999])
    engine.add_request("dup", [5, 6])
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request("dup", [5, 6])


def test_unknown_architecture(tmp_path):
    path = make_checkpoint(tmp_path / "m", "llama")
    cfg = (path / "config.json").read_text().replace("LlamaForCausalLM", "GPTNeoXForCausalLM")
    (path / "config.json").write_text(cfg)
    with pytest.raises(UnsupportedModelError, match="GPTNeoXForCausalLM"):
        _engine(path)


def test_truncated_safetensors(tmp_path):
    path = make_checkpoint(tmp_path / "m", "llama")
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"truncated: expected \d+ bytes, found \d+"):
        _engine(path)


def test_missing_tokenizer(tmp_path):
    path = make_checkpoint(tmp_path / "m", "llama", tokenizer=False)
    with pytest.raises(CheckpointError, match="no tokenizer"):
        _engine(path)
    # token-ids-only mode still works
    engine = _engine(path, skip_tokenizer_init=True)
    assert len(engine.generate([[5, 6]], SamplingParams(temperature=0, max_tokens=3))[0].token_ids) <= 3


def test_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    path = make_checkpoint(tmp_path / "m", "llama")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        _engine(path)


def test_forward_tokens_without_logits_writes_the_same_kv(llama):
    """`logits_rows=[]` (the draft's context encoding) skips the LM head but writes the same K/V: the next
    token's logits after it equal the last row of one forward over the whole sequence."""
    engine = _engine(llama)
    runner = engine.runner
    tokens = [5, 9, 17, 33, 4, 8, 100, 7, 21]
    pages = engine.allocator.allocate(2)  # 16 slots of 8
    n = len(tokens)
    head = runner.forward_tokens([pages], [tokens[:-1]], [list(range(n - 1))], [list(range(n - 1))], [n - 1],
                                 logits_rows=[])
    assert head.shape == (0, engine.arch.vocab_size)
    step = runner.forward_tokens([pages], [tokens[-1:]], [[n - 1]], [[n - 1]], [n])  # [1, V]
    other = engine.allocator.allocate(2)
    full = runner.forward_tokens([other], [tokens], [list(range(n))], [list(range(n))], [n])  # [n, V]
    torch.testing.assert_close(step[0], full[-1], rtol=1e-5, atol=1e-5)
    engine.allocator.free(pages + other)
