"""The backend registry: spec grammar, entry points, argument checks, one-line errors."""
from __future__ import annotations

import pytest

from parity.taps.backends import BackendError, BackendOptions, BackendSpec, load_factory, registered, resolve

NAMES = {"pytorch", "hf"}


@pytest.mark.parametrize("text, target, arg, is_registered", [
    ("pytorch", "pytorch", None, True),
    ("hf:./m@attn=sdpa", "hf", "./m@attn=sdpa", True),
    ("hf:/abs/path:with:colons", "hf", "/abs/path:with:colons", True),
    ("hf:", "hf", "", True),
    ("pkg.mod:factory", "pkg.mod:factory", None, False),
    ("pkg.mod:factory:./m@x=1", "pkg.mod:factory", "./m@x=1", False),
])
def test_spec_grammar(text, target, arg, is_registered):
    spec = BackendSpec.parse(text, NAMES)
    assert (spec.target, spec.arg, spec.registered) == (target, arg, is_registered)


@pytest.mark.parametrize("text, needle", [
    ("", "empty backend spec"),
    ("nosuch", "unknown backend 'nosuch'"),
    (":factory", "bad backend spec"),
    ("pkg.mod:", "bad backend spec"),
])
def test_bad_specs(text, needle):
    with pytest.raises(BackendError, match=needle):
        BackendSpec.parse(text, NAMES)


def test_registered_scheme_wins_over_a_module_of_the_same_name():
    # `hf` is an entry point; `hf:x` must never be read as module `hf`, attribute `x`.
    assert BackendSpec.parse("hf:x").registered
    assert "hf" in registered() and {"pytorch", "flash", "flash_fp8", "fast"} <= set(registered())


def test_entry_point_factories_load():
    assert callable(load_factory("hf:anything")) and callable(load_factory("pytorch"))


def test_argument_must_fit_the_factory():
    with pytest.raises(BackendError, match="takes no argument"):
        resolve("pytorch:extra", BackendOptions())
    with pytest.raises(BackendError, match="needs an argument: hf:PATH"):
        resolve("hf", BackendOptions())


def echo_factory(options, arg=None):
    from parity.taps.backends import Backend
    from parity.taps.probe import Probe

    return Backend("echo", model=None, probe=Probe("none", ()), run=lambda: None, layouts=dict,
                   meta={"arg": arg, "seed": options.seed})


def test_module_factory_receives_its_argument():
    b = resolve(f"{__name__}:echo_factory:hello@x=1", BackendOptions(seed=3))
    assert b.meta == {"arg": "hello@x=1", "seed": 3, "backend": f"{__name__}:echo_factory:hello@x=1"}
    assert resolve(f"{__name__}:echo_factory", BackendOptions()).meta["arg"] is None


def test_missing_module_or_attribute_is_one_line():
    with pytest.raises(BackendError, match="cannot load backend factory 'no.such.module:f'"):
        resolve("no.such.module:f", BackendOptions())
    with pytest.raises(BackendError, match="cannot load backend factory"):
        resolve(f"{__name__}:no_such_factory", BackendOptions())


def raising_factory(options, arg):
    from parity.taps.backends import DetailedError

    raise (DetailedError if arg == "detailed" else ValueError)("title line\n  first detail\n  second detail")


def test_factory_errors_are_one_line_unless_laid_out_as_detail():
    """A foreign multi-line message is cut to its first line; a DetailedError (e.g. every
    problem of a checkpoint) is shown whole."""
    with pytest.raises(BackendError) as plain:
        resolve(f"{__name__}:raising_factory:plain", BackendOptions())
    assert str(plain.value).endswith(": title line")
    with pytest.raises(BackendError) as detailed:
        resolve(f"{__name__}:raising_factory:detailed", BackendOptions())
    assert str(detailed.value).endswith(": title line\n  first detail\n  second detail")


@pytest.mark.parametrize("kwargs", [dict(padding="middle"), dict(seq_len=0), dict(batch=0), dict(weights=" ")])
def test_options_validate_themselves(kwargs):
    with pytest.raises(ValueError):
        BackendOptions(**kwargs)


def test_options_from_what_a_user_gave():
    from pathlib import Path

    assert BackendOptions.given(seed=None, batch=None, device=None) == BackendOptions()
    opts = BackendOptions.given(seed=3, weights=Path("/ck/pt"), inputs=Path("ids.json"), padding=None)
    assert (opts.seed, opts.weights, opts.inputs, opts.padding) == (3, "/ck/pt", "ids.json", None)
    with pytest.raises(TypeError, match="unknown backend option 'colour'"):
        BackendOptions.given(colour="red")
    with pytest.raises(ValueError, match="batch must be >= 1"):
        BackendOptions.given(batch=0)
