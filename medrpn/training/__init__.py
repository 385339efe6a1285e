"""medrpn.training."""
