"""Your own pi0.5 as a backend: openpi's PyTorch port (`PI0Pytorch`), lerobot's
`PI05Policy`, or any module with their `paligemma_with_expert` tree, tapped under the
bundled reference's canonical names (docs/pi05.md, "Your own pi0.5")."""
from parity.probes.pi05_tree.backend import Inputs, backend, config_for, sample_lerobot
from parity.probes.pi05_tree.weights import checkpoint_state

__all__ = ["Inputs", "backend", "checkpoint_state", "config_for", "sample_lerobot"]
