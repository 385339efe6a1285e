"""medrpn.inference."""
