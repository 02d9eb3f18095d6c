"""Token sampling: logits -> warped distribution -> one token per row.

Owns no request state. `warp_logits` turns a batch of logits into the exact distribution the
sampling parameters describe (temperature, then top-k, top-p, min-p, renormalised); the speculative
rejection sampler reuses it, so it is exact and vectorised over rows. `Sampler` draws one token per
row with the exponential-race trick, taking the noise of a seeded row only from that row's own
`torch.Generator`, so a seeded request samples the same tokens whatever else is in the batch.

Truncation semantics (all three are thresholds on the temperature-scaled logits, so ties at a
boundary are kept together and the result does not depend on sort stability):
  * top-k: keep tokens whose logit is >= the k-th largest logit (k <= 0 or k >= V: off);
  * top-p: over the top-k distribution, keep the smallest prefix of the descending order whose mass
    is >= top_p (the top token is always kept), plus any token tied with the last one kept;
  * min-p: keep tokens with prob >= min_p * max prob (a ratio, so it is the same before or after
    top-k/top-p renormalisation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from specray.engine.sampling_params import SamplingParams

_GREEDY_EPS = 1e-5  # the same threshold as SamplingParams.greedy
_TINY = 1e-30  # floor for exponential noise (a 0 would make probs / q NaN or inf)


def compute_logprobs(logits: Tensor) -> Tensor:
    """log_softmax in fp32. logits: [S, V] -> [S, V] fp32."""
    return torch.log_softmax(logits.float(), dim=-1)


def _needs_sort(top_k: Tensor, top_p: Tensor, vocab: int) -> bool:
    return bool(((top_k > 0) & (top_k < vocab)).any() or (top_p < 1.0).any())


def warp_logits(
    logits: Tensor,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    min_p: Tensor,
    needs_sort: bool | None = None,
) -> Tensor:
    """The warped, renormalised sampling distribution of each row.

    logits: [S, V] (any float dtype, computed in fp32); temperature, top_p, min_p: [S] float;
    top_k: [S] int (<= 0 = off). Rows with temperature < 1e-5 come back one-hot on the argmax.
    `needs_sort` lets a caller that knows no row uses top-k/top-p skip the host sync that checks it.
    Returns probs: [S, V] fp32, each row summing to 1.
    """
    logits = logits.float()
    num_rows, vocab = logits.shape
    device = logits.device
    temperature = temperature.to(device=device, dtype=torch.float32)
    top_k = top_k.to(device=device, dtype=torch.long)
    top_p = top_p.to(device=device, dtype=torch.float32)
    min_p = min_p.to(device=device, dtype=torch.float32)

    greedy = temperature < _GREEDY_EPS  # [S]
    scaled = logits / torch.where(greedy, 1.0, temperature).unsqueeze(1)  # [S, V]
    row_max = scaled.amax(dim=-1, keepdim=True)  # [S, 1]

    # min-p in logit space: p_i >= min_p * p_max  <=>  z_i >= z_max + log(min_p).
    threshold = row_max + torch.log(min_p).unsqueeze(1)  # [S, 1]; min_p = 0 -> -inf (off)

    if needs_sort is None:
        needs_sort = _needs_sort(top_k, top_p, vocab)
    if needs_sort:
        sorted_z = torch.sort(scaled, dim=-1, descending=True).values  # [S, V]
        # top-k: the k-th largest logit; k off -> the smallest logit, which keeps everything.
        k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)  # [S]
        kth = sorted_z.gather(1, (k - 1).unsqueeze(1))  # [S, 1]
        sorted_z = sorted_z.masked_fill(sorted_z < kth, float("-inf"))
        # top-p over the top-k distribution: keep while the mass strictly before a token < top_p.
        sorted_p = torch.softmax(sorted_z, dim=-1)  # [S, V]
        mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # [S, V]
        n_keep = (mass_before < top_p.unsqueeze(1)).sum(dim=-1).clamp_(min=1)  # [S]
        pth = sorted_z.gather(1, (n_keep - 1).unsqueeze(1))  # [S, 1]
        pth = torch.where((top_p < 1.0).unsqueeze(1), pth, float("-inf"))
        threshold = torch.maximum(threshold, torch.maximum(kth, pth))

    probs = torch.softmax(scaled.masked_fill(scaled < threshold, float("-inf")), dim=-1)  # [S, V]
    if bool(greedy.any()):
        one_hot = torch.zeros_like(probs)
        one_hot.scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(greedy.unsqueeze(1), one_hot, probs)
    return probs


def sample_from_probs(
    probs: Tensor,
    generators: Sequence[torch.Generator | None],
    shared: torch.Generator | None = None,
) -> Tensor:
    """One token per row by the exponential race argmax(p / E), E ~ Exp(1) i.i.d.

    probs: [S, V]; generators[i] (if not None) supplies all of row i's noise, so its draw does not
    depend on the other rows; the remaining rows draw one block of noise from `shared` (None: torch's
    default generator). Returns [S] int64.
    """
    vocab = probs.shape[1]
    noise = torch.empty_like(probs, dtype=torch.float32)  # [S, V]
    shared_rows = [i for i, g in enumerate(generators) if g is None]
    if shared_rows:
        block = torch.empty((len(shared_rows), vocab), dtype=torch.float32, device=probs.device)
        block.exponential_(generator=shared)
        noise[torch.tensor(shared_rows, device=probs.device)] = block
    for i, gen in enumerate(generators):
        if gen is not None:
            noise[i].exponential_(generator=gen)
    noise.clamp_(min=_TINY)
    return (probs.float() / noise).argmax(dim=-1)


def first_argmax(logits: Tensor) -> Tensor:
    """`logits.argmax(-1)` (the first index of each row's maximum) in two stages. logits: [S, V] -> [S] int64.

    One row of a 128K vocabulary is a single reduction of 128K elements; torch reduces it in about
    27 us on an H200. Viewed as [S, V / c, c] the chunk maxima reduce in parallel, then the argmax of
    the chunk maxima picks the first chunk holding the row maximum, and that chunk's own first argmax
    is the row's first argmax (NaN, the largest value to torch.max, is picked the same way).
    """
    num_rows, vocab = logits.shape
    chunk = next((c for c in (512, 256, 128, 64) if vocab % c == 0 and vocab >= 8 * c), 0)
    if not chunk:
        return logits.argmax(dim=-1)
    vals, idx = logits.reshape(num_rows, vocab // chunk, chunk).max(dim=-1)  # [S, V / c] each
    best = vals.argmax(dim=-1, keepdim=True)  # [S, 1]
    return (best * chunk + idx.gather(1, best)).squeeze(1)


class Sampler:
    """Picks the next token of each row: argmax for greedy rows, a warped draw for the others."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator  # noise for rows without their own generator

    def __call__(
        self,
        logits: Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> Tensor:
        """logits: [S, V]; params, generators: one per row. Returns next tokens [S] int64."""
        num_rows = logits.shape[0]
        if len(params) != num_rows or len(generators) != num_rows:
            raise ValueError(f"sampler got {num_rows} logit rows, {len(params)} params, {len(generators)} generators")
        logits = logits.float()
        tokens = first_argmax(logits)  # [S]; final for greedy rows
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if not rows:
            return tokens
        sub = [params[i] for i in rows]
        device = logits.device
        vocab = logits.shape[1]
        top_k = [p.effective_top_k for p in sub]
        top_p = [p.top_p for p in sub]
        # One host-to-device copy for all four per-row parameters: [4, R].
        knobs = torch.tensor(
            [[p.temperature for p in sub], [float(k) for k in top_k], top_p, [p.min_p for p in sub]],
            dtype=torch.float32,
        ).to(device)
        probs = warp_logits(
            logits if len(rows) == num_rows else logits[torch.tensor(rows, device=device)],
            knobs[0],
            knobs[1].long(),
            knobs[2],
            knobs[3],
            needs_sort=any(0 < k < vocab for k in top_k) or any(p < 1.0 for p in top_p),
        )  # [R, V]
        drawn = sample_from_probs(probs, [generators[i] for i in rows], self.generator)  # [R]
        if len(rows) == num_rows:
            return drawn
        tokens[torch.tensor(rows, device=device)] = drawn
        return tokens
