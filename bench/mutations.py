"""The mutation campaign: how often parity's verdicts are right on bugs nobody catalogued.

    python bench/mutations.py                                  # every mutation (minutes on 2 CPU cores)
    python bench/mutations.py --sample 3 --family pi05,llama   # 3 per class and family
    python bench/mutations.py --name mutations_baseline        # -> bench/results/mutations_baseline_cpu.json
    python bench/mutations.py --jobs 2 --fixed                 # 2 processes; the fixed bounds only
    python bench/mutations.py --show bench/results/mutations_baseline_cpu.json   # its table again

Generic mutations (`parity.mutate`: scale x2 and x1.1, offset, sign flip, token roll,
head permutation, a zeroed head, a transposed square weight, a bf16/fp16 round trip, a
skipped module, swapped inputs) are planted at every tapped module where they apply, one
at a time, in the candidate only, of
  pi05       tiny pi0.5, `pytorch` vs `pytorch`, bf16 (every class but the downcasts),
             plus the between-layer bugs of `parity.probes.pi05.mutations.stages`
  pi05_fp32  the same in float32, for the downcast classes (they need an fp32 reference)
  llama, qwen3, gemma   tiny random transformers models (seeded, saved to a temporary
             folder, no download), float32, `attn=eager` vs `attn=sdpa`, 3 left-padded prompts
Each is diffed with `parity.compare` (its default judgement, isolation on) and scored
against the answer derived from where it was planted (`parity.mutate.expect`): detected;
first divergence at the mutated component's tap (or the first tap that observes it);
INTRODUCED AT naming that component, or a bracket [last passing tap, first failing tap]
around where it entered; a hint that does not fit (any hint, for a generic mutation).
Controls per family (no mutation; identity hooks at every site) must pass.  Prints the
table and writes bench/results/<name>_<card>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

import parity
from parity import mutate
from parity.taps.backends import BackendOptions, resolve

FAMILIES = ("pi05", "pi05_fp32", "llama", "qwen3", "gemma")
HF_TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               head_dim=8, initializer_range=32 ** -0.5)
HF_OPTIONS = dict(batch=3, padding="left", seed=0)
DOWNCASTS = ("downcast",)
GOALS = {"detected_frac": 0.99, "first_right_frac": 0.97, "located_right_frac": 0.95, "wrong_hints": 0,
         "controls": 1.0}


# The fixed sample tests/test_mutations.py runs in `make test`: (label, where) per family, a
# few per class (the issue's own findings among them: layer 1's o_proj x2, an MLP x1.1, the
# velocity head x2, image tokens x sqrt(width), a cache handoff bug).
_HF_SAMPLE = (
    ("sign flip", "model.layers.1.mlp"), ("token roll +1", "model.layers.0.self_attn.v_proj"),
    ("head permutation", "model.layers.1.self_attn.o_proj input"), ("zeroed head 0", "model.layers.2.self_attn.q_proj"),
    ("transposed square weight", "model.layers.1.self_attn.o_proj"),
    ("swapped inputs", "model.layers.1 (position_embeddings)"),
    ("scale x2", "model.layers.1.self_attn.o_proj"), ("scale x1.1", "model.layers.1.mlp"),
    ("offset +0.1 rms", "model.layers.0.mlp"), ("skipped module", "model.layers.1.post_attention_layernorm"),
    ("downcast bf16", "model.layers.1.mlp"),
)
SAMPLE: dict[str, tuple[tuple[str, str], ...]] = {
    "pi05": (
        ("sign flip", "prefix.layers.1.mlp"), ("sign flip", "expert.layers.2.self_attn.core"),
        ("token roll +1", "vision.layers.0.self_attn.v_proj"), ("head permutation", "prefix.layers.0.self_attn.q_proj"),
        ("zeroed head 0", "vision.layers.1.self_attn.core"),
        ("transposed square weight", "expert.layers.1.self_attn.o_proj"),
        ("transposed square weight", "action_in_proj"),
        ("swapped inputs", "prefix.layers.1 (rope)"),
        ("scale x2", "prefix.layers.1.self_attn.o_proj"), ("scale x2", "expert.velocity"),
        ("scale x1.1", "prefix.layers.2.mlp"), ("offset +0.1 rms", "expert.layers.0.mlp"),
        ("skipped module", "prefix.layers.2.input_norm"),
        ("image tokens x sqrt(width)", "embed_prefix"), ("prefix positions count padding", "plan_tokens"),
        ("noise drawn again", "denoise"), ("step 5's t off by half a step", "velocity"),
        ("K and V swapped in the cache", "prefix_cache"),
    ),
    "pi05_fp32": (("downcast bf16", "prefix.layers.1.mlp"), ("downcast fp16", "expert.layers.0.self_attn.core")),
    "llama": _HF_SAMPLE,
    "qwen3": (*_HF_SAMPLE, ("zeroed head 0", "model.layers.1.self_attn.k_norm")),
    "gemma": _HF_SAMPLE,
}


def in_sample(family: str) -> Callable[[Case], bool]:
    chosen = set(SAMPLE[family])
    return lambda case: (case.label, case.where) in chosen


@dataclass
class Case:
    """One planted mutation and its answer."""

    family: str
    cls: str  # the class it is counted in: a generic mutation's label, or a between-layer kind
    label: str
    where: str  # the site's module (and argument), or the between-layer bug
    planted: Callable[[], Any]  # () -> a context manager planting it in the candidate
    expected: mutate.Expected

    def to_dict(self) -> dict[str, Any]:
        e = self.expected
        return {"family": self.family, "class": self.cls, "label": self.label, "where": self.where,
                "expected": {"tap": e.tap, "introduced": list(e.introduced), "after": list(e.after),
                             "hints": list(e.hints)}}


@dataclass
class Family:
    """Both backends of one family (built once; the candidate gets each mutation in turn) and its cases."""

    name: str
    ref: Any
    cand: Any
    cases: Callable[[Any], list[Case]]  # control report -> cases
    controls: list[tuple[str, Callable[[], Any]]] = field(default_factory=list)
    keep: Any = None  # what must live as long as the backends (a temporary folder)


# ------------------------------------------------------------------ families


def _generic_cases(name: str, cand, where: list[mutate.Site], control, part_of, keep_mutation) -> list[Case]:
    seen = mutate.survey(cand.model, cand.run, where)
    cases = []
    for site in where:
        if site not in seen:
            continue  # the module did not run
        for m in mutate.generic():
            if not keep_mutation(site, m) or not m.applies(seen[site].value, seen[site].call):
                continue
            at = site.module + (f" ({site.arg})" if site.arg else "") + (" input" if site.on == mutate.INPUT else "")
            cases.append(Case(name, m.label, m.label, at,
                              lambda site=site, m=m: mutate.planted(cand.model, [(site, m)]),
                              mutate.expect(site, control, part_of)))
    return cases


def _controls(cand, where: list[mutate.Site]) -> list[tuple[str, Callable[[], Any]]]:
    """No mutation, and identity hooks at every site (the planting itself changes nothing)."""
    identity = mutate.Mutation("control", "identity", lambda v, c: v)
    plain = [s for s in where if s.arg is None]
    return [("no mutation", contextlib.nullcontext),
            ("identity hooks at every site", lambda: mutate.planted(cand.model, [(s, identity) for s in plain]))]


def pi05_family(name: str, dtype: str) -> Family:
    from parity.probes.pi05 import mutations as pm

    opts = BackendOptions(dtype=dtype, seed=0)
    ref, cand = resolve("pytorch", opts), resolve("pytorch", opts)
    pm.expose_cores(cand.model)
    where = pm.sites(cand.model)
    fp32 = dtype == "float32"

    def keep(site, m):
        return pm.fits(site, m) and ((m.kind in DOWNCASTS) == fp32)

    def cases(control):
        out = _generic_cases(name, cand, where, control, pm.part_of, keep)
        if not fp32:
            out += [Case(name, s.kind, s.label, s.where, lambda s=s: s.planted(cand.model),
                         s.expected(control)) for s in pm.stages(cand.model.cfg)]
        return out

    return Family(name, ref, cand, cases, _controls(cand, where))


# initializer_range: transformers' default 0.02 leaves a 32-wide model's attention logits near 0,
# so every query attends alike and no RoPE or q/k bug can show; fan-in scale gives real attention.


def _hf_model(kind: str):
    import transformers as T

    torch.manual_seed(0)
    if kind == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**HF_TEXT))
    if kind == "qwen3":
        return T.Qwen3ForCausalLM(T.Qwen3Config(**HF_TEXT))
    if kind == "gemma":
        return T.GemmaForCausalLM(T.GemmaConfig(**HF_TEXT))
    raise ValueError(f"unknown tiny model {kind!r}")


def _heads(config, component: str) -> int | None:
    if component in ("q", "attn", "q_norm"):
        return config.num_attention_heads
    if component in ("k", "v", "k_norm"):
        return config.num_key_value_heads
    return None


def hf_family(kind: str) -> Family:
    import transformers

    folder = tempfile.TemporaryDirectory(prefix=f"parity-mutations-{kind}-")
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        _hf_model(kind).save_pretrained(folder.name)
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    opts = BackendOptions(**HF_OPTIONS)
    ref = resolve(f"hf:{folder.name}@attn=eager,dtype=float32", opts)
    cand = resolve(f"hf:{folder.name}@attn=sdpa,dtype=float32", opts)
    config = cand.model.config
    where = [replace(s, heads=_heads(config, s.tap.rpartition(".")[2])) for s in mutate.sites(cand.model, cand.probe)]
    where += mutate.pair_sites(cand.model, r"model\.layers\.(?P<layer>\d+)", "decoder", {"position_embeddings": "attn"})

    def cases(control):
        return _generic_cases(kind, cand, where, control, None, lambda site, m: True)

    return Family(kind, ref, cand, cases, _controls(cand, where), keep=folder)


def build(name: str) -> Family:
    if name == "pi05":
        return pi05_family(name, "bfloat16")
    if name == "pi05_fp32":
        return pi05_family(name, "float32")
    return hf_family(name)


# ------------------------------------------------------------------ running


def sample(cases: list[Case], n: int | None, seed: int = 0) -> list[Case]:
    """`n` cases per class (all of a class with fewer), the same ones every time."""
    if n is None:
        return cases
    by_class: dict[str, list[Case]] = {}
    for c in cases:
        by_class.setdefault(c.cls, []).append(c)
    rng = random.Random(seed)
    keep = {id(c) for group in by_class.values() for c in rng.sample(group, min(n, len(group)))}
    return [c for c in cases if id(c) in keep]


def _compare(family: Family, oracle: bool | None):
    """The diff as a user runs it (oracle None: parity's default judgement), or forced."""
    return parity.compare(family.ref, family.cand, oracle=oracle)


def _error(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


MISSED = mutate.Outcome(False, None, False, None, None, False, None, False)


def run_case(family: Family, case: Case, oracle: bool | None = None) -> dict[str, Any]:
    """One mutation planted, diffed and scored; a diff that raises scores as a miss, with its error."""
    t0 = time.perf_counter()
    try:
        with case.planted():
            report = _compare(family, oracle)
    except Exception as exc:  # noqa: BLE001 - a diff that cannot be made is a finding, not the campaign's end
        outcome, error = MISSED, _error(exc)
    else:
        outcome, error = mutate.score(report, case.expected), None
    return {**case.to_dict(), **outcome.to_dict(), "error": error, "seconds": round(time.perf_counter() - t0, 3)}


def run_control(family: Family, label: str, planted, oracle: bool | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"family": family.name, "control": label}
    try:
        with planted():
            report = _compare(family, oracle)
    except Exception as exc:  # noqa: BLE001 - as for a mutation
        return {**row, "passed": False, "taps": 0, "first": None, "reason": _error(exc)}
    first = report.first_divergence
    return {**row, "passed": bool(report), "taps": len(report.rows), "first": None if first is None else first.key,
            "reason": None if first is None else first.reason}


def run_family(name: str, n: int | None = None, shard: int = 0, shards: int = 1,
               only: Callable[[Case], bool] = lambda c: True, oracle: bool | None = None,
               progress: Callable[[str], None] = lambda s: None) -> tuple[list[dict], list[dict]]:
    """(controls, cases) of one family, each as a JSON-ready row: the cases chosen by `n`
    and `only`, every `shards`-th from `shard` (the controls run in shard 0 only).  The
    answers come from a plain diff without mutation (its tap order and modules)."""
    family = build(name)
    plain = _compare(family, False)
    controls = [run_control(family, label, planted, oracle) for label, planted in family.controls] if shard == 0 else []
    chosen = [c for c in sample(family.cases(plain), n) if only(c)][shard::shards]
    rows = []
    for i, case in enumerate(chosen):
        rows.append(run_case(family, case, oracle))
        progress(f"{name} {i + 1}/{len(chosen)}")
    return controls, rows


def _worker(task: tuple[str, int | None, int, int, int, bool]) -> tuple[list[dict], list[dict]]:
    name, n, shard, shards, threads, oracle = task
    torch.set_num_threads(threads)
    return run_family(name, n, shard, shards, oracle=oracle)


def run_all(families: list[str], n: int | None, jobs: int, threads: int, oracle: bool | None = None,
            progress: Callable[[str], None] = lambda s: None) -> tuple[list[dict], list[dict]]:
    """Every family's (controls, cases), in `jobs` processes (each family split in `jobs` shards)."""
    torch.set_num_threads(threads)
    if jobs == 1:
        parts = [run_family(name, n, oracle=oracle, progress=progress) for name in families]
    else:
        import concurrent.futures
        import multiprocessing

        tasks = [(name, n, shard, jobs, threads, oracle) for name in families for shard in range(jobs)]
        parts = []
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for i, part in enumerate(pool.map(_worker, tasks)):
                parts.append(part)
                progress(f"{i + 1}/{len(tasks)} shards")
    return [c for part in parts for c in part[0]], [r for part in parts for r in part[1]]


STAGE_KINDS = ("embedding assembly", "positions", "noise", "time schedule", "cache write")


def totals(rows: list[dict], key: str) -> dict[str, dict]:
    """Summaries per class or family, in the campaign's order (generic classes, then the between-layer kinds)."""
    groups: dict[str, list[mutate.Outcome]] = {}
    for r in rows:
        groups.setdefault(r[key], []).append(_outcome(r))
    order = [m.label for m in mutate.generic()] + list(STAGE_KINDS) + list(FAMILIES)
    return {k: mutate.summary(groups[k]) for k in sorted(groups, key=lambda k: (order.index(k) if k in order
                                                                                  else len(order), k))}


def _outcome(r: dict) -> mutate.Outcome:
    return mutate.Outcome(r["detected"], r["first"], r["first_right"], r["introduced"],
                          None if r["bracket"] is None else tuple(r["bracket"]), r["located_right"], r["hint"],
                          r["hint_wrong"])


def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f}%"


def table(rows: list[dict], controls: list[dict]) -> str:
    """The campaign's table in Markdown: per class, per family, overall, the controls."""
    head = "| {} | n | detected | first divergence right | introduced-at or bracket right | wrong hints |"
    lines = []

    def block(title: str, groups: dict[str, dict]):
        lines.extend([head.format(title), "|---|---|---|---|---|---|"])
        for name, s in groups.items():
            lines.append(f"| {name} | {s['n']} | {_pct(s['detected_frac'])} | {_pct(s['first_right_frac'])} | "
                         f"{_pct(s['located_right_frac'])} | {s['wrong_hints']} |")
        lines.append("")
    block("class", totals(rows, "class"))
    block("family", totals(rows, "family"))
    block("all", {"overall": mutate.summary(_outcome(r) for r in rows)})
    passed = sum(c["passed"] for c in controls)
    lines.append(f"controls: {passed}/{len(controls)} pass"
                 + "".join(f"; FAILED {c['family']} {c['control']} at {c['first']}" for c in controls
                           if not c["passed"]))
    return "\n".join(lines)


def _code_state() -> dict[str, Any]:
    """The commit measured, and how parity's source differs from it (files changed, new files)."""
    root = Path(__file__).resolve().parents[1]

    def git(*args):
        try:
            return subprocess.run(["git", "--no-optional-locks", *args], cwd=root, capture_output=True, text=True,
                                  check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None
    status = (git("status", "--porcelain", "--", "parity", "probes") or "").splitlines()
    return {"commit": (git("rev-parse", "HEAD") or "").strip() or None,
            "modified": sorted(line[3:] for line in status if not line.startswith("??")),
            "untracked": sorted(line[3:] for line in status if line.startswith("??"))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    ap.add_argument("--sample", type=int, default=None, metavar="N", help="N mutations per class and family")
    ap.add_argument("--jobs", type=int, default=1, help="processes (each family is split among them)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (tiny models: 1 is fastest)")
    ap.add_argument("--name", default="mutations", help="result file bench/results/<name>_<card>.json")
    ap.add_argument("--out", default="bench/results")
    judge = ap.add_mutually_exclusive_group()
    judge.add_argument("--oracle", dest="oracle", action="store_const", const=True, default=None,
                       help="calibrated budgets everywhere: parity.compare(oracle=True)")
    judge.add_argument("--fixed", dest="oracle", action="store_const", const=False,
                       help="the fixed bounds only: parity.compare(oracle=False)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--show", metavar="JSON", help="print the table of a result file written earlier, run nothing")
    args = ap.parse_args(argv)
    if args.show:
        import json

        result = json.loads(Path(args.show).read_text())
        print(table(result["mutations"], result["controls"]))
        return 0
    families = [f.strip() for f in args.family.split(",") if f.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        ap.error(f"unknown family {', '.join(unknown)}; known: {', '.join(FAMILIES)}")
    card = "cpu"
    t0 = time.perf_counter()
    progress = (lambda s: None) if args.quiet else (lambda s: print(f"\r{s}   ", end="", file=sys.stderr, flush=True))
    controls, rows = run_all(families, args.sample, args.jobs, args.threads, args.oracle, progress)
    if not args.quiet:
        print(file=sys.stderr)
    seconds = time.perf_counter() - t0
    import transformers

    result = {
        "card": card, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "jobs": args.jobs,
        "threads": args.threads,
        "code": _code_state(), "families": families, "sample": args.sample, "oracle": args.oracle,
        "seconds": round(seconds, 1),
        "goals": GOALS, "controls": controls,
        "totals": {"overall": mutate.summary(_outcome(r) for r in rows), "by_class": totals(rows, "class"),
                   "by_family": totals(rows, "family"),
                   "controls": {"n": len(controls), "passed": sum(c["passed"] for c in controls)}},
        "mutations": rows,
    }
    print(table(rows, controls))
    print(f"{len(rows)} mutations, {len(controls)} controls in {seconds:.0f} s (torch {torch.__version__}, {card})")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from record import write_result

    write_result(args.out, args.name, card, result)
    return 0 if all(c["passed"] for c in controls) else 1


if __name__ == "__main__":
    sys.exit(main())
