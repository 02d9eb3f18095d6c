"""Tree verification: greedy walks on hand-built trees, and the statistical exactness of rejection
sampling in a small decoding loop (chi-square of the first two emitted tokens against the target's
exact joint), with deliberately biased verifiers that the same test must reject."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from specray.spec.trees import build_beam, build_chain_sampled, build_dynamic, build_tree_sampled
from specray.spec.types import AcceptResult, DraftTree
from specray.spec.verify import verify_batch, verify_greedy, verify_sampling

# ------------------------------------------------------------------------------------------------
# greedy


def logits_with_argmax(argmax: list[int], vocab: int = 8) -> torch.Tensor:
    """[N, vocab] random logits whose row i peaks at argmax[i]."""
    g = torch.Generator().manual_seed(len(argmax))
    x = torch.randn(len(argmax), vocab, generator=g)
    x[torch.arange(len(argmax)), torch.tensor(argmax)] = 10.0
    return x


#  root(7) -> 1 -> 2 -> 3          nodes 0, 1, 3, 5
#          -> 4 -> 5               nodes 2, 4
#  node:   0  1  2  3  4  5
TREE = DraftTree(tokens=[7, 1, 4, 2, 5, 3], parents=[-1, 0, 0, 1, 2, 3], depths=[0, 1, 1, 2, 2, 3])


def test_greedy_full_acceptance_with_leaf_bonus():
    res = verify_greedy(TREE, logits_with_argmax([1, 2, 0, 3, 0, 6]))
    assert res.path == [0, 1, 3, 5] and res.bonus == 6 and res.num_accepted == 3
    assert res.new_tokens(TREE) == [1, 2, 3, 6]


def test_greedy_first_level_rejection():
    res = verify_greedy(TREE, logits_with_argmax([6, 2, 5, 3, 0, 6]))
    assert res.path == [0] and res.bonus == 6 and res.new_tokens(TREE) == [6]


def test_greedy_second_branch():
    res = verify_greedy(TREE, logits_with_argmax([4, 0, 5, 0, 1, 0]))
    assert res.path == [0, 2, 4] and res.bonus == 1 and res.new_tokens(TREE) == [4, 5, 1]


def test_greedy_mid_rejection_and_duplicate_children():
    # root -> 3 (node 1), 3 (node 2, duplicate), node 2 -> 0 (node 3): the first child in index order wins.
    tree = DraftTree([0, 3, 3, 0], [-1, 0, 0, 2], [0, 1, 1, 2])
    res = verify_greedy(tree, logits_with_argmax([3, 5, 0, 1]))
    assert res.path == [0, 1] and res.bonus == 5


def test_greedy_chain_and_lone_root():
    chain = DraftTree.chain(0, [4, 4, 2])
    assert verify_greedy(chain, logits_with_argmax([4, 4, 1, 0])).new_tokens(chain) == [4, 4, 1]
    root = DraftTree([5], [-1], [0])
    assert verify_greedy(root, logits_with_argmax([2])) == AcceptResult(path=[0], bonus=2)
    with pytest.raises(ValueError, match="target_logits"):
        verify_greedy(TREE, torch.zeros(5, 8))


def test_verify_batch_matches_single():
    trees = [TREE, DraftTree.chain(0, [4, 4, 2]), DraftTree([5], [-1], [0])]
    logits = [logits_with_argmax([1, 2, 0, 3, 0, 6]), logits_with_argmax([4, 4, 1, 0]), logits_with_argmax([2])]
    expected = [verify_greedy(t, x) for t, x in zip(trees, logits, strict=True)]
    assert verify_batch(trees, logits, greedy=True) == expected
    assert verify_batch(trees, torch.cat(logits), greedy=True) == expected
    probs = [torch.softmax(x, dim=-1) for x in logits]
    mixed = verify_batch(trees, probs, greedy=[True, False, True], generators=[None, torch.Generator(), None])
    assert mixed[0] == expected[0] and mixed[2] == expected[2]


# ------------------------------------------------------------------------------------------------
# sampling: small deterministic checks


def test_sampling_with_one_hot_target_is_greedy():
    probs = torch.softmax(logits_with_argmax([1, 2, 0, 3, 0, 6]) * 100, dim=-1)
    probs = (probs == probs.amax(dim=-1, keepdim=True)).float()
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert verify_sampling(TREE, probs, gen) == verify_greedy(TREE, probs)


def test_sampling_equal_draft_and_target_accepts_everything():
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(4, 8, generator=g), dim=-1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        tree = build_chain_sampled(0, 3, lambda t, nodes: p[nodes], gen)
        res = verify_sampling(tree, p, gen)
        assert res.path == [0, 1, 2, 3]


def test_sampling_is_reproducible_and_validates():
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(10, 8, generator=g), dim=-1)
    q = torch.softmax(torch.randn(10, 8, generator=g), dim=-1)
    tree = build_tree_sampled(0, [3, 2], lambda t, nodes: q[nodes], torch.Generator().manual_seed(1))
    a = [verify_sampling(tree, p, torch.Generator().manual_seed(s)) for s in range(30)]
    b = [verify_sampling(tree, p, torch.Generator().manual_seed(s)) for s in range(30)]
    assert a == b and len({(tuple(r.path), r.bonus) for r in a}) > 3
    with pytest.raises(ValueError, match="draft_probs"):
        verify_sampling(DraftTree([0, 1], [-1, 0], [0, 1], None, True), p[:2])
    with pytest.raises(ValueError, match="target_probs"):
        verify_sampling(tree, p[:3])


# ------------------------------------------------------------------------------------------------
# sampling: statistical exactness in a decoding loop
#
# Target p(next | emitted prefix) and draft q(next | emitted prefix) are random tables over all
# prefixes up to length MAX_PREFIX on a vocabulary of 6, with zeros in both (truncated supports that
# differ). Each trial decodes until two tokens are emitted (one or two speculative steps); the joint
# of those two tokens must be p(x1) p(x2 | x1).

V = 6
MAX_PREFIX = 5
ROOT = 0
TRIALS = 20_000


def _prefix_index() -> dict[tuple[int, ...], int]:
    index: dict[tuple[int, ...], int] = {}
    for length in range(MAX_PREFIX + 1):
        for prefix in itertools.product(range(V), repeat=length):
            index[prefix] = len(index)
    return index


INDEX = _prefix_index()


def _random_tables() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    rows = len(INDEX)
    p = torch.softmax(1.2 * torch.randn(rows, V, generator=g), dim=-1) + 0.02
    p[torch.arange(rows), torch.randint(0, V, (rows,), generator=g)] = 0.0  # target drops a token
    q = torch.softmax(1.5 * torch.randn(rows, V, generator=g), dim=-1)
    for _ in range(2):  # draft drops up to two tokens (maybe ones the target keeps)
        q[torch.arange(rows), torch.randint(0, V, (rows,), generator=g)] = 0.0
    return p / p.sum(dim=-1, keepdim=True), q / q.sum(dim=-1, keepdim=True)


P_TABLE, Q_TABLE = _random_tables()  # [R, V] each
P_ROWS, Q_ROWS = P_TABLE.unbind(0), Q_TABLE.unbind(0)  # per-prefix [V] views: one stack per lookup


def node_prefixes(tree: DraftTree, emitted: tuple[int, ...]) -> list[tuple[int, ...]]:
    out = [emitted]
    for i in range(1, tree.num_nodes):
        out.append(out[tree.parents[i]] + (tree.tokens[i],))
    return out


def rows_for(
    rows: tuple[torch.Tensor, ...], tree: DraftTree, emitted: tuple[int, ...], nodes: list[int]
) -> torch.Tensor:
    prefixes = node_prefixes(tree, emitted)
    return torch.stack([rows[INDEX[prefixes[i]]] for i in nodes])  # [len(nodes), V]


DETERMINISTIC_ARMS = ("beam", "dynamic")


def draft(arm: str, emitted: tuple[int, ...], gen: torch.Generator) -> DraftTree:
    root = emitted[-1] if emitted else ROOT

    def probs(tree: DraftTree, nodes: list[int]) -> torch.Tensor:
        return rows_for(Q_ROWS, tree, emitted, nodes)

    def logp(tree: DraftTree, nodes: list[int]) -> torch.Tensor:
        return rows_for(Q_ROWS, tree, emitted, nodes).log()

    if arm == "chain_sampled":
        return build_chain_sampled(root, 2, probs, gen)  # only the first two emitted tokens are scored
    if arm == "tree_sampled":
        return build_tree_sampled(root, [3, 2], probs, gen)
    if arm == "beam":  # deterministic candidates
        return build_beam(root, [2, 3], logp)
    if arm == "dynamic":
        return build_dynamic(root, 2, 2, 4, logp)
    raise AssertionError(arm)


def biased_verify(tree: DraftTree, target: torch.Tensor, rng: random.Random, bug: str) -> AcceptResult:
    """A plain-Python verifier with one deliberate bug (randomness from Python's `random` for speed):
    "inverse": accept a sampled child with min(1, q/p) instead of min(1, p/q);
    "no_residual": after a rejection keep p as it was (no max(p - q, 0), no zeroing of the candidate);
    "no_renorm": after a rejection take the residual but do not renormalise it;
    "none": no bug (a control for the negative tests)."""
    kids = tree.children()
    rows = target.tolist()
    qrows = tree.draft_probs.tolist() if tree.sampled_children else None
    path, node = [0], 0
    while True:
        p = rows[node]  # normalised unless bug == "no_renorm"
        moved = False
        for c in kids[node]:
            x = tree.tokens[c]
            if tree.sampled_children:
                q = qrows[node]
                if bug == "inverse":
                    acc = 1.0 if p[x] == 0 else q[x] / p[x]
                else:
                    acc = p[x] / q[x]
            else:
                acc = p[x]
            if rng.random() < acc:
                path.append(c)
                node, moved = c, True
                break
            if bug == "no_residual":
                continue
            if tree.sampled_children:
                residual = [max(a - b, 0.0) for a, b in zip(p, q, strict=True)]
            else:
                residual = list(p)
                residual[x] = 0.0
            mass = sum(residual)
            if mass > 0:
                p = residual if bug == "no_renorm" else [r / mass for r in residual]
        if not moved:
            return AcceptResult(path=path, bonus=rng.choices(range(V), weights=p)[0])


def first_two_tokens(arm: str, trials: int, seed: int, bug: str | None = None) -> torch.Tensor:
    """Counts [V * V] of (x1, x2) over `trials` decoding runs, verified by `verify_sampling` (or by
    `biased_verify` with `bug`). A deterministic arm's tree depends only on the emitted prefix, so it
    is built once per prefix; sampled arms draw a fresh tree every step."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    cache: dict[tuple[int, ...], tuple[DraftTree, torch.Tensor]] = {}
    counts = [0] * (V * V)
    with torch.inference_mode():  # ~10% less per-op overhead
        for _ in range(trials):
            emitted: tuple[int, ...] = ()
            while len(emitted) < 2:  # one speculative step, or two if the first emits one token
                if emitted in cache:
                    tree, target = cache[emitted]
                else:
                    tree = draft(arm, emitted, gen)
                    target = rows_for(P_ROWS, tree, emitted, list(range(tree.num_nodes)))  # [N, V]
                    if arm in DETERMINISTIC_ARMS:
                        cache[emitted] = tree, target
                if bug is None:
                    res = verify_sampling(tree, target, gen)
                else:
                    res = biased_verify(tree, target, rng, bug)
                emitted += tuple(res.new_tokens(tree))
            counts[emitted[0] * V + emitted[1]] += 1
    return torch.tensor(counts)


def exact_joint() -> torch.Tensor:
    p1 = P_TABLE[INDEX[()]].double()  # [V]
    p2 = torch.stack([P_TABLE[INDEX[(x,)]].double() for x in range(V)])  # [V, V]
    return (p1.unsqueeze(1) * p2).reshape(-1)  # [V * V]


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson goodness of fit; cells the target gives no mass must be empty (else p = 0)."""
    n = counts.sum().double()
    expected = probs * n
    support = probs > 0
    if counts[~support].any():
        return 0.0
    stat = ((counts[support].double() - expected[support]) ** 2 / expected[support]).sum()
    dof = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def test_chi_square_helper():
    probs = torch.tensor([0.5, 0.25, 0.25, 0.0], dtype=torch.float64)
    assert chi_square_pvalue(torch.tensor([5000, 2500, 2500, 0]), probs) == pytest.approx(1.0)
    assert chi_square_pvalue(torch.tensor([5000, 2500, 2499, 1]), probs) == 0.0
    # stat = 2 * 100^2 / 2500 + 0 = 8, dof 2: p = exp(-4)
    assert chi_square_pvalue(torch.tensor([5000, 2600, 2400, 0]), probs) == pytest.approx(math.exp(-4.0))


def test_tables_are_interesting():
    """The draft differs from the target enough for rejections (and residuals) to matter."""
    tv = 0.5 * (P_TABLE - Q_TABLE).abs().sum(dim=-1)
    assert tv.mean() > 0.3
    assert ((P_TABLE > 0) & (Q_TABLE == 0)).any() and ((P_TABLE == 0) & (Q_TABLE > 0)).any()
    assert exact_joint().sum().item() == pytest.approx(1.0)
    assert (exact_joint()[exact_joint() > 0] * TRIALS).min() > 5  # chi-square cells are not tiny


@pytest.mark.parametrize("arm,seed", [("chain_sampled", 11), ("tree_sampled", 12), ("beam", 13), ("dynamic", 14)])
def test_sampling_is_lossless(arm, seed):
    counts = first_two_tokens(arm, TRIALS, seed)
    pvalue = chi_square_pvalue(counts, exact_joint())
    assert pvalue > 1e-3, f"{arm}: p = {pvalue:.3g}"


# The biased verifiers fail by a wide margin, so they run a quarter of the trials: failing with fewer
# trials shows the test has the power to catch them at the full count.
BIASED_TRIALS = TRIALS // 4


@pytest.mark.parametrize(
    "arm,bug,seed",
    [
        ("chain_sampled", "inverse", 21),
        ("tree_sampled", "no_renorm", 22),
        ("beam", "no_renorm", 23),
        ("dynamic", "no_residual", 24),
    ],
)
def test_biased_verifier_fails(arm, bug, seed):
    counts = first_two_tokens(arm, BIASED_TRIALS, seed, bug)
    pvalue = chi_square_pvalue(counts, exact_joint())
    assert pvalue < 1e-6, f"{arm}/{bug}: p = {pvalue:.3g}"


@pytest.mark.parametrize("arm,seed", [("tree_sampled", 31), ("beam", 32)])
def test_biased_verifier_without_bug_passes(arm, seed):
    """The plain-Python verifier is a faithful reference once the bug is off (guards the negative
    tests against failing for an unrelated reason)."""
    counts = first_two_tokens(arm, BIASED_TRIALS, seed, bug="none")
    assert chi_square_pvalue(counts, exact_joint()) > 1e-3
