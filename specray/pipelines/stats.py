"""A/B decision statistics: bootstrap CIs on quantile differences and an always-valid sequential test.

Owns no state; every function takes per-request metric arrays of two arms (control `a`, treatment
`b`) and returns plain dataclasses that `tracking.py` logs and `ab.py` prints.

Terminology:
- *difference* is always treatment minus control (`b - a`): for a latency a negative difference
  means the treatment is faster.
- `bootstrap_quantile_diff`: percentile bootstrap, resampling each arm independently (the arms are
  independent samples under sticky randomisation), of `quantile(b, q) - quantile(a, q)`.
- `msprt`: the mixture sequential probability ratio test (Johari, Pekelis & Walsh, "Always Valid
  Inference", 2017/2022) with a normal mixture prior N(0, tau^2) on the mean difference theta. The
  observations are paired in arrival order (the i-th request of `a` with the i-th of `b`), so the
  pair differences d_i are i.i.d. with mean theta and variance V, and
      Lambda_n = sqrt(V / (V + n tau^2)) * exp(n^2 tau^2 dbar_n^2 / (2 V (V + n tau^2)))
  is a nonnegative martingale under theta = 0. By Ville's inequality P(sup_n Lambda_n >= 1/alpha)
  <= alpha, so the always-valid p-value p_n = min(1, min_{m<=n} 1/Lambda_m) may be watched after
  every request and the experiment stopped as soon as p_n <= alpha. V is estimated from the pairs
  seen so far (plug-in, as in the paper); looks start after `min_pairs` pairs (20 by default: with
  fewer, the noisy plug-in variance makes early looks slightly anti-conservative).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

Transform = Literal["identity", "log"]


@dataclass(frozen=True)
class BootstrapCI:
    metric: str
    quantile: float
    control: float  # the quantile of arm a
    treatment: float  # the quantile of arm b
    diff: float  # treatment - control
    low: float
    high: float
    confidence: float
    n_control: int
    n_treatment: int

    @property
    def significant(self) -> bool:
        """The interval excludes zero."""
        return self.low > 0 or self.high < 0

    @property
    def rel_diff(self) -> float:
        return self.diff / self.control if self.control else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "significant": self.significant, "rel_diff": self.rel_diff}


def _clean(x: np.ndarray | list[float], name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64).ravel()
    arr = arr[np.isfinite(arr)]
    if arr.size < 2:
        raise ValueError(f"{name} needs at least 2 finite values, got {arr.size}")
    return arr


def bootstrap_quantile_diff(a: np.ndarray | list[float], b: np.ndarray | list[float], q: float,
                            metric: str = "", n_boot: int = 2000, confidence: float = 0.95,
                            seed: int = 0) -> BootstrapCI:
    """Percentile-bootstrap CI of `quantile(b, q) - quantile(a, q)`; NaNs (e.g. TPOT of 1-token outputs) dropped."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {q}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    xa, xb = _clean(a, f"{metric or 'metric'} of the control arm"), _clean(b, f"{metric or 'metric'} of the treatment")
    rng = np.random.default_rng(seed)
    # [n_boot, n] resamples, one quantile per row
    qa = np.quantile(xa[rng.integers(0, xa.size, (n_boot, xa.size))], q, axis=1)
    qb = np.quantile(xb[rng.integers(0, xb.size, (n_boot, xb.size))], q, axis=1)
    diffs = qb - qa
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(diffs, [tail, 1.0 - tail])
    ca, cb = float(np.quantile(xa, q)), float(np.quantile(xb, q))
    return BootstrapCI(metric, q, ca, cb, cb - ca, float(low), float(high), confidence, xa.size, xb.size)


@dataclass(frozen=True)
class SequentialResult:
    metric: str
    transform: Transform
    alpha: float
    tau: float
    n_pairs: int
    mean_diff: float  # mean of pair differences on the transformed scale (treatment - control)
    p_value: float  # always-valid p-value after the last pair
    rejected: bool  # H0 (no difference) rejected at some look
    stopped_at: int | None  # the number of pairs at the first look with p <= alpha
    # p-value path, one entry per look (pairs min_pairs..n_pairs); for logging with step = pairs
    path: list[float] = field(default_factory=list, repr=False)

    @property
    def decision(self) -> Literal["treatment_lower", "treatment_higher", "no_difference_yet"]:
        if not self.rejected:
            return "no_difference_yet"
        return "treatment_lower" if self.mean_diff < 0 else "treatment_higher"

    def to_dict(self, with_path: bool = False) -> dict:
        d = asdict(self)
        if not with_path:
            d.pop("path")
        d["decision"] = self.decision
        return d


def msprt_pvalues(d: np.ndarray, tau: float, min_pairs: int = 20) -> np.ndarray:
    """Always-valid p-values after each of pairs min_pairs..len(d) for the pair differences `d`."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if min_pairs < 2:
        raise ValueError(f"min_pairs must be >= 2, got {min_pairs}")
    d = np.asarray(d, dtype=np.float64)
    n = np.arange(1, d.size + 1, dtype=np.float64)
    csum = np.cumsum(d)
    mean = csum / n
    # running unbiased variance (plug-in V), guarded against 0 for constant data
    csq = np.cumsum(d * d)
    with np.errstate(invalid="ignore", divide="ignore"):
        var = (csq - n * mean * mean) / np.maximum(n - 1, 1)
    var = np.maximum(var, 1e-12)
    t2 = tau * tau
    log_lr = 0.5 * np.log(var / (var + n * t2)) + (n * n * t2 * mean * mean) / (2 * var * (var + n * t2))
    log_lr = log_lr[min_pairs - 1:]
    p = np.minimum(1.0, np.exp(-log_lr))
    return np.minimum.accumulate(p) if p.size else p


def msprt(a: np.ndarray | list[float], b: np.ndarray | list[float], alpha: float = 0.05, tau: float = 0.1,
          transform: Transform = "log", metric: str = "", min_pairs: int = 20) -> SequentialResult:
    """mSPRT of H0: E[b] = E[a] on per-request values in arrival order (`log`: a test on the ratio)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    xa = np.asarray(a, dtype=np.float64)
    xb = np.asarray(b, dtype=np.float64)
    if transform == "log":
        with np.errstate(divide="ignore", invalid="ignore"):
            xa, xb = np.log(xa), np.log(xb)
    elif transform != "identity":
        raise ValueError(f"transform must be 'identity' or 'log', got {transform!r}")
    xa, xb = xa[np.isfinite(xa)], xb[np.isfinite(xb)]
    n = min(xa.size, xb.size)
    d = xb[:n] - xa[:n]
    path = msprt_pvalues(d, tau, min_pairs) if n >= min_pairs else np.zeros(0)
    p = float(path[-1]) if path.size else 1.0
    hits = np.nonzero(path <= alpha)[0]
    stopped = int(hits[0]) + min_pairs if hits.size else None
    mean_diff = float(d.mean()) if n else float("nan")
    return SequentialResult(metric, transform, alpha, tau, n, mean_diff, p, stopped is not None, stopped,
                            [float(x) for x in path])


@dataclass
class Decision:
    """What `specray ab run` concludes: CIs for each (metric, quantile), the sequential test, a verdict."""

    control: str
    treatment: str
    cis: list[BootstrapCI]
    sequential: SequentialResult | None
    verdict: str

    def to_dict(self) -> dict:
        return {
            "control": self.control, "treatment": self.treatment, "verdict": self.verdict,
            "bootstrap": [c.to_dict() for c in self.cis],
            "sequential": self.sequential.to_dict() if self.sequential else None,
        }


def decide(control: str, treatment: str, a: dict[str, list[float]], b: dict[str, list[float]],
           quantiles: tuple[float, ...] = (0.5, 0.9), metrics: tuple[str, ...] = ("tpot_ms", "e2e_ms"),
           sequential_metric: str = "tpot_ms", alpha: float = 0.05, tau: float = 0.1, n_boot: int = 2000,
           seed: int = 0, min_pairs: int = 20) -> Decision:
    """Bootstrap CIs on `metrics` x `quantiles` differences plus the mSPRT on `sequential_metric` (log scale).

    `a`/`b` map a metric name to the per-request values of each arm in arrival order.
    """
    cis: list[BootstrapCI] = []
    for m in metrics:
        for q in quantiles:
            try:
                cis.append(bootstrap_quantile_diff(a.get(m, []), b.get(m, []), q, metric=m, n_boot=n_boot,
                                                   confidence=1 - alpha, seed=seed))
            except ValueError:
                continue  # too few values of this metric in an arm: no interval
    seq = None
    if sequential_metric in a and sequential_metric in b:
        seq = msprt(a[sequential_metric], b[sequential_metric], alpha=alpha, tau=tau, metric=sequential_metric,
                    min_pairs=min_pairs)
    verdict = _verdict(treatment, cis, seq)
    return Decision(control, treatment, cis, seq, verdict)


def _verdict(treatment: str, cis: list[BootstrapCI], seq: SequentialResult | None) -> str:
    sig = [c for c in cis if c.significant]
    parts = []
    if seq is not None and seq.rejected:
        word = "lower" if seq.mean_diff < 0 else "higher"
        parts.append(f"{treatment} has {word} mean {seq.metric} ({100 * math.expm1(seq.mean_diff):+.1f}%"
                     if seq.transform == "log" else f"{treatment} has {word} mean {seq.metric} ({seq.mean_diff:+.3g}")
        parts[-1] += f", always-valid p={seq.p_value:.3g}, stopped at {seq.stopped_at} pairs)"
    elif seq is not None:
        parts.append(f"sequential test: no difference yet in {seq.metric} (p={seq.p_value:.3g}, {seq.n_pairs} pairs)")
    for c in sig:
        parts.append(f"{c.metric} p{round(100 * c.quantile)} {c.diff:+.3g} [{c.low:+.3g}, {c.high:+.3g}]")
    if not sig and cis:
        parts.append("no quantile difference is significant")
    return "; ".join(parts) if parts else "not enough data"
