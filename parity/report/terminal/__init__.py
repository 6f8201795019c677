"""Terminal rendering (rich) of each result type."""
