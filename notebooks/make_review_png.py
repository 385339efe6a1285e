"""Regenerate ``docs/review_view.png``: the review view (``medrpn.review.render_review_figure``) of a synthetic scan.

Usage (from the repository root)::

    .venv/bin/python notebooks/make_review_png.py [OUT.png]

It writes a synthetic batch output folder to a temporary directory (``medrpn.review.write_demo_batch``: one
synthetic chest CT whose findings are its lesions plus one false positive), records two example decisions and
renders the top finding in axial, coronal and sagittal views with the findings table (headless: a plain
matplotlib ``Figure`` on an Agg canvas). No patient data.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from medrpn.overlays.atomic import atomic_write_bytes
from medrpn.review import ReviewSession, figure_png, render_review_figure, write_demo_batch

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "review_view.png"


def main(out: Path = DEFAULT_OUT) -> Path:
    """Render the review view to ``out``.

    Args:
        out: the PNG to write.

    Returns:
        The written path.
    """
    with tempfile.TemporaryDirectory(prefix="medrpn-review-png-") as tmp:
        demo = write_demo_batch(Path(tmp), seed=0, case_index=3)
        session = ReviewSession.open(demo.output_dir, demo.scan_root)
        rows = session.table()
        top = rows[0]
        session.accept(top.scan, top.rank, comment="solid nodule, follow-up CT")
        false_positive = next(r for r in rows if r.score == 0.58)  # the demo batch's false positive
        session.reject(false_positive.scan, false_positive.rank, comment="no lesion (mirror image)")
        fig = render_review_figure(session, top.scan, top.rank, window="lung", figsize=(15.0, 9.0), dpi=100)
        return atomic_write_bytes(out, figure_png(fig))


if __name__ == "__main__":
    print(main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT))
