"""Sampler tests: warp_logits against an independent numpy oracle, chi-square goodness of fit of the
drawn tokens, greedy rows, and batch invariance of seeded rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specray.engine.sampler import Sampler, compute_logprobs, sample_from_probs, warp_logits
from specray.engine.sampling_params import SamplingParams

LOGITS = [1.2, 2.0, -0.3, 0.7, -1.5, 0.1, 1.6, -2.4]  # distinct values, top token is index 1
V = len(LOGITS)
N_SAMPLES = 20_000

# (temperature, top_k, top_p, min_p)
COMBOS = [
    (1.0, 0, 1.0, 0.0),  # plain softmax
    (0.7, 0, 1.0, 0.0),
    (1.3, 5, 1.0, 0.0),
    (1.0, 0, 0.8, 0.0),
    (1.0, 0, 1.0, 0.1),
    (0.8, 6, 0.9, 0.05),
    (2.0, 4, 0.7, 0.0),
    (1.5, 0, 0.95, 0.2),
    (1.0, 100, 1.0, 0.0),  # top_k larger than V = off
    (1.0, -1, 1.0, 0.0),  # -1 = off
    (1.0, 1, 1.0, 0.0),  # top_k = 1 -> argmax
    (1.0, 0, 1e-3, 0.0),  # tiny top_p keeps only the top token
    (1.0, 0, 1.0, 1.0),  # min_p = 1 keeps only the top token
    (1e-3, 0, 1.0, 0.0),  # very small temperature (not greedy)
]


def oracle(logits: list[float], temperature: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """Expected warped distribution, written independently of the implementation (float64, loops)."""
    z = np.asarray(logits, dtype=np.float64)
    n = len(z)
    if temperature == 0.0:
        out = np.zeros(n)
        out[int(np.argmax(z))] = 1.0
        return out
    z = z / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = sorted(range(n), key=lambda i: -probs[i])
    keep = np.ones(n, dtype=bool)
    if 0 < top_k < n:
        keep[:] = False
        keep[order[:top_k]] = True
    if top_p < 1.0:
        q = np.where(keep, probs, 0.0)
        q /= q.sum()
        acc, kept = 0.0, np.zeros(n, dtype=bool)
        for i in order:
            kept[i] = True
            acc += q[i]
            assert abs(acc - top_p) > 1e-4, "combo too close to a top-p boundary for an fp32 test"
            if acc >= top_p:
                break
        keep &= kept
    if min_p > 0.0:
        thr = min_p * probs.max()
        assert np.all((np.abs(probs - thr) > 1e-6) | (probs == probs.max())), "min-p boundary"
        keep &= probs >= thr
    out = np.where(keep, probs, 0.0)
    return out / out.sum()


def chi_square_pvalue(observed: np.ndarray, expected_probs: np.ndarray) -> float:
    """Pearson chi-square goodness-of-fit p-value via the regularised upper incomplete gamma."""
    cells = expected_probs > 0
    n = observed.sum()
    exp = expected_probs[cells] * n
    stat = float((((observed[cells] - exp) ** 2) / exp).sum())
    dof = int(cells.sum()) - 1
    if dof == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def test_chi_square_helper_sanity():
    # A perfect fit has p = 1, a gross misfit p ~ 0; and the known 5% critical value of df = 3.
    probs = np.array([0.25, 0.25, 0.5])
    assert chi_square_pvalue(np.array([250, 250, 500]), probs) == pytest.approx(1.0)
    assert chi_square_pvalue(np.array([500, 250, 250]), probs) < 1e-6
    p = torch.special.gammaincc(torch.tensor(1.5, dtype=torch.float64), torch.tensor(7.815 / 2))
    assert float(p) == pytest.approx(0.05, abs=1e-4)


def test_chi_square_has_power_against_a_slightly_wrong_temperature():
    # Samples at T = 1.1 must be rejected against the T = 1.0 oracle: the test can see the bugs it guards.
    logits = torch.tensor([LOGITS]).expand(N_SAMPLES, V)
    tokens = Sampler(torch.Generator().manual_seed(1))(
        logits, [SamplingParams(temperature=1.1)] * N_SAMPLES, [None] * N_SAMPLES
    )
    counts = np.bincount(tokens.numpy(), minlength=V)
    assert chi_square_pvalue(counts, oracle(LOGITS, 1.0, 0, 1.0, 0.0)) < 1e-3


def _knobs(combos):
    t, k, p, m = zip(*combos, strict=True)
    return torch.tensor(t), torch.tensor(k), torch.tensor(p), torch.tensor(m)


@pytest.mark.parametrize("combo", COMBOS)
def test_warp_logits_matches_oracle(combo):
    probs = warp_logits(torch.tensor([LOGITS]), *_knobs([combo]))
    assert probs.dtype == torch.float32 and probs.shape == (1, V)
    np.testing.assert_allclose(probs[0].double().numpy(), oracle(LOGITS, *combo), atol=1e-6)


def test_warp_logits_vectorised_mixed_rows():
    rng = np.random.default_rng(0)
    combos = [*COMBOS, (0.0, 0, 1.0, 0.0), (0.0, 3, 0.5, 0.3)]  # plus greedy rows
    rows = [LOGITS if i % 2 == 0 else list(rng.permutation(LOGITS)) for i in range(len(combos))]
    probs = warp_logits(torch.tensor(rows), *_knobs(combos))
    for i, combo in enumerate(combos):
        np.testing.assert_allclose(probs[i].double().numpy(), oracle(rows[i], *combo), atol=1e-6)
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(combos)))


def test_warp_logits_top_p_one_is_plain_softmax_on_large_vocab():
    logits = torch.randn(4, 5000, generator=torch.Generator().manual_seed(1)) * 3
    ones = torch.ones(4)
    probs = warp_logits(logits, ones, torch.tensor([0, -1, 5000, 10_000]), ones, torch.zeros(4))
    torch.testing.assert_close(probs, torch.softmax(logits, -1))
    # Forcing the sort path must not change rows that truncate nothing.
    sorted_path = warp_logits(logits, ones, torch.zeros(4, dtype=torch.long), ones, torch.zeros(4), True)
    torch.testing.assert_close(sorted_path, probs, rtol=0, atol=0)


def test_warp_logits_keeps_ties_at_the_boundary():
    logits = torch.tensor([[3.0, 1.0, 1.0, 0.0]])
    ones = torch.ones(1)
    probs = warp_logits(logits, ones, torch.tensor([2]), ones, torch.zeros(1))
    assert (probs[0, :3] > 0).all() and probs[0, 3] == 0


@pytest.mark.parametrize("combo", COMBOS)
def test_sampler_distribution_chi_square(combo):
    temperature, top_k, top_p, min_p = combo
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    sampler = Sampler(torch.Generator().manual_seed(1234))
    logits = torch.tensor([LOGITS]).expand(N_SAMPLES, V)
    tokens = sampler(logits, [params] * N_SAMPLES, [None] * N_SAMPLES)
    assert tokens.dtype == torch.int64 and tokens.shape == (N_SAMPLES,)
    counts = np.bincount(tokens.numpy(), minlength=V)
    expected = oracle(LOGITS, *combo)
    assert counts[expected == 0].sum() == 0, "a truncated token was sampled"
    assert chi_square_pvalue(counts, expected) > 1e-3


@pytest.mark.parametrize("combo", [COMBOS[0], COMBOS[5], COMBOS[7]])
def test_per_row_generators_distribution_chi_square(combo):
    temperature, top_k, top_p, min_p = combo
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    logits = torch.tensor([LOGITS]).expand(N_SAMPLES, V)
    gens = [torch.Generator().manual_seed(10_000 + i) for i in range(N_SAMPLES)]
    tokens = Sampler()(logits, [params] * N_SAMPLES, gens)
    counts = np.bincount(tokens.numpy(), minlength=V)
    expected = oracle(LOGITS, *combo)
    assert counts[expected == 0].sum() == 0
    assert chi_square_pvalue(counts, expected) > 1e-3


def test_one_seeded_row_over_many_steps_chi_square():
    gen = torch.Generator().manual_seed(7)
    probs = warp_logits(torch.tensor([LOGITS]), *_knobs([COMBOS[3]]))
    tokens = [int(sample_from_probs(probs, [gen])[0]) for _ in range(5000)]
    counts = np.bincount(tokens, minlength=V)
    expected = oracle(LOGITS, *COMBOS[3])
    assert counts[expected == 0].sum() == 0
    assert chi_square_pvalue(counts, expected) > 1e-3


def test_greedy_rows_are_argmax():
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(3))
    greedy = SamplingParams(temperature=0.0)
    sampled = SamplingParams(temperature=1.0)
    params = [greedy if i % 3 else sampled for i in range(64)]
    gens = [torch.Generator().manual_seed(i) if i % 2 else None for i in range(64)]
    tokens = Sampler(torch.Generator().manual_seed(0))(logits, params, gens)
    argmax = logits.argmax(-1)
    mask = torch.tensor([i % 3 != 0 for i in range(64)])
    assert torch.equal(tokens[mask], argmax[mask])
    # Greedy params with top-k/top-p/min-p set are still argmax; so is a bf16 input.
    odd = SamplingParams(temperature=0.0, top_k=3, top_p=0.2, min_p=0.5)
    out = Sampler()(logits.bfloat16(), [odd] * 64, [None] * 64)
    assert torch.equal(out, logits.bfloat16().float().argmax(-1))


def test_tiny_temperature_samples_argmax():
    logits = torch.randn(256, 500, generator=torch.Generator().manual_seed(4))
    params = [SamplingParams(temperature=1e-4)] * 256
    tokens = Sampler(torch.Generator().manual_seed(0))(logits, params, [None] * 256)
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 5e-3  # runner-up prob < exp(-50) at T = 1e-4
    assert clear.sum() > 200
    assert torch.equal(tokens[clear], logits.argmax(-1)[clear])


def _seeded_run(seed: int, steps: list[torch.Tensor], position: int, batch: int, other: str) -> list[int]:
    """Sample `steps` for a seeded row placed at `position` in a batch of `batch` rows."""
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, min_p=0.01, seed=seed)
    own = torch.Generator().manual_seed(seed)
    others = {
        "unseeded": (SamplingParams(temperature=1.0), lambda i: None),
        "seeded": (
            SamplingParams(temperature=1.3, top_p=0.5),
            lambda i: torch.Generator().manual_seed(99 + i),
        ),
        "greedy": (SamplingParams(temperature=0.0), lambda i: None),
    }
    other_params, other_gen = others[other]
    other_gens = [other_gen(i) for i in range(batch)]
    sampler = Sampler(torch.Generator().manual_seed(5))
    out = []
    for logits in steps:
        rows = torch.randn(batch, logits.shape[0])
        rows[position] = logits
        params_list = [other_params] * batch
        params_list[position] = params
        gens = list(other_gens)
        gens[position] = own
        out.append(int(sampler(rows, params_list, gens)[position]))
    return out


@pytest.mark.parametrize("seed", [0, 42])
def test_seeded_row_is_batch_invariant(seed):
    g = torch.Generator().manual_seed(100 + seed)
    steps = [torch.randn(2000, generator=g) * 2 for _ in range(30)]
    alone = _seeded_run(seed, steps, position=0, batch=1, other="unseeded")
    assert len(set(alone)) > 5  # it really samples
    for position, batch, other in [(3, 8, "unseeded"), (0, 5, "seeded"), (6, 7, "greedy"), (1, 2, "seeded")]:
        assert _seeded_run(seed, steps, position, batch, other) == alone
    assert _seeded_run(seed + 1, steps, 0, 1, "unseeded") != alone


def test_shared_generator_is_reproducible():
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(8))
    params = [SamplingParams(temperature=1.0, top_k=20)] * 16
    a = Sampler(torch.Generator().manual_seed(11))(logits, params, [None] * 16)
    b = Sampler(torch.Generator().manual_seed(11))(logits, params, [None] * 16)
    assert torch.equal(a, b)


def test_sampler_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, 4), [SamplingParams()], [None, None])


def test_compute_logprobs():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(9)).bfloat16()
    lp = compute_logprobs(logits)
    assert lp.dtype == torch.float32 and lp.shape == (3, 50)
    torch.testing.assert_close(lp, torch.log_softmax(logits.float(), -1))
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3))


@pytest.mark.parametrize("vocab", [128256, 151936, 49152, 4096, 1000, 300])
def test_first_argmax_is_torch_argmax_with_ties_and_nan(vocab):
    """The two-stage argmax returns torch's first index of the row maximum (oracle: `Tensor.argmax`), also
    when the maximum repeats across and inside chunks, and with NaN (torch's largest value)."""
    from specray.engine.sampler import first_argmax

    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, vocab, generator=g)
    top = logits.max() + 1
    logits[1, [vocab - 1, vocab // 2, 7]] = top  # a repeated maximum: the first (7) wins
    logits[2, [5, 6]] = top  # two inside one chunk
    logits[3] = 0.0  # all equal: index 0
    logits[4, [vocab - 3, 11]] = float("nan")
    logits[5, vocab - 1] = top  # the very last index
    want = logits.argmax(dim=-1)
    assert want[1] == 7 and want[2] == 5 and want[3] == 0 and want[5] == vocab - 1
    assert torch.equal(first_argmax(logits), want)
    assert torch.equal(first_argmax(logits.to(torch.bfloat16)), logits.to(torch.bfloat16).argmax(dim=-1))
    assert torch.equal(first_argmax(logits[2:5]), want[2:5])  # a row slice of a larger buffer
