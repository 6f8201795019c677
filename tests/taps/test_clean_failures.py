"""Failures a first-time user meets are one line and exit 2, before anything runs: a typo
in --cand or --inject, a factory that raises, a backend whose optional package is not
installed, a cosine bound that would pass anything."""
from __future__ import annotations

import sys
import types

import pytest
from typer.testing import CliRunner

from parity.api import backend_options, diff_live, list_backends
from parity.cli import app
from parity.errors import InputError


@pytest.fixture
def user_module(monkeypatch):
    """A user's module of factories, importable as `userfacs`."""
    mod = types.ModuleType("userfacs")
    built = []

    def never(opts):
        built.append("ref")
        raise AssertionError("the reference must not be built when the candidate's spec is wrong")

    def raises(opts):
        raise RuntimeError("boom in my factory\nsecond line")

    def needs(opts):
        raise AssertionError("a factory whose requirements are missing is never called")

    needs.requires = {"no_such_package_parity_test": "parity[hf]"}
    mod.never, mod.raises, mod.needs, mod.built = never, raises, needs, built
    monkeypatch.setitem(sys.modules, "userfacs", mod)
    return mod


def test_a_typo_in_the_candidate_or_its_faults_fails_before_the_reference_is_built(user_module):
    with pytest.raises(InputError, match="unknown backend 'flashh'"):
        diff_live("userfacs:never", "flashh", backend_options())
    with pytest.raises(InputError, match="unknown fault nomaskk; known: nomask"):
        diff_live("userfacs:never", "flash", backend_options(), faults=("nomaskk",))
    assert user_module.built == []


def test_a_factory_that_raises_is_one_line_and_exit_2(user_module):
    r = CliRunner().invoke(app, ["diff", "--ref", "pytorch", "--cand", "userfacs:raises"])
    assert r.exit_code == 2, r.output
    assert "its factory userfacs:raises raised RuntimeError: boom in my factory" in r.output
    assert "Traceback" not in r.output and "second line" not in r.output


def test_a_missing_optional_package_names_the_extra(user_module):
    r = CliRunner().invoke(app, ["diff", "--ref", "userfacs:needs", "--cand", "pytorch"])
    assert r.exit_code == 2, r.output
    assert "needs the Python package no_such_package_parity_test, which is not installed (pip install " \
           "'parity[hf]')" in r.output


def test_backends_listing_marks_a_backend_whose_package_is_missing(monkeypatch):
    import parity.taps.backends as backends

    real = backends.missing_requirements
    monkeypatch.setattr(backends, "missing_requirements",
                        lambda f: "needs the Python package transformers, which is not installed "
                                  "(pip install 'parity[hf]')" if getattr(f, "requires", None) else real(f))
    entry = next(b for b in list_backends().backends if b.name == "hf")
    assert entry.error and "parity[hf]" in entry.error


@pytest.mark.parametrize("value", ["-1", "-0.5"])
def test_a_cosine_bound_that_passes_anything_is_refused(value):
    r = CliRunner().invoke(app, ["diff", "--ref", "pytorch", "--cand", "flash", "--min-cos", value])
    assert r.exit_code == 2 and "is outside [0, 1]" in r.output, r.output


def test_a_missing_or_unreadable_file_beside_a_stats_dump_is_named_as_such(tmp_path):
    stats = tmp_path / "a_stats.h5"
    assert CliRunner().invoke(app, ["capture", "--backend", "pytorch", "--stats", "-o", str(stats)]).exit_code == 0
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not a dump")
    for other, words in ((tmp_path / "missing_stats.h5", "no such file"), (junk, "not an HDF5 file")):
        r = CliRunner().invoke(app, ["diff", str(stats), str(other)])
        assert r.exit_code == 2 and words in r.output and "a tensor dump" not in r.output, r.output
