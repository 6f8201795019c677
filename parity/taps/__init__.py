"""What flows between the roles: taps, token layouts, probes, the backend interface, storage codec."""
