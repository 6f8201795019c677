"""What a sharded candidate costs: capture per rank, and the diff of the rank dumps.

    PYTHONPATH=. python bench/sharded.py --world 2

A Llama split by hand for tensor parallelism (tests/distributed/tp_llama.py: column-parallel
q/k/v and gate/up, row-parallel o_proj and down_proj with an all-reduce), run as a `--world`
rank gloo job on this machine's CPU (`--device cuda` with `--dist nccl`: one GPU per rank).
Each rank times, in interleaved rounds (bench/rounds.py), its plain forward against a
capture of its taps to host memory and to its own dump: the capture overhead per rank.
Then, on the rank dumps, the sharded diff (`parity diff REF.h5 'cand-rank*.h5'`) against
the two-dump diff of the same reference with a single-process dump of the same size:
throughput of each and their ratio, from interleaved rounds.  Writes
bench/results/sharded_<card>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from record import write_result
from rounds import interleaved

HERE = Path(__file__).resolve().parent
TP = HERE.parent / "tests" / "distributed"  # the hand-split TP Llama the distributed tests use
CONFIG = dict(vocab_size=512, hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=8, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
OPTS = dict(batch=2, seq_len=256, padding="left")


def save_llama(folder: Path) -> Path:
    import transformers as T

    torch.manual_seed(0)
    T.LlamaForCausalLM(T.LlamaConfig(**CONFIG)).save_pretrained(folder)
    return folder


def _rank(rank: int, world: int, port: int, model: str, out: str, device: str, backend: str, rounds: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        sys.path.insert(0, str(TP))
        sys.path.insert(0, str(HERE))
        import tp_llama

        from parity.api import backend_options, capture_to_dump
        from parity.capture.recorder import capture
        from parity.probes.hf.backend import factory
        from parity.taps.records import Capture

        opts = backend_options(**OPTS, device=f"cuda:{rank}" if device == "cuda" else "cpu")
        cand = tp_llama.shard(factory(opts, f"{model}@attn=eager,dtype=float32"), rank, world)
        dump = Path(out) / f"cand-rank{rank}.h5"

        def to_dump():
            dump.unlink(missing_ok=True)
            capture_to_dump(cand, opts, dump)

        # every rank runs the same variants in the same order: the all-reduces pair up
        timing = interleaved({"plain": cand.run, "capture_host": lambda: capture(cand, Capture()),
                              "capture_dump": to_dump}, rounds)
        timing["ms"] = {k: {m: v[m] for m in ("median", "min", "max")} for k, v in timing["ms"].items()}
        (Path(out) / f"timing-rank{rank}.json").write_text(json.dumps(timing))
        dist.barrier()  # every rank done before any tears the group down
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dist", default="gloo", choices=("gloo", "nccl"))
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (at least 5 for a reported ratio)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    from parity.api import backend_options, capture_to_dump, diff_dumps

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world))
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    with tempfile.TemporaryDirectory(dir=os.environ.get("PARITY_BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        model = save_llama(tmp / "llama")
        opts = backend_options(**OPTS, device="cuda" if args.device == "cuda" else "cpu")
        spec = f"hf:{model}@attn=eager,dtype=float32"
        ref, single = tmp / "ref.h5", tmp / "single.h5"
        capture_to_dump(spec, opts, ref)
        capture_to_dump(spec, opts, single)
        sys.path.insert(0, str(TP))
        from jobs import free_port  # the distributed tests' helper

        mp.start_processes(_rank, args=(args.world, free_port(), str(model), str(tmp), args.device, args.dist,
                                        args.rounds), nprocs=args.world, join=True, start_method="spawn")
        ranks = [json.loads((tmp / f"timing-rank{r}.json").read_text()) for r in range(args.world)]
        pattern = str(tmp / "cand-rank*.h5")
        shard_bytes = sum(p.stat().st_size for p in tmp.glob("cand-rank*.h5"))
        pair = {"sharded": lambda: diff_dumps(ref, pattern), "two_dumps": lambda: diff_dumps(ref, single)}
        diffs = interleaved(pair, args.rounds, base="two_dumps", keep_last=True)
        verdicts = {k: bool(v) for k, v in diffs.pop("last").items()}
        ref_bytes, single_bytes = ref.stat().st_size, single.stat().st_size
    mbps = {"sharded": (ref_bytes + shard_bytes) / 1e6 / (diffs["ms"]["sharded"]["median"] / 1e3),
            "two_dumps": (ref_bytes + single_bytes) / 1e6 / (diffs["ms"]["two_dumps"]["median"] / 1e3)}
    result = {"card": card, "torch": torch.__version__, "world": args.world, "dist": args.dist, "config": CONFIG,
              "options": OPTS, "rounds": args.rounds, "capture_per_rank": ranks, "diff": diffs,
              "diff_MBps": mbps, "dump_bytes": {"ref": ref_bytes, "single": single_bytes, "ranks": shard_bytes},
              "passed": verdicts}
    print(f"card {card}, torch {torch.__version__}, TP Llama (hidden {CONFIG['hidden_size']}, "
          f"{CONFIG['num_hidden_layers']} layers) on {args.world} {args.dist} ranks; ratios per round: "
          f"median (min-max) of {args.rounds} interleaved rounds")
    for r, t in enumerate(ranks):
        cells = ", ".join(f"{k} {v['median']:.2f}x ({v['min']:.2f}-{v['max']:.2f})" for k, v in t["ratio"].items())
        print(f"rank {r}: plain {t['ms']['plain']['median']:.1f} ms | {cells}")
    s = diffs["ratio"]["sharded"]
    print(f"diff of the rank dumps {mbps['sharded']:.0f} MB/s vs a two-dump diff {mbps['two_dumps']:.0f} MB/s: "
          f"time {s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f}); both passed: {verdicts}")
    write_result(args.out, f"sharded_world{args.world}", card, result)


if __name__ == "__main__":
    main()
