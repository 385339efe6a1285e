"""medrpn.data."""
