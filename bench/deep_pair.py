"""Two correct implementations of a deep model, judged by the fixed bounds and by the oracle.

    PYTHONPATH=. python bench/deep_pair.py --shape llama3-8b --device cuda
    PYTHONPATH=. python bench/deep_pair.py --shape tiny --device cpu
    PYTHONPATH=.:examples python bench/deep_pair.py --shape llama3.2-1b --cand 'candidates:liger:{folder}' --name liger

`--cand` is the candidate's spec, `{folder}` the saved model (default `hf:{folder}@attn=sdpa`);
`--name` names the result file (deep_pair[_NAME]_<shape>_<card>.json).

A transformers Llama built from a real model's shape (random weights, seeded), saved with
save_pretrained, then `attn=eager` against `attn=sdpa` in bf16 (`--batch 4 --padding left
--seq-len 256` by default): both are correct, so a trustworthy verdict passes.  Printed
and written to bench/results/deep_pair_<card>.json for each judge (fixed bounds,
`--oracle`): passed, failing taps, first divergence, the worst cosine and rel L2, and
with the oracle the largest budget ratio (candidate error / reference error against the
float32 run on a GPU, float64 on the CPU).  Correctness figures, not timings: one run
says what it says.
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
from record import write_result

SHAPES = {  # from the models' config.json (layers, hidden, intermediate, heads, kv heads)
    "llama3-8b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "llama3.2-1b": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "tiny": dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}


def build(shape: str, folder: Path, device: str) -> Path:
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, torch_dtype="bfloat16")
    with torch.device(device):
        model = T.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    return folder


def judge(report) -> dict:
    rows = [r for r in report.rows if r.metrics is not None]
    first = report.first_divergence
    ratios = [r.budget.ratio for r in rows if r.budget is not None and math.isfinite(r.budget.ratio)]
    return {
        "passed": bool(report), "taps": len(report.rows), "failing": sum(not r.passed for r in report.rows),
        "first_divergence": None if first is None else {"tap": first.key, "reason": first.reason},
        "worst_cos": min(r.metrics.cos for r in rows), "worst_rel_l2": max(r.metrics.rel_l2 for r in rows),
        "worst_budget_ratio": max(ratios) if ratios else None,
        "median_budget_ratio": sorted(ratios)[len(ratios) // 2] if ratios else None,
    }


def main() -> None:
    import parity

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--cand", default="hf:{folder}@attn=sdpa", help="the candidate's spec; {folder}: the model")
    ap.add_argument("--name", default=None, help="result file deep_pair_<NAME>_<shape>")
    args = ap.parse_args()
    folder = build(args.shape, Path(tempfile.mkdtemp()) / args.shape, args.device)
    common = dict(batch=args.batch, padding="left", seq_len=args.seq_len, device=args.device, dtype="bfloat16")
    results = {}
    for name, oracle in (("fixed", False), ("oracle", True)):
        t = time.perf_counter()
        report = parity.compare(f"hf:{folder}@attn=eager", args.cand.format(folder=folder), oracle=oracle,
                                on_device=not oracle, **common)
        results[name] = {**judge(report), "seconds": time.perf_counter() - t}
        r = results[name]
        print(f"{name:7} passed={r['passed']!s:5} failing={r['failing']:4}/{r['taps']} worst cos {r['worst_cos']:.6f} "
              f"rel_l2 {r['worst_rel_l2']:.4f} budget ratio worst {r['worst_budget_ratio']} median "
              f"{r['median_budget_ratio']} first {r['first_divergence']} ({r['seconds']:.1f} s)", flush=True)
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    write_result(args.out, "deep_pair_" + (f"{args.name}_" if args.name else "") + args.shape, card,
                 {"card": card, "torch": torch.__version__, "shape": args.shape, "config": SHAPES[args.shape],
                  "candidate": args.cand,
                  "inputs": {k: v for k, v in common.items() if k != "device"}, "results": results})


if __name__ == "__main__":
    main()
