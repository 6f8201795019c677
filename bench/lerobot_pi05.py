"""lerobot 0.6.1's real PI05Policy against parity's pi0.5 reference, on one checkpoint.

Not run by the tests (it needs lerobot, transformers 5.x and, at full size, a GPU):

    pip install 'lerobot[pi]==0.6.1'                   # Python 3.12, torch 2.11, transformers 5.5.4
    PYTHONPATH=. python bench/lerobot_pi05.py --device cuda [--dtype bfloat16] [--out /tmp/lerobot_pi05]

What it does:
1. builds `PI05Policy(PI05Config(dtype=..., device=...))` (full size: gemma_2b + gemma_300m,
   chunk 50, 10 steps, 224 px) and re-draws every weight from a seeded Gaussian (fan-in
   scaling, as parity draws its own; `--lerobot-init` keeps lerobot's init, whose adaRMS
   dense weights are zeros, so the time condition barely reaches the expert);
2. saves its state dict as `<out>/model.safetensors`: lerobot's layout (`model.` +
   openpi's keys), which parity's `--weights` reads (docs/pi05.md, "Checkpoints");
3. wraps the policy with `parity.probes.pi05_tree.backend` (the same checkpoint loaded
   into it by the openpi key tables, parity's observation and noise fed to
   `PI05Pytorch.sample_actions`) and runs `parity.compare("pytorch", <it>, weights=<out>)`;
4. prints the verdict, the worst cosine, the first divergence and every failing stack
   tap, and writes the report to `<out>/report.json` (`parity report` renders it).

Expect real differences, not a pass: lerobot keeps the vision tower in float32 (the
reference runs it in bf16), scales the text embedding by a bf16 sqrt(2048) inside the
embedding (the reference rounds the product once), rotates RoPE with bf16 tables and
computes t as 1 + step * dt; the first divergence says which shows first and how big.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def build_policy(dtype: str, device: str, reinit: bool, seed: int):
    from lerobot.policies.pi05.configuration_pi05 import PI05Config
    from lerobot.policies.pi05.modeling_pi05 import PI05Policy

    policy = PI05Policy(PI05Config(dtype=dtype, device=device))
    if reinit:
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, p in sorted(policy.named_parameters()):
                if name.endswith("bias"):
                    std, mean = 0.02, 0.0
                elif p.ndim == 1:  # norm scales: Gemma offsets around 0, LayerNorm scales around 1
                    std, mean = 0.1, (1.0 if ("layer_norm" in name or "post_layernorm" in name) else 0.0)
                else:
                    std, mean = 1.0 / math.sqrt(p[0].numel()), 0.0
                values = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32) * std + mean
                p.copy_(values)
    return policy.eval()


def save_state(policy, out: Path) -> Path:
    """The policy's state dict under checkpoint keys (lerobot's layout; transformers 5.x's
    SigLIP without `vision_model` is written with it, as lerobot's Hub checkpoints hold
    it), one copy per tensor (PaliGemma's tied lm_head / embed_tokens share storage)."""
    from safetensors.torch import save_file

    from parity.probes import pi05_tree

    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.safetensors"
    save_file(pi05_tree.checkpoint_state(policy), str(path))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/lerobot_pi05")
    ap.add_argument("--lerobot-init", action="store_true", help="keep lerobot's own random init")
    ap.add_argument("--min-cos", type=float, default=None, help="fixed bound (default: parity's defaults)")
    args = ap.parse_args()

    import parity
    from parity.probes import pi05_tree
    from parity.taps.backends import BackendOptions

    out = Path(args.out)
    t0 = time.time()
    policy = build_policy(args.dtype, args.device, not args.lerobot_init, args.seed)
    path = save_state(policy, out)
    print(f"built and saved {sum(p.numel() for p in policy.parameters()) / 1e9:.2f}B parameters to {path} "
          f"in {time.time() - t0:.0f}s")

    def lerobot_pi05(options: BackendOptions):
        # the policy already holds these weights; loading them again checks every name and shape
        return pi05_tree.backend(policy, options, name="lerobot PI05Policy")

    t0 = time.time()
    report = parity.compare("pytorch", lerobot_pi05(BackendOptions(device=args.device, seed=args.seed,
                                                                  weights=str(out))),
                            device=args.device, seed=args.seed, weights=str(out), min_cos=args.min_cos,
                            dtype=args.dtype)  # the reference in the policy's dtype
    measured = [r for r in report.rows if r.metrics is not None]
    worst = min(measured, key=lambda r: r.metrics.cos) if measured else None
    first = report.first_divergence
    print(f"compared {len(report.rows)} taps in {time.time() - t0:.0f}s: {'PASS' if report else 'FAIL'} "
          f"(reference dtype {report.ref_meta.get('dtype')}, candidate dtype {report.cand_meta.get('dtype')}, "
          f"judged {report.thresholds.get('calibration')})")
    if worst is not None:
        print(f"worst cosine: {worst.metrics.cos:.6f} at {worst.key} (max |diff| {worst.metrics.max_abs:.4g})")
    if first is not None:
        print(f"first divergence: {first.key} ({first.status}: {first.reason or ''})")
        print(f"  {report.localisation.line() if report.localisation else ''}")
    for line in report.problems:
        print(f"problem: {line}")
    stage = [r for r in report.rows if r.info.layer is None and not r.passed]
    for r in stage[:20]:
        print(f"  failing stack tap {r.key}: cos {r.cos}")
    (out / "report.json").write_text(json.dumps(report.to_dict()))
    print(f"wrote {out / 'report.json'} (render: parity report {out / 'report.json'})")
    return 0 if report else 1


if __name__ == "__main__":
    raise SystemExit(main())
