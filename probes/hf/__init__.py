"""Probes and the backend for local Hugging Face `transformers` models (`hf:PATH@opts`).

families.py declares which modules are which taps per model family; inputs.py builds
token rows and their don't-care padding layout; checkpoint.py checks a checkpoint
folder before transformers builds anything from it; backend.py loads it and returns a
parity Backend.  Needs the `hf` extra (transformers)."""
