"""Logit parity with HF `transformers` (fp32, CPU) for every family, over a batch of 3 sequences of
different lengths whose steps mix prefill chunks and decodes in one flat forward."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from specray.engine.attention import AttentionMetadata, TorchAttentionBackend
from specray.engine.kv_cache import KVCache, KVCacheSpec, PageAllocator, pages_needed
from specray.models.arch import ModelArch
from specray.models.decoder import DecoderLM
from specray.models.hf_loader import load_hf_dir
from tests.support.tiny import FAMILIES, make_checkpoint

PAGE = 8


def _forward_steps(model: DecoderLM, cache: KVCache, seqs: list[list[int]], steps: list[list[tuple[int, int]]]):
    """Run `steps`: each a list of (seq index, n new tokens). Returns per-seq logits [len, V]."""
    backend = TorchAttentionBackend(cache)
    alloc = PageAllocator(cache.num_pages)
    pages = [alloc.allocate(pages_needed(len(s), PAGE)) for s in seqs]
    done = [0] * len(seqs)
    logits: list[list[torch.Tensor]] = [[] for _ in seqs]
    for step in steps:
        ids, pos, slots, qsl, lens, table = [], [], [], [0], [], []
        width = max(len(pages[i]) for i, _ in step)
        for i, n in step:
            p = range(done[i], done[i] + n)
            ids += seqs[i][done[i] : done[i] + n]
            pos += p
            slots += [pages[i][j // PAGE] * PAGE + j % PAGE for j in p]
            qsl.append(qsl[-1] + n)
            lens.append(done[i] + n)
            table.append(pages[i] + [0] * (width - len(pages[i])))
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots), page_tables=torch.tensor(table, dtype=torch.int32),
            seq_lens=torch.tensor(lens, dtype=torch.int32), query_start_loc=torch.tensor(qsl, dtype=torch.int32),
            decode_only=all(n == 1 for _, n in step), seq_lens_cpu=lens, query_start_loc_cpu=qsl,
        )
        with torch.no_grad():
            out = model.compute_logits(model(torch.tensor(ids), torch.tensor(pos), backend, meta))
        for k, (i, n) in enumerate(step):
            logits[i].append(out[qsl[k] : qsl[k + 1]])
            done[i] += n
    return [torch.cat(x) for x in logits]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers(tmp_path, family, tied):
    path = make_checkpoint(tmp_path / family, family, tie_word_embeddings=tied, tokenizer=False)
    ckpt = load_hf_dir(path, load_tokenizer=False)
    arch = ModelArch.from_hf_config(ckpt.hf_config)
    assert arch.tie_word_embeddings == tied
    model = DecoderLM.empty(arch, 512, torch.float32, torch.device("cpu"))
    model.load_weights(ckpt.weights)
    cache = KVCache(KVCacheSpec.of(arch, PAGE, torch.float32), 64, torch.device("cpu"))

    g = torch.Generator().manual_seed(1)
    lengths = [37, 12, 29]  # > mistral's sliding window of 24 for two of them
    seqs = [torch.randint(3, arch.vocab_size, (n,), generator=g).tolist() for n in lengths]
    # step 1: prefill seq0 (chunk of 20) + seq1 whole prompt (10)
    # step 2: seq0 next chunk (15), seq1 decode, seq2 prefill (27)
    # steps 3-4: everyone decodes / finishes
    steps = [
        [(0, 20), (1, 10)],
        [(0, 15), (1, 1), (2, 27)],
        [(0, 1), (1, 1), (2, 1)],
        [(0, 1), (2, 1)],
    ]
    ours = _forward_steps(model, cache, seqs, steps)

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for s, seq in enumerate(seqs):
        with torch.no_grad():
            ref = hf(torch.tensor([seq])).logits[0]
        assert ours[s].shape == ref.shape
        diff = (ours[s] - ref).abs().max().item()
        assert diff <= 1e-4, f"{family} seq {s}: max abs logit diff {diff:.2e}"
