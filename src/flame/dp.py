"""Differential privacy on the node: `flame.dp.laplace`, `flame.dp.gaussian`, clipping.

Runtime statistics: `sum(column, epsilon=...)`, `mean`, `count` and `histogram` name a column
of the node's data; the node runtime (not the analysis) reads it, clips it to the bounds the
data holder's policy declares for it (`dp_bounds`, `dp_clamp`), computes the statistic and
its sensitivity with OpenDP transformations (clamp, sum, count, find_bin/count_by_categories)
and adds the noise. Nothing the analysis chose sets the sensitivity: bounds picked by code
that has seen the data could themselves encode a record. Neighbouring datasets differ by
adding or removing one record; missing values (NaN) are dropped first.

`laplace(x, sensitivity, epsilon)` and `gaussian(x, sensitivity, epsilon, delta)` mark a
scalar or an array for release with noise. The node runtime (never the analysis) draws the
noise with OpenDP's floating-point-safe samplers (a CSPRNG: unseedable on purpose), charges
(epsilon, delta) to the node's budget ledger, and only then sends. Their sensitivity is the
analyst's claim, so a node whose policy has a budget refuses them unless it sets
`trust_sensitivity = true` (reviewed code only). For arrays, Laplace takes the L1
sensitivity of the whole vector and Gaussian the L2 sensitivity.

Distributed noise for secure sums: `flame.secure(flame.dp.gaussian(x, s, eps, delta,
contributors=k))` makes each of k nodes add Gaussian noise of variance sigma^2 / k, so the
decrypted sum of k contributions carries noise of variance sigma^2 and is (eps, delta)-DP
for each node's data. The guarantee assumes all k contributors add their share honestly
and that nobody sees a single node's noisy contribution (secure aggregation); if t of them
collude and remove their own noise, the sum keeps variance sigma^2 (k - t) / k. Set k to
the number of contributors you trust, no more. Laplace has no such split here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from flame.errors import FlameError
from flame.privacy.markers import register

__all__ = [
    "Noise",
    "Statistic",
    "clip",
    "clip_norm",
    "count",
    "gaussian",
    "gaussian_sigma",
    "histogram",
    "laplace",
    "laplace_scale",
    "mean",
    "spends",
    "sum",
]

F = TypeVar("F", bound=Callable[..., Any])


@register("noise")
@dataclass(frozen=True)
class Noise:
    """A value the node releases only with noise of the given mechanism and parameters.

    Its repr leaves `values` out: a marker that ends up in an error message or a log line
    (one the release never reached) must not print the exact value it guards."""

    values: Any = field(repr=False)
    mechanism: str
    sensitivity: float
    epsilon: float
    delta: float = 0.0
    contributors: int = 1

    def check(self, path: str) -> None:
        """FlameError unless the parameters are what `laplace`/`gaussian` would accept: a
        marker forged in the analysis child (negative epsilon and sensitivity keep the noise
        scale positive while the ledger charges nothing) must not be released."""
        where = f"flame.dp at {path or 'the top'!r}"
        try:
            if self.mechanism == "laplace":
                laplace(None, self.sensitivity, self.epsilon)
                ok = self.delta == 0 and self.contributors == 1
            elif self.mechanism == "gaussian":
                gaussian(
                    None, self.sensitivity, self.epsilon, self.delta, contributors=self.contributors
                )
                ok = True
            else:
                ok = False
        except FlameError as exc:
            raise FlameError(f"{where}: {exc}") from None
        if not ok:
            raise FlameError(f"{where}: malformed noise marker")


def _positive(name: str, value: float, *, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise FlameError(f"flame.dp: {name} must be a number, got {type(value).__name__}")
    number = float(value)
    if not (math.isfinite(number) and number > 0 and (upper is None or number < upper)):
        bound = f" and below {upper:g}" if upper is not None else ""
        raise FlameError(f"flame.dp: {name} must be positive{bound}, got {number!r}")
    return number


def laplace(values: Any, sensitivity: float, epsilon: float) -> Noise:
    """Release `values` with Laplace noise of scale sensitivity/epsilon ((epsilon, 0)-DP)."""
    return Noise(
        values, "laplace", _positive("sensitivity", sensitivity), _positive("epsilon", epsilon)
    )


def gaussian(
    values: Any, sensitivity: float, epsilon: float, delta: float, *, contributors: int = 1
) -> Noise:
    """Release `values` with Gaussian noise calibrated by OpenDP to (epsilon, delta)-DP.

    `contributors=k` (inside `flame.secure`) splits the noise over k nodes (module doc).
    """
    if isinstance(contributors, bool) or not isinstance(contributors, int) or contributors < 1:
        raise FlameError(
            f"flame.dp.gaussian: contributors must be an int >= 1, got {contributors!r}"
        )
    return Noise(
        values,
        "gaussian",
        _positive("sensitivity", sensitivity),
        _positive("epsilon", epsilon),
        _positive("delta", delta, upper=1.0),
        contributors,
    )


STATISTICS = ("sum", "mean", "count", "histogram")
_MAX_BINS = 100_000


@register("dp_statistic")
@dataclass(frozen=True)
class Statistic:
    """A statistic of one column the node runtime computes, clips and noises itself."""

    kind: str
    column: str
    epsilon: float
    delta: float = 0.0
    file: str | None = None
    source: str | None = None
    bins: list[float] | None = None
    contributors: int = 1

    @property
    def mechanism(self) -> str:
        return "gaussian" if self.delta > 0 else "laplace"

    def check(self, path: str) -> None:
        """FlameError unless well formed (the marker may be forged in the analysis child)."""
        where = f"flame.dp at {path or 'the top'!r}"
        if self.kind not in STATISTICS:
            raise FlameError(f"{where}: unknown statistic (not one of {', '.join(STATISTICS)})")
        for name in ("column", "file", "source"):
            value = getattr(self, name)
            if not (value is None and name != "column") and not (
                isinstance(value, str) and 0 < len(value) <= 256
            ):
                raise FlameError(f"{where}: {name} must be a name")
        try:
            _positive("epsilon", self.epsilon)
            if self.delta != 0:
                _positive("delta", self.delta, upper=1.0)
        except FlameError as exc:
            raise FlameError(f"{where}: {exc}") from None
        k = self.contributors
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise FlameError(f"{where}: contributors must be an int >= 1")
        if k > 1 and (self.delta == 0 or self.kind == "mean"):
            raise FlameError(f"{where}: contributors > 1 needs a Gaussian (delta > 0) sum/count")
        if (self.kind == "histogram") != (self.bins is not None):
            raise FlameError(f"{where}: bins belong to (and only to) a histogram")
        if self.bins is not None:
            edges = np.asarray(self.bins, dtype=np.float64) if _numbers(self.bins) else None
            if (
                edges is None
                or edges.ndim != 1
                or not 2 <= edges.size <= _MAX_BINS
                or not np.isfinite(edges).all()
                or not (np.diff(edges) > 0).all()
            ):
                raise FlameError(f"{where}: bins must be 2 or more increasing finite edges")


def _numbers(values: Any) -> bool:
    return isinstance(values, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
    )


def _statistic(
    kind: str,
    column: str,
    epsilon: float,
    delta: float,
    file: str | None,
    source: str | None,
    bins: Any = None,
    contributors: int = 1,
) -> Statistic:
    edges = None if bins is None else [float(b) for b in np.asarray(bins).reshape(-1)]
    marker = Statistic(kind, column, epsilon, delta, file, source, edges, contributors)
    marker.check("")
    return marker


def sum(  # flame.dp.sum, like numpy.sum; the builtin is not used below
    column: str,
    *,
    epsilon: float,
    delta: float = 0.0,
    file: str | None = None,
    source: str | None = None,
    contributors: int = 1,
) -> Statistic:
    """The sum of `column` clipped to the node's bounds for it, with noise of scale
    max(|lower|, |upper|) / epsilon (Laplace; Gaussian with `delta`) drawn by the node."""
    return _statistic("sum", column, epsilon, delta, file, source, None, contributors)


def mean(
    column: str,
    *,
    epsilon: float,
    delta: float = 0.0,
    file: str | None = None,
    source: str | None = None,
) -> Statistic:
    """Noisy clipped sum / noisy count (epsilon and delta split in half), within the bounds."""
    return _statistic("mean", column, epsilon, delta, file, source)


def count(
    column: str,
    *,
    epsilon: float,
    delta: float = 0.0,
    file: str | None = None,
    source: str | None = None,
    contributors: int = 1,
) -> Statistic:
    """How many values `column` holds (missing ones not counted), with noise of scale
    1 / epsilon; needs no bounds."""
    return _statistic("count", column, epsilon, delta, file, source, None, contributors)


def histogram(
    column: str,
    bins: Any,
    *,
    epsilon: float,
    delta: float = 0.0,
    file: str | None = None,
    source: str | None = None,
    contributors: int = 1,
) -> Statistic:
    """Counts of `column` per bin [edge_i, edge_i+1) (values outside are not counted), each
    with noise of scale 1 / epsilon. The edges must not depend on the data."""
    return _statistic("histogram", column, epsilon, delta, file, source, bins, contributors)


def clip(values: Any, lower: float, upper: float) -> np.ndarray:
    """Each value into [lower, upper]: bounds a sum's sensitivity by max(|lower|, |upper|)."""
    if not lower <= upper:
        raise FlameError(f"flame.dp.clip: lower {lower!r} must not exceed upper {upper!r}")
    array = np.asarray(values, dtype=np.float64)
    if np.isnan(array).any():
        raise FlameError("flame.dp.clip: values hold NaN; drop or impute them first")
    return np.clip(array, lower, upper)


def clip_norm(rows: Any, max_norm: float, *, order: int = 2) -> np.ndarray:
    """Scale each row (last axis) down to norm <= max_norm: bounds per-record contributions."""
    _positive("max_norm", max_norm)
    array = np.asarray(rows, dtype=np.float64)
    norms = np.linalg.norm(array, ord=order, axis=-1, keepdims=True)
    factor = np.minimum(1.0, max_norm / np.maximum(norms, np.finfo(np.float64).tiny))
    return np.asarray(array * factor)


def spends(epsilon: float, delta: float = 0.0) -> Callable[[F], F]:
    """Declare what one epoch of `analyze` spends, so a node whose budget cannot cover it
    refuses before `analyze` reads any data: `@flame.dp.spends(epsilon=0.5)`."""
    eps = float(epsilon)
    dlt = float(delta)
    if not (eps >= 0 and 0 <= dlt < 1):
        raise FlameError("flame.dp.spends: epsilon >= 0 and 0 <= delta < 1 are required")

    def mark(function: F) -> F:
        function.__flame_spend__ = {"epsilon": eps, "delta": dlt}  # type: ignore[attr-defined]
        return function

    return mark


# --- the runtime's side: OpenDP -------------------------------------------------------------


def _opendp() -> Any:
    try:
        import opendp.prelude as dp
    except ImportError:  # pragma: no cover - opendp is a dependency
        raise FlameError(
            "flame.dp needs OpenDP: pip install 'flame[dp]' (in an analysis image: add "
            "opendp>=0.12 to the analysis's requirements.txt)"
        ) from None
    dp.enable_features("contrib")
    return dp


def laplace_scale(sensitivity: float, epsilon: float) -> float:
    """The Laplace scale b = sensitivity / epsilon that makes one release epsilon-DP."""
    return sensitivity / epsilon


@functools.lru_cache(maxsize=256)
def gaussian_sigma(sensitivity: float, epsilon: float, delta: float) -> float:
    """The smallest sigma OpenDP proves (epsilon, delta)-DP for this sensitivity (via zCDP)."""
    dp = _opendp()
    import opendp.combinators as comb

    def measurement(scale: float) -> Any:
        base = dp.m.make_gaussian(
            dp.atom_domain(T=float, nan=False), dp.absolute_distance(T=float), scale=scale
        )
        return comb.make_fix_delta(comb.make_zCDP_to_approxDP(base), delta)

    return float(
        dp.binary_search_param(measurement, d_in=float(sensitivity), d_out=(epsilon, delta))
    )


def measure(
    kind: str, values: np.ndarray, bounds: tuple[float, float] | None, bins: Any, mechanism: str
) -> tuple[Any, float]:
    """The exact statistic of `values` (no NaN) and its sensitivity under adding or removing
    one record (L1 for Laplace, L2 for Gaussian), both from an OpenDP transformation."""
    dp = _opendp()
    data = np.asarray(values, dtype=np.float64).reshape(-1).tolist()
    space = (dp.vector_domain(dp.atom_domain(T=float, nan=False)), dp.symmetric_distance())
    if kind == "sum":
        if bounds is None:
            raise FlameError("a sum needs bounds")
        lower, upper = float(bounds[0]), float(bounds[1])
        if lower == upper:  # clipping makes every value the bound: a count times it
            value, ones = measure("count", values, None, None, mechanism)
            return float(value) * lower, ones * max(abs(lower), 1e-300)
        chain = space >> dp.t.then_clamp((lower, upper)) >> dp.t.then_sum()
        return float(chain(data)), float(chain.map(1))
    if kind == "count":
        chain = space >> dp.t.then_count()
        return float(chain(data)), float(chain.map(1))
    if kind == "histogram":
        edges = [float(e) for e in bins]
        metric = dp.L1Distance[int] if mechanism == "laplace" else dp.L2Distance[int]
        chain = dp.t.make_find_bin(*space, edges=edges) >> dp.t.then_count_by_categories(
            categories=list(range(1, len(edges))), null_category=False, MO=metric
        )
        return np.asarray(chain(data), dtype=np.float64), float(chain.map(1))
    raise FlameError(f"unknown statistic {kind[:20]!r}")


def noise_scale(marker: Noise) -> float:
    """Per-node noise scale (Laplace b, or Gaussian sigma / sqrt(contributors))."""
    if marker.mechanism == "laplace":
        return laplace_scale(marker.sensitivity, marker.epsilon)
    if marker.mechanism == "gaussian":
        sigma = gaussian_sigma(marker.sensitivity, marker.epsilon, marker.delta)
        return sigma / math.sqrt(marker.contributors)
    raise FlameError(f"unknown noise mechanism {marker.mechanism[:20]!r}")


def add_noise(values: Any, mechanism: str, scale: float, path: str) -> Any:
    """`values` plus OpenDP noise (a float, or a float64 array of the same shape)."""
    dp = _opendp()
    array = numbers(values, path)
    make = dp.m.make_laplace if mechanism == "laplace" else dp.m.make_gaussian
    metric = dp.l1_distance(T=float) if mechanism == "laplace" else dp.l2_distance(T=float)
    if array.ndim == 0:
        scalar_metric = dp.absolute_distance(T=float)
        sampler = make(dp.atom_domain(T=float, nan=False), scalar_metric, scale=scale)
        return float(sampler(float(array)))
    sampler = make(dp.vector_domain(dp.atom_domain(T=float, nan=False)), metric, scale=scale)
    noisy = np.asarray(sampler(array.reshape(-1).tolist()), dtype=np.float64)
    return noisy.reshape(array.shape)


# --- a marker as the runtime uses it: exact built-ins, read once ---------------------------


def numbers(values: Any, path: str) -> np.ndarray:
    """A marker's values as a fresh float64 array of finite numbers (FlameError otherwise).
    Converting runs the analyst's __array__/__float__: do it before reading the other fields."""
    where = f"flame.dp at {path or 'the top'!r}"
    if isinstance(values, (str, bytes, dict)):
        raise FlameError(f"{where}: values must be numbers")
    try:
        array = np.array(values, dtype=np.float64)  # a copy: nothing the analyst still holds
    except Exception:
        raise FlameError(f"{where}: values must be numbers") from None
    if not np.isfinite(array).all():
        raise FlameError(f"{where}: values must be finite numbers")
    return array


def snapshot(marker: Noise, values: np.ndarray) -> Noise:
    """`marker` rebuilt around `values` (already `numbers`) from exact built-ins: each field
    read once, numbers through float()/int(), text through str, anything else kept for
    `check` to refuse. A subclass or a hook that rewrites the frozen marker cannot make the
    spend charged differ from the noise drawn: check this copy, charge and noise only it."""
    return Noise(
        values,
        _text(marker.mechanism),
        _real(marker.sensitivity),
        _real(marker.epsilon),
        _real(marker.delta),
        _whole(marker.contributors),
    )


def statistic_snapshot(stat: Statistic) -> Statistic:
    """`stat` rebuilt from exact built-ins, each field read once (as `snapshot`)."""
    bins = stat.bins
    return Statistic(
        _text(stat.kind),
        _text(stat.column),
        _real(stat.epsilon),
        _real(stat.delta),
        _text(stat.file),
        _text(stat.source),
        [_real(b) for b in list(bins)] if isinstance(bins, (list, tuple)) else bins,
        _whole(stat.contributors),
    )


def _real(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return value
    try:
        return float(value)
    except (OverflowError, TypeError, ValueError):
        return math.nan  # refused by check


def _whole(value: Any) -> Any:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _text(value: Any) -> Any:
    return str.__str__(value) if isinstance(value, str) else value
