"""FROC analysis and the CPM score under the LUNA16 hit rule.

**Hit rule** (LUNA16): a candidate *hits* a lesion when the Euclidean distance between the candidate
centre and the lesion centre is at most the lesion radius (``diameter / 2``). Distance equal to the
radius counts as a hit (the LUNA16 script uses a strict ``<``; medrpn includes the boundary), with an
absolute round-off tolerance of :data:`HIT_TOLERANCE` (``1e-6`` in the unit of the coordinates, i.e. one
nanometre for world millimetres).

**Per scan** (as in the LUNA16 evaluation script ``noduleCADEvaluationLUNA16.py``):

- each lesion is detected at the *highest* score among the candidates hitting it (undetected if none);
- a candidate that hits at least one lesion is never a false positive; further hits on an already
  hit lesion are ignored (neither true nor false positives); a candidate hitting two lesions credits both;
- a candidate hitting no lesion is a false positive.

**Excluded lesions** (LUNA16's ``annotations_excluded.csv``): a candidate that hits no counted lesion but
hits an *excluded* one is ignored — neither a true nor a false positive. :func:`froc_by_diameter` uses this
to read sensitivity per lesion-size band: lesions outside the band are excluded, so a hit on a large lesion
is not counted as a false positive of the small-lesion curve.

**Over a set of scans** the score threshold ``t`` sweeps over every distinct candidate score (a
candidate is accepted when ``score >= t``), preceded by ``t = +inf`` (nothing accepted, the ``(0, 0)``
point of ``sklearn.metrics.roc_curve`` used by LUNA16)::

    sensitivity(t)  = #lesions detected at a score >= t / #lesions (all scans)
    fps_per_scan(t) = #false positives with score >= t / #scans

Scans without lesions and scans without candidates count in ``#scans``.

**Operating points.** The sensitivity at an FP rate ``r`` is read off the piecewise-linear FROC curve
exactly as LUNA16's ``np.interp(r, fps, sens)`` does (``fps`` is non-decreasing but may repeat): with
``j`` the last curve point with ``fps[j] <= r``, the value is interpolated linearly between points
``j`` and ``j + 1`` (so on a vertical step the upper end is taken); when the curve never reaches ``r``
(``r >= fps`` at the lowest threshold) it is the sensitivity at the lowest threshold. The CPM
(Competition Performance Metric) is the mean sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 FPs per scan.

**Validation** (all raise :class:`ValueError`): scores that are NaN, infinite or negative (pass
probabilities, e.g. ``sigmoid(logit)``, not logits); non-finite centres; non-positive or non-finite
diameters; duplicate scan ids; scan ids of candidates and lesions that differ as sets (order is free:
scans are paired by id); no scans; **no lesions at all** (sensitivity is undefined, so medrpn refuses
instead of returning NaN); non-positive FP rates.

Centres are ``(N, D)`` points (``D`` = 2 or 3) in any consistent unit; in medrpn evaluation they are
LPS world millimetres, and boxes are MONAI ``StandardMode`` (``[x0, y0, z0, x1, y1, z1]`` /
``[x0, y0, x1, y1]``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "HIT_TOLERANCE",
    "LUNA16_FP_RATES",
    "BootstrapInterval",
    "DiameterBand",
    "FROCResult",
    "ScanCandidates",
    "ScanLesions",
    "bootstrap_cpm",
    "compute_froc",
    "drop_excluded",
    "froc_by_diameter",
    "lesion_diameters_from_boxes",
    "match_scan",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

LUNA16_FP_RATES: Final[tuple[float, ...]] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""False positives per scan at which LUNA16 reads sensitivity; the CPM is their mean."""

HIT_TOLERANCE: Final[float] = 1e-6
"""Absolute tolerance added to the lesion radius in the hit test, to absorb floating-point round-off."""

DiameterRule = Literal["max_inplane", "max", "mean"]


def _to_numpy(x: Any, dtype: type[np.floating[Any]] = np.float64) -> FloatArray:
    """Convert a numpy array, torch tensor or sequence to a float numpy array (copy-free when possible)."""
    if hasattr(x, "detach"):  # torch.Tensor without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _as_points(x: Any, name: str) -> FloatArray:
    """``(N, D)`` float64 array; an empty input of any shape becomes ``(0, D)`` (``D`` = 0 if unknown)."""
    arr = _to_numpy(x)
    if arr.size == 0:
        d = arr.shape[-1] if arr.ndim == 2 else 0
        return np.zeros((0, d), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] not in (2, 3):
        raise ValueError(f"{name} must have shape (N, 2) or (N, 3), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _as_boxes(x: Any, name: str) -> FloatArray:
    """``(N, 2*D)`` float64 StandardMode boxes; an empty input becomes ``(0, 2*D)`` (``(0, 0)`` if unknown)."""
    arr = _to_numpy(x)
    if arr.size == 0:
        d = arr.shape[-1] if arr.ndim == 2 else 0
        return np.zeros((0, d), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] not in (4, 6):
        raise ValueError(f"{name} must have shape (N, 4) or (N, 6) (StandardMode), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    d = arr.shape[1] // 2
    if np.any(arr[:, d:] < arr[:, :d]):
        raise ValueError(f"{name} has a maximum corner below its minimum corner (expected StandardMode)")
    return arr


def _readonly(arr: np.ndarray) -> Any:
    arr = np.array(arr, copy=True)
    arr.setflags(write=False)
    return arr


def lesion_diameters_from_boxes(boxes: Any, rule: DiameterRule = "max_inplane") -> FloatArray:
    """Lesion diameters derived from ground-truth boxes.

    Args:
        boxes: ``(M, 2*D)`` StandardMode boxes (numpy or torch).
        rule: ``"max_inplane"`` (default): the largest extent over the first two axes (x, y) — the
            in-plane long axis of an axial CT box, which is how LUNA16 diameters are measured; in 2D
            this is the largest extent. ``"max"``: the largest extent over all axes. ``"mean"``: the
            mean extent over all axes.

    Returns:
        ``(M,)`` float64 diameters in the unit of the boxes.

    Raises:
        ValueError: for malformed boxes or an unknown rule.
    """
    b = _as_boxes(boxes, "boxes")
    if b.shape[0] == 0:
        return np.zeros((0,), dtype=np.float64)
    d = b.shape[1] // 2
    extents = b[:, d:] - b[:, :d]
    if rule == "max_inplane":
        return np.asarray(extents[:, :2].max(axis=1), dtype=np.float64)
    if rule == "max":
        return np.asarray(extents.max(axis=1), dtype=np.float64)
    if rule == "mean":
        return np.asarray(extents.mean(axis=1), dtype=np.float64)
    raise ValueError(f"unknown diameter rule {rule!r}; expected 'max_inplane', 'max' or 'mean'")


@dataclass(frozen=True)
class ScanCandidates:
    """Scored candidate points (proposal or detection centres) of one scan.

    Attributes:
        scan_id: identifier used to pair with :class:`ScanLesions`.
        centres: ``(K, D)`` float64 candidate centres (``K`` may be 0).
        scores: ``(K,)`` float64 scores, finite and ``>= 0`` (probabilities, not logits).
    """

    scan_id: str
    centres: FloatArray = field(repr=False)
    scores: FloatArray = field(repr=False)

    def __post_init__(self) -> None:
        centres = _as_points(self.centres, f"centres of scan {self.scan_id!r}")
        scores = _to_numpy(self.scores).reshape(-1)
        if scores.shape[0] != centres.shape[0]:
            raise ValueError(
                f"scan {self.scan_id!r}: {centres.shape[0]} candidate centres but {scores.shape[0]} scores"
            )
        if not np.all(np.isfinite(scores)):
            raise ValueError(f"scan {self.scan_id!r}: candidate scores contain NaN or infinite values")
        if np.any(scores < 0):
            raise ValueError(
                f"scan {self.scan_id!r}: negative candidate scores; pass probabilities (e.g. sigmoid of logits)"
            )
        object.__setattr__(self, "centres", _readonly(centres))
        object.__setattr__(self, "scores", _readonly(scores))

    @classmethod
    def from_boxes(cls, scan_id: str, boxes: Any, scores: Any) -> ScanCandidates:
        """Candidates at the centres of StandardMode boxes.

        Args:
            scan_id: scan identifier.
            boxes: ``(K, 2*D)`` StandardMode boxes (numpy or torch).
            scores: ``(K,)`` scores.

        Returns:
            Candidates with ``centres = (min corner + max corner) / 2``.
        """
        b = _as_boxes(boxes, f"candidate boxes of scan {scan_id!r}")
        d = b.shape[1] // 2
        return cls(scan_id=scan_id, centres=(b[:, :d] + b[:, d:]) / 2.0, scores=_to_numpy(scores))

    def __len__(self) -> int:
        return int(self.scores.shape[0])


@dataclass(frozen=True)
class ScanLesions:
    """Reference lesions of one scan, as spheres (discs in 2D).

    Attributes:
        scan_id: identifier used to pair with :class:`ScanCandidates`.
        centres: ``(M, D)`` float64 lesion centres (``M`` may be 0).
        diameters: ``(M,)`` float64 lesion diameters, finite and ``> 0``.
    """

    scan_id: str
    centres: FloatArray = field(repr=False)
    diameters: FloatArray = field(repr=False)

    def __post_init__(self) -> None:
        centres = _as_points(self.centres, f"lesion centres of scan {self.scan_id!r}")
        diameters = _to_numpy(self.diameters).reshape(-1)
        if diameters.shape[0] != centres.shape[0]:
            raise ValueError(
                f"scan {self.scan_id!r}: {centres.shape[0]} lesion centres but {diameters.shape[0]} diameters"
            )
        if not np.all(np.isfinite(diameters)) or np.any(diameters <= 0):
            raise ValueError(f"scan {self.scan_id!r}: lesion diameters must be finite and > 0")
        object.__setattr__(self, "centres", _readonly(centres))
        object.__setattr__(self, "diameters", _readonly(diameters))

    @classmethod
    def from_boxes(cls, scan_id: str, boxes: Any, rule: DiameterRule = "max_inplane") -> ScanLesions:
        """Lesions from ground-truth StandardMode boxes.

        Args:
            scan_id: scan identifier.
            boxes: ``(M, 2*D)`` StandardMode boxes (numpy or torch).
            rule: diameter rule of :func:`lesion_diameters_from_boxes`; the default ``"max_inplane"``
                takes the largest extent over the first two axes (x, y).

        Returns:
            Lesions centred at the box centres with the derived diameters.
        """
        b = _as_boxes(boxes, f"lesion boxes of scan {scan_id!r}")
        d = b.shape[1] // 2
        return cls(scan_id=scan_id, centres=(b[:, :d] + b[:, d:]) / 2.0, diameters=lesion_diameters_from_boxes(b, rule))

    def __len__(self) -> int:
        return int(self.diameters.shape[0])


def _hit_matrix(cand_centres: FloatArray, lesion_centres: FloatArray, diameters: FloatArray) -> BoolArray:
    """``(K, M)`` hit matrix: candidate ``k`` lies within the radius (+ tolerance) of lesion ``m``."""
    k, m = cand_centres.shape[0], lesion_centres.shape[0]
    if k == 0 or m == 0:
        return np.zeros((k, m), dtype=bool)
    if cand_centres.shape[1] != lesion_centres.shape[1]:
        raise ValueError(
            f"candidate centres are {cand_centres.shape[1]}D but lesion centres are {lesion_centres.shape[1]}D"
        )
    dist = np.linalg.norm(cand_centres[:, None, :] - lesion_centres[None, :, :], axis=-1)
    return np.asarray(dist <= diameters[None, :] / 2.0 + HIT_TOLERANCE)


def match_scan(
    candidates: ScanCandidates, lesions: ScanLesions, excluded: ScanLesions | None = None
) -> tuple[FloatArray, FloatArray]:
    """Apply the LUNA16 hit rule to one scan.

    Args:
        candidates: the scan's candidates (``K``).
        lesions: the scan's counted lesions (``M``); ``scan_id`` is not checked here.
        excluded: the scan's excluded lesions: candidates hitting one of them and no counted lesion are
            ignored (neither true nor false positives); ``None`` excludes nothing.

    Returns:
        ``(lesion_scores, fp_scores)``: ``(M,)`` highest score of a candidate hitting each lesion
        (``-inf`` when missed), and ``(F,)`` scores of the candidates hitting no lesion (counted or excluded).
    """
    hits = _hit_matrix(candidates.centres, lesions.centres, lesions.diameters)
    scores = candidates.scores
    lesion_scores = np.where(hits, scores[:, None], -np.inf).max(axis=0, initial=-np.inf)
    false = ~hits.any(axis=1)
    if excluded is not None and len(excluded):
        false &= ~_hit_matrix(candidates.centres, excluded.centres, excluded.diameters).any(axis=1)
    fp_scores = scores[false]
    return np.asarray(lesion_scores, dtype=np.float64), np.asarray(fp_scores, dtype=np.float64)


def drop_excluded(candidates: ScanCandidates, lesions: ScanLesions, excluded: ScanLesions) -> ScanCandidates:
    """The candidates without those that hit an excluded finding and no counted lesion.

    Scoring the result without exclusions gives the same FROC as scoring the original candidates with them
    (:func:`match_scan`), so the bootstrap and the size bands, which take no exclusions, apply LUNA16's
    ``annotations_excluded.csv`` rule too.

    Args:
        candidates: one scan's candidates (``K``).
        lesions: the scan's counted lesions.
        excluded: the scan's excluded findings.

    Returns:
        The kept candidates, in their order.
    """
    if not len(excluded) or not len(candidates):
        return candidates
    hits_counted = _hit_matrix(candidates.centres, lesions.centres, lesions.diameters).any(axis=1)
    hits_excluded = _hit_matrix(candidates.centres, excluded.centres, excluded.diameters).any(axis=1)
    keep = hits_counted | ~hits_excluded
    return ScanCandidates(candidates.scan_id, candidates.centres[keep], candidates.scores[keep])


def _interp_curve(rates: FloatArray, fps: FloatArray, sens: FloatArray) -> FloatArray:
    """``np.interp(rates, fps, sens)`` made explicit for a non-decreasing ``fps`` with repeats."""
    out = np.empty(rates.shape, dtype=np.float64)
    last = fps.shape[0] - 1
    for i, r in enumerate(rates):
        j = int(np.searchsorted(fps, r, side="right")) - 1
        if j >= last:
            out[i] = sens[last]
        elif j < 0:  # cannot happen: fps[0] == 0 < r
            out[i] = sens[0]
        else:
            w = (r - fps[j]) / (fps[j + 1] - fps[j])
            out[i] = sens[j] + w * (sens[j + 1] - sens[j])
    return out


@dataclass(frozen=True)
class FROCResult:
    """FROC curve and operating points.

    Attributes:
        fp_rates: ``(R,)`` FP-per-scan rates of the operating points.
        sensitivities: ``(R,)`` interpolated sensitivity at each rate.
        cpm: mean of ``sensitivities`` (the LUNA16 CPM for the default rates).
        fps_per_scan: ``(T+1,)`` curve abscissa, non-decreasing, starting at 0.
        sensitivity: ``(T+1,)`` curve ordinate, non-decreasing, starting at 0.
        thresholds: ``(T+1,)`` score thresholds, ``+inf`` then the ``T`` distinct candidate scores in
            decreasing order (a candidate is accepted when ``score >= threshold``).
        num_scans: number of scans.
        num_lesions: number of lesions over all scans.
        num_candidates: number of candidates over all scans.
    """

    fp_rates: FloatArray
    sensitivities: FloatArray
    cpm: float
    fps_per_scan: FloatArray
    sensitivity: FloatArray
    thresholds: FloatArray
    num_scans: int
    num_lesions: int
    num_candidates: int

    @property
    def max_sensitivity(self) -> float:
        """Sensitivity at the lowest threshold (all candidates accepted)."""
        return float(self.sensitivity[-1])

    def sensitivity_at(self, fp_rate: float) -> float:
        """Interpolated sensitivity at any FP-per-scan rate (same rule as the operating points)."""
        return float(_interp_curve(np.asarray([fp_rate], dtype=np.float64), self.fps_per_scan, self.sensitivity)[0])

    def as_dict(self) -> dict[str, float]:
        """Flat scalars for logging: ``{"sensitivity@0.125": ..., ..., "cpm": ...}``."""
        out = {f"sensitivity@{r:g}": float(s) for r, s in zip(self.fp_rates, self.sensitivities)}
        out["cpm"] = self.cpm
        return out

    def table(self, digits: int = 3) -> str:
        """Markdown table of the operating points and the CPM.

        Args:
            digits: decimals of the sensitivities.

        Returns:
            A Markdown table (``FP/scan | Sensitivity`` rows, then a bold CPM row), newline-terminated.
        """
        lines = ["| FP/scan | Sensitivity |", "|---:|---:|"]
        lines += [f"| {r:g} | {s:.{digits}f} |" for r, s in zip(self.fp_rates, self.sensitivities)]
        lines.append(f"| **CPM** | **{self.cpm:.{digits}f}** |")
        return "\n".join(lines) + "\n"


def compute_froc(
    candidates: Sequence[ScanCandidates],
    lesions: Sequence[ScanLesions],
    fp_rates: Sequence[float] = LUNA16_FP_RATES,
    *,
    excluded: Sequence[ScanLesions] | None = None,
) -> FROCResult:
    """FROC curve, sensitivities at ``fp_rates`` and their mean (CPM) under the LUNA16 hit rule.

    See the module docstring for the exact rule. Scans are paired by ``scan_id``; every scan must appear
    exactly once in both sequences (give an empty :class:`ScanCandidates` / :class:`ScanLesions` for
    scans without candidates / lesions — they count in the per-scan FP rate).

    Args:
        candidates: one entry per scan (``K_i`` candidates each).
        lesions: one entry per scan (``M_i`` lesions each), same scan ids as ``candidates``.
        fp_rates: ``(R,)`` positive FP-per-scan rates; the default is LUNA16's 1/8 ... 8.
        excluded: optional excluded lesions per scan (any subset of the scan ids): candidates hitting them
            and no counted lesion are ignored (LUNA16's ``annotations_excluded.csv`` rule).

    Returns:
        The :class:`FROCResult`.

    Raises:
        ValueError: duplicate or mismatched scan ids, no scans, no lesions in any scan (sensitivity is
            undefined), non-positive/non-finite ``fp_rates``, or candidate and lesion centres of one
            scan with different dimensionality.
    """
    rates = _rates(fp_rates)
    per_scan = _match_all(candidates, lesions, excluded)
    return _froc_from_matches(per_scan, rates)


def _rates(fp_rates: Sequence[float]) -> FloatArray:
    rates = np.asarray(list(fp_rates), dtype=np.float64).reshape(-1)
    if rates.size == 0 or not np.all(np.isfinite(rates)) or np.any(rates <= 0):
        raise ValueError(f"fp_rates must be non-empty, finite and > 0, got {list(fp_rates)}")
    return rates


def _by_id(items: Sequence[Any], what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for it in items:
        if it.scan_id in out:
            raise ValueError(f"duplicate scan id {it.scan_id!r} in {what}")
        out[it.scan_id] = it
    return out


def _match_all(
    candidates: Sequence[ScanCandidates],
    lesions: Sequence[ScanLesions],
    excluded: Sequence[ScanLesions] | None = None,
) -> list[tuple[FloatArray, FloatArray, FloatArray]]:
    """Per scan ``(lesion_scores, fp_scores, all candidate scores)``, in the order of ``lesions``."""
    cand_by_id = _by_id(candidates, "candidates")
    les_by_id = _by_id(lesions, "lesions")
    exc_by_id = _by_id(excluded or [], "excluded lesions")
    if cand_by_id.keys() != les_by_id.keys():
        only_c = sorted(cand_by_id.keys() - les_by_id.keys())
        only_l = sorted(les_by_id.keys() - cand_by_id.keys())
        raise ValueError(
            f"scan ids differ between candidates and lesions: only in candidates {only_c[:5]}"
            f"{'...' if len(only_c) > 5 else ''}, only in lesions {only_l[:5]}{'...' if len(only_l) > 5 else ''}"
        )
    unknown = sorted(exc_by_id.keys() - les_by_id.keys())
    if unknown:
        raise ValueError(f"excluded lesions of unknown scans {unknown[:5]}{'...' if len(unknown) > 5 else ''}")
    if not les_by_id:
        raise ValueError("no scans given")
    out = []
    for scan_id, les in les_by_id.items():
        cand = cand_by_id[scan_id]
        ls, fs = match_scan(cand, les, exc_by_id.get(scan_id))
        out.append((ls, fs, np.asarray(cand.scores)))
    return out


def _froc_from_matches(per_scan: Sequence[tuple[FloatArray, FloatArray, FloatArray]], rates: FloatArray) -> FROCResult:
    """The FROC of per-scan ``(lesion_scores, fp_scores, all_scores)`` (one entry per scan, repeats allowed)."""
    num_scans = len(per_scan)
    lesion_scores_l = [m[0] for m in per_scan]
    fp_scores_l = [m[1] for m in per_scan]
    all_scores_l = [m[2] for m in per_scan]
    lesion_scores = np.sort(np.concatenate(lesion_scores_l))
    fp_scores = np.sort(np.concatenate(fp_scores_l))
    all_scores = np.concatenate(all_scores_l)
    num_lesions = int(lesion_scores.shape[0])
    if num_lesions == 0:
        raise ValueError("no lesions in any scan: FROC sensitivity is undefined")

    thresholds = np.concatenate([[np.inf], np.unique(all_scores)[::-1]]).astype(np.float64)
    # counts of values >= t in ascending arrays
    detected = num_lesions - np.searchsorted(lesion_scores, thresholds, side="left")
    n_fp = fp_scores.shape[0] - np.searchsorted(fp_scores, thresholds, side="left")
    sens = detected.astype(np.float64) / num_lesions
    fps = n_fp.astype(np.float64) / num_scans

    sens_at = _interp_curve(rates, fps, sens)
    return FROCResult(
        fp_rates=_readonly(rates),
        sensitivities=_readonly(sens_at),
        cpm=float(np.mean(sens_at)),
        fps_per_scan=_readonly(fps),
        sensitivity=_readonly(sens),
        thresholds=_readonly(thresholds),
        num_scans=num_scans,
        num_lesions=num_lesions,
        num_candidates=int(all_scores.shape[0]),
    )


@dataclass(frozen=True)
class DiameterBand:
    """FROC of the lesions whose diameter lies in ``[low, high)``; the other lesions are excluded.

    Attributes:
        low: inclusive lower diameter bound (unit of the coordinates, mm in medrpn).
        high: exclusive upper bound (``inf`` for an open band).
        num_lesions: lesions in the band over all scans.
        froc: the band's FROC (``None`` when no lesion falls in the band).
    """

    low: float
    high: float
    num_lesions: int
    froc: FROCResult | None

    @property
    def label(self) -> str:
        """``"3-5"``, ``">= 10"`` or ``"< 5"`` style band name."""
        if math.isinf(self.high):
            return f">= {self.low:g}"
        if self.low <= 0:
            return f"< {self.high:g}"
        return f"{self.low:g}-{self.high:g}"


def froc_by_diameter(
    candidates: Sequence[ScanCandidates],
    lesions: Sequence[ScanLesions],
    edges: Sequence[float] = (0.0, 5.0, 10.0, math.inf),
    fp_rates: Sequence[float] = LUNA16_FP_RATES,
) -> list[DiameterBand]:
    """FROC per lesion-diameter band, with the lesions of the other bands excluded.

    A candidate hitting a lesion of another band is ignored, not a false positive: the false-positive axis
    is the same background for every band, so a band's CPM says how well lesions of that size rank above
    the false positives.

    Args:
        candidates: one entry per scan.
        lesions: one entry per scan (same ids).
        edges: increasing band edges; band ``i`` is ``[edges[i], edges[i + 1])``.
        fp_rates: FP-per-scan rates of the operating points.

    Returns:
        One :class:`DiameterBand` per band (``froc`` ``None`` for an empty band).

    Raises:
        ValueError: fewer than two edges, or edges not strictly increasing; the errors of :func:`compute_froc`.
    """
    e = [float(x) for x in edges]
    if len(e) < 2 or any(b <= a for a, b in itertools.pairwise(e)):
        raise ValueError(f"edges must be at least two strictly increasing values, got {list(edges)}")
    rates = _rates(fp_rates)
    bands = []
    for low, high in itertools.pairwise(e):
        inside: list[ScanLesions] = []
        outside: list[ScanLesions] = []
        for les in lesions:
            m = (les.diameters >= low) & (les.diameters < high)
            inside.append(ScanLesions(les.scan_id, les.centres[m], les.diameters[m]))
            outside.append(ScanLesions(les.scan_id, les.centres[~m], les.diameters[~m]))
        n = sum(len(x) for x in inside)
        froc = None
        if n:
            per_scan = _match_all(candidates, inside, outside)
            froc = _froc_from_matches(per_scan, rates)
        bands.append(DiameterBand(low=low, high=high, num_lesions=n, froc=froc))
    return bands


@dataclass(frozen=True)
class BootstrapInterval:
    """Percentile bootstrap interval of the CPM over scans.

    Attributes:
        cpm: the CPM of the scans as given.
        low: lower bound.
        high: upper bound.
        level: confidence level (e.g. 0.95).
        resamples: bootstrap resamples used (resamples without any lesion are redrawn).
    """

    cpm: float
    low: float
    high: float
    level: float
    resamples: int

    def __str__(self) -> str:
        return f"{self.cpm:.3f} ({self.level:.0%} CI {self.low:.3f}-{self.high:.3f}, scan bootstrap)"


def bootstrap_cpm(
    candidates: Sequence[ScanCandidates],
    lesions: Sequence[ScanLesions],
    *,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    fp_rates: Sequence[float] = LUNA16_FP_RATES,
) -> BootstrapInterval:
    """Percentile bootstrap confidence interval of the CPM, resampling whole scans with replacement.

    Scans, not lesions, are the independent units (lesions of one scan share its false positives), so
    each resample draws ``S`` scans with replacement from the ``S`` given and recomputes the FROC; a
    resample without any lesion is drawn again. With 10 scans and 16 lesions the interval is wide —
    which is the point: it says how far one held-out split can be trusted.

    Args:
        candidates: one entry per scan.
        lesions: one entry per scan (same ids).
        resamples: bootstrap resamples (>= 10).
        level: confidence level in (0, 1).
        seed: random seed (the interval is deterministic for a seed).
        fp_rates: FP-per-scan rates of the operating points.

    Returns:
        The :class:`BootstrapInterval`.

    Raises:
        ValueError: ``resamples < 10``, ``level`` outside (0, 1); the errors of :func:`compute_froc`.
    """
    if resamples < 10:
        raise ValueError(f"resamples must be >= 10, got {resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rates = _rates(fp_rates)
    per_scan = _match_all(candidates, lesions)
    full = _froc_from_matches(per_scan, rates)
    has_lesion = np.array([m[0].shape[0] > 0 for m in per_scan])
    rng = np.random.default_rng(seed)
    n = len(per_scan)
    cpms = np.empty(resamples, dtype=np.float64)
    done = 0
    while done < resamples:
        idx = rng.integers(0, n, size=n)
        if not has_lesion[idx].any():
            continue
        picked = [per_scan[i] for i in idx]
        cpms[done] = _froc_from_matches(picked, rates).cpm
        done += 1
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(cpms, [alpha, 1.0 - alpha])
    return BootstrapInterval(cpm=full.cpm, low=float(low), high=float(high), level=level, resamples=resamples)
