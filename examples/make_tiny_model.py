"""Save a tiny random Llama (no download) to a folder, for trying parity's `hf:` backend.

    python examples/make_tiny_model.py reports/tiny-llama
    parity diff --ref 'hf:reports/tiny-llama@attn=eager' --cand 'hf:reports/tiny-llama@attn=sdpa' \
        --batch 3 --padding left
"""
from __future__ import annotations

import sys
from pathlib import Path

TINY_LLAMA = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def save_tiny_llama(folder: str | Path, seed: int = 0) -> Path:
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA))
    logging = transformers.utils.logging
    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
    finally:
        if bars:
            logging.enable_progress_bar()
    return Path(folder)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/make_tiny_model.py FOLDER")
    print(f"saved a tiny random Llama to {save_tiny_llama(sys.argv[1])}")
