"""medrpn.overlays."""
