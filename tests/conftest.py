"""Shared fixtures: tiny transformers checkpoints, saved once per session."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """kind -> folder of a saved tiny random model; built on first use."""
    pytest.importorskip("transformers")
    from hf_tiny import save_tiny

    root = tmp_path_factory.mktemp("hf")
    made: dict[str, object] = {}

    def get(kind: str):
        if kind not in made:
            made[kind] = save_tiny(kind, root / kind)
        return made[kind]

    return get
