"""pi0.5 (openpi pi05): the model, its probe, the bundled backends and fault catalogue."""
