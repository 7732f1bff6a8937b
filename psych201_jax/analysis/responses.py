"""Response types and the distances between sampled and human responses (the primitives of ``behaviour``).

``classify_study`` gives a study's response type from its human responses, ``normalise`` the form in which two
responses are compared; the rest are pure numpy functions with their formulas: fair CRPS, total variation,
Jensen–Shannon (bits), 1-Wasserstein and plug-in entropy (bits).
"""

from __future__ import annotations

import collections
import enum
import math
import re
from collections.abc import Callable, Sequence

import numpy as np

NUMERIC_SHARE = 0.95  # a study stays numeric when a few humans typed a stray word ("none", a typo)
ORDINAL_MAX_LEVELS = 11  # the widest common rating scale is 0..10; a wider integer span is a count or amount
CATEGORY_MAX_DISTINCT = 20  # option sets (letters, words, items) stay within ~20; more distinct answers are open
CATEGORY_MAX_WORDS = 3  # option labels have at most three words ("not sure"); longer answers are sentences

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")

Key = str | float  # a normalised response: compared with ==, counted as a category


class ResponseType(enum.StrEnum):
    CATEGORY = "category"
    ORDINAL = "ordinal"
    NUMBER = "number"
    FREE_TEXT = "free_text"

    @property
    def numeric(self) -> bool:
        return self in (ResponseType.ORDINAL, ResponseType.NUMBER)


def parse_number(text: str) -> float | None:
    """A plain decimal number ("3", " 3.0 ", "-.5", "1e3"), surrounding whitespace ignored; None otherwise:
    a thousands separator ("1,000"), a unit ("3 ms", "50%"), "nan", "inf", an empty string."""
    text = text.strip()
    if not _NUMBER.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def normalise(text: str, kind: ResponseType) -> Key:
    """The form in which responses are compared, counted and pooled. Whitespace is stripped for every type;
    CATEGORY is case-folded ("J" == "j"); ORDINAL and NUMBER are parsed (``parse_number``: "3" == "3.0" ==
    " 3 "), and a text that does not parse stays its stripped text, so it equals only the same text and never a
    number; FREE_TEXT keeps its case."""
    text = text.strip()
    if kind is ResponseType.CATEGORY:
        return text.casefold()
    if kind.numeric:
        value = parse_number(text)
        return text if value is None else value
    return text


def classify_study(human_responses: Sequence[str], options: Sequence[str] | None = None) -> ResponseType:
    """The response type of a study from all its human responses (deterministic; ties go to the earlier rule):

    1. an explicit, non-empty option set (the study's discrete options) → CATEGORY;
    2. ≥ ``NUMERIC_SHARE`` of the responses parse as numbers (``parse_number``) → ORDINAL if every parsed value
       is an integer and max − min < ``ORDINAL_MAX_LEVELS`` (at most 11 levels, e.g. 1..7 or 0..10), else NUMBER;
    3. ≤ ``CATEGORY_MAX_DISTINCT`` distinct case-folded responses, none longer than ``CATEGORY_MAX_WORDS``
       words → CATEGORY;
    4. else FREE_TEXT. No responses at all is an error."""
    if options:
        return ResponseType.CATEGORY
    if not human_responses:
        raise ValueError("classify_study needs at least one human response")
    values = [v for v in (parse_number(r) for r in human_responses) if v is not None]
    if len(values) >= NUMERIC_SHARE * len(human_responses):
        integral = all(v.is_integer() for v in values)
        return (
            ResponseType.ORDINAL if integral and max(values) - min(values) < ORDINAL_MAX_LEVELS else ResponseType.NUMBER
        )
    distinct = {normalise(r, ResponseType.CATEGORY) for r in human_responses}
    if len(distinct) <= CATEGORY_MAX_DISTINCT and all(len(str(d).split()) <= CATEGORY_MAX_WORDS for d in distinct):
        return ResponseType.CATEGORY
    return ResponseType.FREE_TEXT


# ------------------------------------------------------------------------------------------ primitives


def crps_fair(samples: Sequence[float], y: float) -> float:
    """Fair (small-k unbiased) CRPS of k ≥ 2 samples against the observation y (lower is better):
    CRPS_fair = (1/k) Σ_i |x_i − y| − 1/(2k(k−1)) Σ_{i,j} |x_i − x_j|.
    Its expectation is the CRPS of the distribution sampled from, whatever k (the plain ensemble CRPS, 1/(2k²),
    overstates it for small k). It is ≥ 0 (|x_i − x_j| ≤ |x_i − y| + |x_j − y|), 0 e.g. for x = (0, 2), y = 1,
    and ≤ the mean absolute error."""
    x = np.asarray(samples, dtype=np.float64)
    k = x.size
    if k < 2:
        raise ValueError(f"fair CRPS needs at least 2 samples, got {k}")
    spread = np.abs(x[:, None] - x[None, :]).sum()
    return float(np.abs(x - y).mean() - spread / (2 * k * (k - 1)))


def _normalised_rows(p: np.ndarray) -> np.ndarray:
    total = p.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return p / total


def total_variation(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """TV = ½ Σ_c |p_c − q_c| in [0, 1], over the last axis; p and q are counts or weights on one support
    (each normalised to sum 1 first)."""
    return 0.5 * np.abs(_normalised_rows(np.asarray(p, np.float64)) - _normalised_rows(np.asarray(q, np.float64))).sum(
        -1
    )


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """JS = ½ KL(p ‖ m) + ½ KL(q ‖ m) with m = (p + q)/2, in bits (log base 2), so in [0, 1]; over the last axis,
    p and q normalised first; 0 · log 0 = 0."""
    p = _normalised_rows(np.asarray(p, np.float64))
    q = _normalised_rows(np.asarray(q, np.float64))
    m = (p + q) / 2

    def kl(a: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(a > 0, a * np.log2(a / m), 0.0).sum(-1)

    return np.clip(0.5 * kl(p) + 0.5 * kl(q), 0.0, 1.0)


def wasserstein_on_grid(grid: np.ndarray) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """W1 between weight vectors u, v on the sorted support ``grid`` (last axis, each normalised first):
    W1 = Σ_i |F_u(g_i) − F_v(g_i)| (g_{i+1} − g_i), F the cumulative sums."""
    widths = np.diff(grid)

    def w1(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        cdf = np.cumsum(_normalised_rows(u) - _normalised_rows(v), axis=-1)[..., :-1]
        return np.abs(cdf) @ widths

    return w1


def wasserstein_1(
    u: Sequence[float],
    v: Sequence[float],
    u_weights: Sequence[float] | None = None,
    v_weights: Sequence[float] | None = None,
) -> float:
    """1-Wasserstein (earth mover's) distance between two weighted samples of values, exactly from the sorted
    CDFs: W1 = ∫ |F_u(t) − F_v(t)| dt (the same as ``scipy.stats.wasserstein_distance``); NaN if either is empty."""
    x, y = np.asarray(u, np.float64), np.asarray(v, np.float64)
    if x.size == 0 or y.size == 0:
        return math.nan
    xw = np.ones(x.size) if u_weights is None else np.asarray(u_weights, np.float64)
    yw = np.ones(y.size) if v_weights is None else np.asarray(v_weights, np.float64)
    grid, inverse = np.unique(np.concatenate([x, y]), return_inverse=True)
    pu = np.bincount(inverse[: x.size], xw, minlength=grid.size)
    pv = np.bincount(inverse[x.size :], yw, minlength=grid.size)
    return float(wasserstein_on_grid(grid)(pu, pv))


def entropy_bits(responses: Sequence[Key]) -> float:
    """Plug-in entropy H = −Σ_r f_r log2 f_r of the empirical distribution of responses, in bits (0 for one
    repeated response, log2 n for n distinct ones); NaN for none."""
    if not responses:
        return math.nan
    f = np.array(list(collections.Counter(responses).values()), np.float64) / len(responses)
    return float(-(f * np.log2(f)).sum())
