"""medrpn.evaluation."""
