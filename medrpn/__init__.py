"""medrpn: lesion proposals for CT/MR on MONAI — a 2D/3D Region Proposal Network, a lesion head,
Lightning training, and batch inference that writes overlays for radiologist review.

The one box convention used across package boundaries is documented in :mod:`medrpn.geometry`.
"""

from __future__ import annotations

__version__ = "0.1.0"
