"""medrpn.ops."""
