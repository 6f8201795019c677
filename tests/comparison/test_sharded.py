"""The diff of a reference dump against a sharded candidate (one dump per rank): rank
dumps are split by hand from a real capture of examples/toy_backend.py's reference."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from parity.api import capture_live
from parity.cli import app
from parity.comparison.sharded import diff_sharded
from parity.dump.writer import write_dump
from parity.errors import InputError
from parity.taps.backends import BackendOptions
from parity.taps.records import Capture, Layout, Tap

MLP0, NORM1, MLP1 = "toy.0.mlp", "toy.1.norm", "toy.1.mlp"


@pytest.fixture(scope="module")
def ref_cap() -> Capture:
    return capture_live("examples.toy_backend:reference", BackendOptions(batch=2))


@pytest.fixture(scope="module")
def stale_cap() -> Capture:
    return capture_live("examples.toy_backend:reference", BackendOptions(batch=2, seed=1))


@pytest.fixture()
def ref_path(ref_cap, tmp_path):
    return write_dump(tmp_path / "ref.h5", ref_cap)


def split(array: np.ndarray, spec: dict, world: int) -> list[np.ndarray]:
    """Each rank's shard of a full tap, cut by hand (not by the code under test)."""
    kind = spec["kind"]
    if kind == "column":
        g = spec.get("groups", 1)
        grouped = array.reshape(*array.shape[:-1], g, array.shape[-1] // g)
        return [p.reshape(*array.shape[:-1], -1) for p in np.split(grouped, world, axis=-1)]
    if kind == "heads":
        heads = np.split(array, spec["heads"], axis=-1)
        per = spec["heads"] // world
        return [np.concatenate(heads[r * per:(r + 1) * per], axis=-1) for r in range(world)]
    if kind == "sequence":
        return np.split(array, world, axis=1)
    if kind == "partial":
        rng = np.random.default_rng(0)
        noise = [rng.standard_normal(array.shape) for _ in range(world - 1)]
        parts = [array / world + n for n in noise]
        parts.append(array - sum(parts))
        return [p.astype(array.dtype) for p in parts]
    return [array.copy() for _ in range(world)]


def write_ranks(tmp_path, cap: Capture, world: int, sharding: dict, *, tamper=None, meta=None, stem="cand"):
    """One dump per rank.  `tamper(rank, key, shard) -> shard | None` (None drops the tap);
    `meta(rank) -> dict` of meta fields to override.  Sequence-split taps use a per-rank
    layout 'tokens_seq' (their slice of the reference's 'tokens')."""
    from parity.comparison.sharded import spec_for

    paths = []
    full = cap.layouts["tokens"]
    for rank in range(world):
        taps, layouts = [], {"tokens": full}
        seq_slots = np.split(full.slots, world, axis=1)[rank]
        for tap in cap.taps:
            spec = spec_for(sharding, tap.info.name, tap.key)
            shard = split(tap.array, spec, world)[rank]
            if tamper is not None:
                shard = tamper(rank, tap.key, shard)
                if shard is None:
                    continue
            layout = tap.layout
            if spec["kind"] == "sequence":
                layout = "tokens_seq"
                layouts[layout] = Layout(seq_slots.copy(), full.length, full.regions)
            taps.append(Tap(tap.info, tap.order, np.ascontiguousarray(shard), tap.dtype, layout))
        m = {**cap.meta, "rank": rank, "world_size": world, "sharding": sharding}
        if meta is not None:
            m.update(meta(rank))
        paths.append(write_dump(tmp_path / f"{stem}-rank{rank}.h5", Capture(taps, layouts, m)))
    return str(tmp_path / f"{stem}-rank*.h5"), paths


SPECS = {
    "column": {MLP0: {"kind": "column"}, "toy.1.*": {"kind": "column"}},
    "groups": {"toy.*.mlp": {"kind": "column", "groups": 2}},
    "heads": {"toy.*": {"kind": "heads", "heads": 4}},
    "sequence": {"toy.0.*": {"kind": "sequence"}, MLP1: {"kind": "sequence"}},
    "partial": {"toy.*.mlp": {"kind": "partial"}},
    "replicated": {},
    "mixed": {"toy.0.norm": {"kind": "sequence"}, MLP0: {"kind": "partial"}, NORM1: {"kind": "heads", "heads": 4},
              MLP1: {"kind": "column", "groups": 2}},
}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_correct_shards_pass(tmp_path, ref_cap, ref_path, name, world):
    pattern, _ = write_ranks(tmp_path, ref_cap, world, SPECS[name])
    report = diff_sharded(ref_path, pattern)
    assert report.passed, (report.problems, [(r.key, r.reason) for r in report.rows])
    assert len(report.rows) == len(ref_cap.taps)
    assert not any("diverge" in w for w in report.warnings)
    assert report.cand_meta["ranks"] == sorted(report.cand_meta["ranks"])
    from parity.report.schema import check_report

    check_report(json.loads(json.dumps(report.to_dict())))


def test_a_list_of_rank_paths_in_any_order(tmp_path, ref_cap, ref_path):
    _, paths = write_ranks(tmp_path, ref_cap, 4, SPECS["mixed"])
    assert diff_sharded(ref_path, list(reversed(paths))).passed


def test_shards_in_the_wrong_order_fail_at_their_tap_on_every_rank(tmp_path, ref_cap, ref_path):
    world = 2

    def swap(rank, key, shard):
        if key != MLP0:
            return shard
        return split(ref_cap.by_key()[MLP0].array, {"kind": "column"}, world)[world - 1 - rank]

    pattern, _ = write_ranks(tmp_path, ref_cap, world, SPECS["column"], tamper=swap)
    report = diff_sharded(ref_path, pattern)
    assert not report.passed and report.first_divergence.key == MLP0
    assert [r.key for r in report.rows if not r.passed] == [MLP0]
    assert any(w.startswith(f"all 2 ranks diverge at {MLP0}") for w in report.warnings), report.warnings


def test_stale_weights_on_one_rank_are_named(tmp_path, ref_cap, stale_cap, ref_path):
    world = 4
    stale = split(stale_cap.by_key()[MLP0].array, {"kind": "column", "groups": 2}, world)[3]
    pattern, _ = write_ranks(tmp_path, ref_cap, world, SPECS["groups"],
                             tamper=lambda rank, key, shard: stale if (rank, key) == (3, MLP0) else shard)
    report = diff_sharded(ref_path, pattern)
    assert report.first_divergence.key == MLP0
    line = next(w for w in report.warnings if "diverge" in w)
    assert line.startswith(f"rank 3 of 4 diverges at {MLP0} (cos ") and line.endswith("; ranks 0-2 match"), line


def test_sequence_shard_of_one_rank_is_named(tmp_path, ref_cap, ref_path):
    def bad(rank, key, shard):
        return shard + 1.0 if (rank, key) == (0, MLP1) else shard

    pattern, _ = write_ranks(tmp_path, ref_cap, 2, SPECS["sequence"], tamper=bad)
    report = diff_sharded(ref_path, pattern)
    assert report.first_divergence.key == MLP1
    assert any(w.startswith(f"rank 0 of 2 diverges at {MLP1}") and w.endswith("rank 1 matches")
               for w in report.warnings), report.warnings


def test_a_missing_all_reduce_fails_the_partial_tap(tmp_path, ref_cap, ref_path):
    # one rank's partial sum never reached the others: the sum lacks its part
    def lost(rank, key, shard):
        return np.zeros_like(shard) if (rank, key) == (2, MLP1) else shard

    pattern, _ = write_ranks(tmp_path, ref_cap, 4, SPECS["partial"], tamper=lost)
    report = diff_sharded(ref_path, pattern)
    assert [r.key for r in report.rows if not r.passed] == [MLP1]
    assert any("per-rank comparison is not defined for 2 partial-sum taps" in w for w in report.warnings)


def test_a_replicated_tap_differing_on_one_rank_is_a_problem_naming_it(tmp_path, ref_cap, ref_path):
    def drift(rank, key, shard):
        return shard * 1.5 if (rank, key) == (2, NORM1) else shard

    pattern, _ = write_ranks(tmp_path, ref_cap, 4, SPECS["replicated"], tamper=drift)
    report = diff_sharded(ref_path, pattern)
    assert not report.passed
    assert report.first_divergence is None  # rank 0's copy matches the reference
    assert any(p.startswith(f"replicated tap {NORM1}: rank 2 of 4 disagrees with ranks 0-1, 3 (cos ")
               for p in report.problems), report.problems
    assert any(w.startswith(f"rank 2 of 4 diverges at {NORM1}") and w.endswith("ranks 0-1, 3 match")
               for w in report.warnings), report.warnings


def test_a_replicated_tap_differing_on_rank_0_names_rank_0(tmp_path, ref_cap, ref_path):
    pattern, _ = write_ranks(tmp_path, ref_cap, 4, SPECS["replicated"],
                             tamper=lambda rank, key, shard: shard * 1.5 if (rank, key) == (0, NORM1) else shard)
    report = diff_sharded(ref_path, pattern)
    assert report.first_divergence.key == NORM1  # rank 0's copy is the one compared
    assert [p for p in report.problems if p.startswith("replicated")] == [
        p for p in report.problems if p.startswith(f"replicated tap {NORM1}: rank 0 of 4 disagrees with ranks 1-3")]
    assert len([p for p in report.problems if p.startswith("replicated")]) == 1


def _cli(*args):
    result = CliRunner().invoke(app, ["diff", *map(str, args)], catch_exceptions=False)
    return result.exit_code, result.output


def test_cli_diffs_a_glob_of_rank_dumps(tmp_path, ref_cap, ref_path):
    pattern, _ = write_ranks(tmp_path, ref_cap, 2, SPECS["mixed"])
    code, out = _cli(ref_path, pattern, "--json", tmp_path / "r.json")
    assert code == 0, out
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is True
    stale = split(ref_cap.by_key()[MLP1].array, {"kind": "column", "groups": 2}, 2)[0] * 0.5
    pattern, _ = write_ranks(tmp_path, ref_cap, 2, SPECS["mixed"], stem="bad",
                             tamper=lambda rank, key, shard: stale if (rank, key) == (1, MLP1) else shard)
    code, out = _cli(ref_path, pattern)
    assert code == 1 and MLP1 in out and "rank 1 of 2 diverges" in out


def _drop_file(paths):
    os.remove(paths[1])


FAIL_CLOSED = {
    "no file matches": (dict(), "nothing", "no file matches"),
    "a rank missing": (dict(after=_drop_file), None, "rank 1 missing"),
    "a rank duplicated": (dict(meta=lambda r: {"rank": 0}), None, "rank 0 appears twice"),
    "world sizes disagree": (dict(meta=lambda r: {"world_size": 4 if r else 2}), None, "disagree on world_size"),
    "rank out of range": (dict(meta=lambda r: {"rank": r + 1}), None, "outside [0, 2)"),
    "backend disagrees": (dict(meta=lambda r: {"backend": f"b{r}"}), None, "disagree on backend"),
    "fingerprint disagrees": (dict(meta=lambda r: {"input_fingerprint": f"f{r}"}), None,
                              "disagree on input_fingerprint"),
    "not a rank dump": (dict(meta=lambda r: {"rank": None}), None, "no integer 'rank'"),
    "tap on some ranks only": (dict(tamper=lambda rank, key, shard: None if (rank, key) == (1, NORM1) else shard),
                               None, f"tap {NORM1} is on rank 0 but not on rank 1"),
    "shards do not add up": (dict(tamper=lambda rank, key, shard: shard[..., :-1] if (rank, key) == (1, MLP1)
                                  else shard), None, "do not add up"),
    "replicated shapes differ": (dict(tamper=lambda rank, key, shard: shard[:, :-1] if (rank, key) == (1, NORM1)
                                      else shard), None, "do not add up"),
    "bad kind": (dict(sharding={"toy.*": {"kind": "diagonal"}}), None, "kind must be one of"),
}


@pytest.mark.parametrize("case", sorted(FAIL_CLOSED))
def test_fail_closed_with_one_line_exit_2(tmp_path, ref_cap, ref_path, case):
    opts, pattern, needle = FAIL_CLOSED[case]
    opts = dict(opts)
    after = opts.pop("after", None)
    sharding = opts.pop("sharding", {MLP1: {"kind": "column"}})
    got, paths = write_ranks(tmp_path, ref_cap, 2, sharding, **opts)
    if after is not None:
        after(paths)
    pattern = str(tmp_path / "nothing-rank*.h5") if pattern else got
    with pytest.raises(InputError, match=None) as exc:
        diff_sharded(ref_path, pattern)
    assert needle in str(exc.value) and "\n" not in str(exc.value)
    code, out = _cli(ref_path, pattern)
    assert code == 2, out
    assert needle in " ".join(out.split()) and "Traceback" not in out
    assert len([line for line in out.strip().splitlines() if line.strip()]) == 1, out


def _bf16(x: np.ndarray) -> np.ndarray:
    """float -> bfloat16 bits, rounded to nearest even (how parity stores bfloat16)."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def test_bfloat16_partial_sums_are_summed_and_stored_as_bfloat16(tmp_path, ref_cap):
    world = 4
    as_bf16 = Capture([Tap(t.info, t.order, _bf16(t.array), "bfloat16", t.layout) for t in ref_cap.taps],
                      ref_cap.layouts, {**ref_cap.meta, "dtype": "bfloat16"})
    ref_path = write_dump(tmp_path / "ref.h5", as_bf16)
    spec = {"kind": "partial"}
    shards = {t.key: [_bf16(p) for p in split(t.array, spec, world)] for t in ref_cap.taps}
    pattern, _ = write_ranks(tmp_path, as_bf16, world, {"toy.*": spec},
                             tamper=lambda rank, key, shard: shards[key][rank])
    report = diff_sharded(ref_path, pattern)
    assert report.passed, [(r.key, r.reason) for r in report.rows]
    assert {r.cand_dtype for r in report.rows} == {"bfloat16"}


def test_tap_selection_applies(tmp_path, ref_cap, ref_path):
    pattern, _ = write_ranks(tmp_path, ref_cap, 2, SPECS["mixed"])
    report = diff_sharded(ref_path, pattern, taps="toy.1.*")
    assert report.passed and [r.key for r in report.rows] == [NORM1, MLP1]


def test_an_incomplete_rank_is_refused_unless_allowed(tmp_path, ref_cap, ref_path):
    from parity.dump.reader import read_dump
    from parity.dump.writer import DumpWriter

    pattern, paths = write_ranks(tmp_path, ref_cap, 2, SPECS["mixed"])
    # rewrite rank 1 with its first two taps only, interrupted

    cap = read_dump(paths[1])
    writer = DumpWriter(paths[1] + ".new", cap.meta)
    for name, layout in cap.layouts.items():
        writer.add_layout(name, layout)
    for tap in cap.taps[:2]:
        writer.add_tap(tap)
    writer.close(complete=False)
    os.replace(paths[1] + ".new", paths[1])
    with pytest.raises(InputError, match="capture is incomplete"):
        diff_sharded(ref_path, pattern)
    report = diff_sharded(ref_path, pattern, allow_incomplete=True)
    assert not report.passed
    assert [r.status for r in report.rows] == ["pass", "pass", "missing", "missing"]
    assert any("incomplete" in p for p in report.problems)


def test_the_module_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, parity.comparison.sharded; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("world", [2, 4])
def test_a_tensor_parallel_llama_split_by_hand(tmp_path, tiny_models, world):
    """A tiny hf Llama's real capture split as Megatron-style tensor parallelism would:
    q and the attention output by whole heads, k/v by kv heads (replicated when there are
    fewer kv heads than ranks), o_proj as real row-parallel partial sums (each rank's heads
    through its columns of W_o), the logits by vocabulary columns, the norms by sequence;
    then a missing all-reduce and stale weights on the last rank are planted."""
    import torch
    import transformers

    folder = tiny_models("llama")
    cap = capture_live(f"hf:{folder}", BackendOptions(batch=2))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    ref_path = write_dump(tmp_path / "ref.h5", cap)
    kv = {"kind": "heads", "heads": 2} if world == 2 else {"kind": "replicated"}
    sharding = {"decoder.*.q": {"kind": "heads", "heads": 4}, "decoder.*.attn": {"kind": "heads", "heads": 4},
                "decoder.*.[kv]": kv, "decoder.*.o_proj": {"kind": "partial"}, "output.logits": {"kind": "column"},
                "decoder.*_norm": {"kind": "sequence"}}
    by_key = cap.by_key()

    def row_parallel(layer: int, rank: int) -> np.ndarray:
        attn = by_key[f"decoder.{layer}.attn"].array
        w = model.model.layers[layer].self_attn.o_proj.weight.detach().double().numpy()
        cols = np.split(np.arange(attn.shape[-1]), world)[rank]
        return (attn[..., cols].astype(np.float64) @ w[:, cols].T).astype(np.float32)

    def real_partials(rank, key, shard, lost_at=None):
        if not key.endswith(".o_proj"):
            return shard
        layer = int(key.split(".")[1])
        if (layer, rank) == lost_at:
            return np.zeros_like(shard)
        return row_parallel(layer, rank)

    with torch.no_grad():
        pattern, _ = write_ranks(tmp_path, cap, world, sharding, tamper=real_partials, stem="ok")
        report = diff_sharded(ref_path, pattern)
        assert report.passed, [(r.key, r.reason) for r in report.rows if not r.passed]
        assert any("partial-sum taps" in w for w in report.warnings)

        pattern, _ = write_ranks(tmp_path, cap, world, sharding, stem="lost",
                                 tamper=lambda r, k, s: real_partials(r, k, s, lost_at=(1, world - 1)))
        report = diff_sharded(ref_path, pattern)
        assert report.first_divergence.key == "decoder.1.o_proj"
        assert [r.key for r in report.rows if not r.passed] == ["decoder.1.o_proj"]

    # stale weights on the last rank: a heads-split q shard from another seed's model
    other = capture_live(f"hf:{save_other(tmp_path, folder)}", BackendOptions(batch=2)).by_key()
    stale_q = split(other["decoder.2.q"].array, {"kind": "heads", "heads": 4}, world)[world - 1]
    pattern, _ = write_ranks(tmp_path, cap, world, sharding, stem="stale",
                             tamper=lambda r, k, s: stale_q if (r, k) == (world - 1, "decoder.2.q")
                             else real_partials(r, k, s))
    report = diff_sharded(ref_path, pattern)
    assert report.first_divergence.key == "decoder.2.q"
    line = next(w for w in report.warnings if "diverge" in w)
    assert line.startswith(f"rank {world - 1} of {world} diverges at decoder.2.q (cos "), line
    assert line.endswith(f"; ranks 0-{world - 2} match" if world > 2 else "; rank 0 matches"), line


def save_other(tmp_path, folder):
    """The same tiny Llama with weights from another seed (a rank that loaded stale weights)."""
    from hf_tiny import build  # tests/ is on the path (tests/conftest.py imports it the same way)

    out = tmp_path / "other"
    build("llama", seed=1).save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", ["partial", "replicated"])
def test_memory_does_not_grow_with_the_world_size(tmp_path, kind):
    """Partial sums and replicas are read one rank at a time: a 16-rank diff of one 4 MB
    tap peaks within a few taps of the 1-rank diff (holding every rank's copy would add 15)."""
    import tracemalloc

    from parity.taps.records import TapInfo

    rng = np.random.default_rng(0)
    full = rng.standard_normal((1, 128, 8192)).astype(np.float32)  # 4 MB
    info = TapInfo("big.0.mlp", "big", 0, "mlp")
    ref = write_dump(tmp_path / "ref.h5", Capture([Tap(info, 0, full, "float32")], {}, {"backend": "ref"}))
    spec = {"kind": kind}

    def peak(world: int) -> int:
        folder = tmp_path / f"w{world}"
        folder.mkdir()
        for rank, shard in enumerate(split(full, spec, world)):
            meta = {"backend": "tp", "rank": rank, "world_size": world, "sharding": {"big.*": spec}}
            write_dump(folder / f"cand-rank{rank}.h5", Capture([Tap(info, 0, shard, "float32")], {}, meta))
        tracemalloc.start()
        try:
            report = diff_sharded(ref, str(folder / "cand-rank*.h5"))
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            assert report.passed, [(r.key, r.reason) for r in report.rows]

    alone, sixteen = peak(1), peak(16)
    assert sixteen < alone + 4 * full.nbytes, f"{alone / 1e6:.0f} MB with 1 rank, {sixteen / 1e6:.0f} MB with 16"
