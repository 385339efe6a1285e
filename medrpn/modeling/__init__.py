"""medrpn.modeling."""
