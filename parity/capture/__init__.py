"""Observing a live model: scoped hooks, the staging ring, writer thread, device summaries (torch)."""
