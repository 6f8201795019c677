"""Every shell block of README.md and docs/*.md runs as documented.

Conventions of the docs (this test enforces them):

* Shell examples are ```console blocks.  A line starting with `$ ` is a command; the lines
  after it, up to the next `$ ` line or the end of the block, are its output as shown.  A
  command line ending in a backslash continues on the next line.
* `# exit N` at the end of a command: it must exit with status N (default 0).
* `# not run: REASON` at the end of a command: set-up only (`make demo`, `make test`,
  `pip install`, `git clone`), GPU-only, or needing a file the repository does not hold;
  the test does not run it and asserts that REASON is given.  Every other command runs.
* Output shown is compared with the real output (stdout and stderr together): a line `...`
  stands for lines left out, a line ending in ` ...` for any line that starts with the text
  before it, every other line must appear, in this order, once runs of whitespace are
  collapsed.  Numbers with a decimal point or an exponent match within 2 %
  relative or 1e-6 absolute (another CPU's BLAS may round the last digits differently);
  everything else (names, statuses, integers, fingerprints) must match exactly.
* ```sh / ```bash / ```shell blocks are refused (write ```console), and so is any other
  block holding a `$ ` line or a line starting with `parity `: no command escapes the test.
  ```python blocks must compile and ```toml blocks must parse.

How it runs: each page in its own temporary directory that stands for the repository root
(examples/ is copied in, reports/ starts empty), its commands in order, with bash, the
venv's bin/ first on PATH and COLUMNS=120 (the docs show output at that width).  A page that
uses what the README's commands create says `<!-- docs-test: after README.md -->` and runs
after README.md, in a copy of the directory the README left.  A page may use what its own
earlier blocks created, never another page's files.  Pages run two at a time; each page is
one test.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
BIN = Path(sys.executable).parent
PAGES = sorted(p.name for p in DOCS.glob("*.md"))
COMMAND_TIMEOUT_S = 300
AFTER_README = "<!-- docs-test: after README.md -->"

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
EXIT = re.compile(r"\s+#\s*exit\s+(\d+)\s*$")
NOT_RUN = re.compile(r"\s+#\s*not run\b:?\s*(.*)$")
NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+(?=[eE]))(?:[eE][-+]?\d+)?(?![\w.])")


@dataclass
class Command:
    page: str
    line: int  # 1-based line of the `$ ` line in the page
    text: str
    exit: int
    not_run: str | None  # the reason, when the command is not run
    shown: list[str]  # output lines as the docs show them


def blocks(path: Path) -> list[tuple[str, str, int]]:
    """(language, body, line of the body's first line) of every fenced block."""
    text = path.read_text()
    return [(m.group(1).lower(), m.group(2), text.count("\n", 0, m.start(2)) + 1) for m in FENCE.finditer(text)]


def commands(path: Path) -> list[Command]:
    """The page's console commands in order; refuses shell blocks the test would not run."""
    out: list[Command] = []
    for lang, body, first in blocks(path):
        lines = body.splitlines()
        if lang in ("sh", "bash", "shell", "zsh", "shell-session"):
            raise AssertionError(f"{path.name}:{first}: a ```{lang} block; write shell examples as ```console")
        if lang == "python":
            compile(body, f"{path.name}:{first}", "exec")
        if lang == "toml":
            tomllib.loads(body)
        if lang != "console":
            for i, line in enumerate(lines):
                assert not line.startswith(("$ ", "parity ")), \
                    f"{path.name}:{first + i}: a command outside a ```console block (it would not be run)"
            continue
        i = 0
        assert lines and lines[0].startswith("$ "), f"{path.name}:{first}: a console block starts with a `$ ` line"
        while i < len(lines):
            start = i
            text = lines[i][2:]
            while text.endswith("\\"):
                i += 1
                text = text[:-1] + " " + lines[i].strip()
            i += 1
            shown = []
            while i < len(lines) and not lines[i].startswith("$ "):
                shown.append(lines[i])
                i += 1
            expected, reason = 0, None
            if m := NOT_RUN.search(text):
                reason = m.group(1).strip()
                text = text[:m.start()]
            elif m := EXIT.search(text):
                expected = int(m.group(1))
                text = text[:m.start()]
            out.append(Command(path.name, first + start, text.strip(), expected, reason, shown))
    return out


def normalise(line: str) -> str:
    return " ".join(line.split())


def tokens(line: str) -> list[str | float]:
    """Text and numbers (with a point or an exponent) of a normalised line, alternating."""
    parts: list[str | float] = []
    last = 0
    for m in NUMBER.finditer(line):
        parts += [line[last:m.start()], float(m.group())]
        last = m.end()
    return parts + [line[last:]]


def same_line(shown: str, real: str) -> bool:
    if shown.endswith(" ..."):
        shown, real = shown[:-4], real[:len(shown) - 4]
    a, b = tokens(shown), tokens(real)
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, str) or isinstance(y, str):
            if x != y:
                return False
        elif not math.isclose(x, y, rel_tol=0.02, abs_tol=1e-6):
            return False
    return True


def missing_output(shown: list[str], output: str) -> str | None:
    """The first shown line that does not appear (in order) in the output, or None."""
    real = [normalise(line) for line in output.splitlines()]
    at = 0
    for line in shown:
        want = normalise(line)
        if not want or want == "...":
            continue
        while at < len(real) and not same_line(want, real[at]):
            at += 1
        if at == len(real):
            return line
        at += 1
    return None


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", COLUMNS="120", LINES="50", PYTHONUNBUFFERED="1",
               TERM="dumb", NO_COLOR="1", VIRTUAL_ENV=str(BIN.parent))
    env.pop("PYTHONPATH", None)
    return env


def run_page(path: Path, workdir: Path) -> tuple[list[str], list[tuple[Command, str]]]:
    """Run a page's commands in workdir; (failures, [(command, output)])."""
    failures, ran = [], []
    env = environment()
    for cmd in commands(path):
        if cmd.not_run is not None:
            continue
        proc = subprocess.run(["bash", "-c", cmd.text], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=COMMAND_TIMEOUT_S)
        ran.append((cmd, proc.stdout))
        where = f"{cmd.page}:{cmd.line}: `{cmd.text}`"
        if proc.returncode != cmd.exit:
            failures.append(f"{where} exited {proc.returncode}, the docs say {cmd.exit}\n{proc.stdout[-3000:]}")
            break  # later blocks need what this one should have made
        if (line := missing_output(cmd.shown, proc.stdout)) is not None:
            failures.append(f"{where}: shown output line not in the real output:\n  {line}\n"
                            f"--- real output ---\n{proc.stdout[-6000:]}")
    return failures, ran


def fresh(workdir: Path) -> Path:
    """A directory standing for the repository root: examples/ and an empty reports/."""
    (workdir / "reports").mkdir(parents=True)
    shutil.copytree(ROOT / "examples", workdir / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    return workdir


def after_readme(page: str) -> bool:
    return AFTER_README in (DOCS / page).read_text()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """page -> Future of run_page: README.md and the independent pages start at once (two at a
    time), the pages marked AFTER_README once README.md is done, in a copy of its directory."""
    base = tmp_path_factory.mktemp("docs")
    readme_dir = fresh(base / "readme")
    pool = ThreadPoolExecutor(max_workers=2)
    runs = {"README.md": pool.submit(run_page, README, readme_dir), "dir": readme_dir}

    def after(page: str):
        failures, _ = runs["README.md"].result()
        if failures:
            return [f"{page} not run: README.md failed"], []
        workdir = base / page.removesuffix(".md")
        shutil.copytree(readme_dir, workdir, symlinks=True)
        return run_page(DOCS / page, workdir)

    for page in sorted(PAGES, key=after_readme):  # the independent pages first
        if after_readme(page):
            runs[page] = pool.submit(after, page)
        else:
            runs[page] = pool.submit(run_page, DOCS / page, fresh(base / page.removesuffix(".md")))
    yield runs
    pool.shutdown(cancel_futures=True)


def test_every_page_is_tested_and_follows_the_conventions():
    """Every page parses; every not-run command says why; the set-up commands are not run."""
    assert PAGES, "docs/ holds no pages"
    for path in [README] + [DOCS / p for p in PAGES]:
        for cmd in commands(path):
            where = f"{cmd.page}:{cmd.line}: `{cmd.text}`"
            if cmd.not_run is not None:
                assert cmd.not_run, f"{where}: `# not run` needs a reason"
            else:
                assert not re.match(r"(make|git clone|pip|python3? -m (venv|pip))\b", cmd.text), \
                    f"{where}: a set-up command cannot run inside the suite: mark it `# not run: REASON`"
    readme = {c.text: c for c in commands(README)}
    assert readme["make demo"].not_run and readme["make test"].not_run


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_pages_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists and, with
    #anchor, a heading of that file."""
    for path in [README] + [DOCS / p for p in PAGES]:
        text = FENCE.sub("", path.read_text())
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, frag = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            assert dest.exists(), f"{path.name}: link to {target}: no such file"
            if frag:
                headings = re.findall(r"^#+ (.+)$", FENCE.sub("", dest.read_text()), re.M)
                assert frag in {anchor(h) for h in headings}, f"{path.name}: link to {target}: no such heading"


def test_the_files_the_pages_name_exist():
    """Test modules and examples the pages point to (`tests/...py`, `examples/...py`) exist."""
    for path in [README] + [DOCS / p for p in PAGES]:
        for name in sorted(set(re.findall(r"(?<![\w/.])((?:tests|examples|bench|tools|probes|parity)/[\w/]+\.\w+)",
                                          path.read_text()))):
            assert (ROOT / name).exists(), f"{path.name} names {name}, which does not exist"


def test_the_backend_example_is_the_file_it_shows():
    """docs/backends.md shows examples/toy_backend.py whole; the two must not drift apart."""
    shown = [body for lang, body, _ in blocks(DOCS / "backends.md") if lang == "python"]
    assert (ROOT / "examples" / "toy_backend.py").read_text() in shown


def test_readme_runs_as_documented(workspace):
    failures, ran = workspace["README.md"].result()
    assert not failures, "\n\n".join(failures)
    assert ran, "README.md runs no command"
    # The main job is `make demo`'s command (plus --json), and it finds the planted bug.
    makefile = (ROOT / "Makefile").read_text()
    demo = re.search(r"\$\(PARITY\) (diff [^;]+);", makefile).group(1).strip()
    main = next(out for cmd, out in ran if cmd.text.startswith("parity " + demo))
    for needle in ("FIRST DIVERGENCE: prefix.0.attn", "INTRODUCED AT: prefix.0.attn",
                   "hint: attention ignores the padding/camera mask"):
        assert needle in main, needle
    assert (workspace["dir"] / "reports" / "nomask.html").is_file()


@pytest.mark.parametrize("page", PAGES)
def test_page_runs_as_documented(workspace, page):
    if page == "hf.md":
        pytest.importorskip("transformers")
    failures, _ = workspace[page].result()
    assert not failures, "\n\n".join(failures)


def test_hf_page_commands_run_as_documented(workspace):
    """The Hugging Face page: same exit codes, verdicts and input fingerprint as documented
    (the numbers themselves may move with the CPU's BLAS)."""
    pytest.importorskip("transformers")
    text = (DOCS / "hf.md").read_text()
    failures, ran = workspace["hf.md"].result()
    assert not failures, "\n\n".join(failures)
    hf = [(cmd, out) for cmd, out in ran if cmd.text.startswith("parity diff") and "hf:" in cmd.text]
    assert [cmd.exit for cmd, _ in hf] == [0, 1, 0], [cmd.text for cmd, _ in hf]  # eager vs sdpa, the bug, --decode
    outputs = "".join(out for _, out in ran)
    for needle in ("PASS: all 30 taps within calibrated budgets", "FIRST DIVERGENCE: decoder.1.mlp",
                   "stack decoder, layer 1, component mlp", "fingerprint b481dcb24f3637f6",
                   "wrote reports/tiny-bug.html", "wrote reports/tiny-bug.me.json"):
        assert needle in text and needle in outputs, needle


def test_the_comparison_rules_catch_what_they_must():
    """The matcher itself: gaps, order, number tolerance, exact text and integers."""
    out = "alpha 1.000000 ✓\n  beta   cos 0.874752 < 0.999\n413 taps: fail 321, pass 92\nfingerprint a30e4ac640eb464e"
    assert missing_output(["alpha 1.000000 ✓", "...", "413 taps: fail 321, pass 92"], out) is None
    assert missing_output(["beta cos 0.8748 < 0.999"], out) is None  # within 2 %
    assert missing_output(["beta cos 0.80 < 0.999"], out) is not None
    assert missing_output(["413 taps: fail 320, pass 93"], out) is not None  # integers exactly
    assert missing_output(["fingerprint a30e4ac640eb464f"], out) is not None
    assert missing_output(["beta cos ..."], out) is None  # a prefix
    assert missing_output(["beta cos 0.9 ..."], out) is not None
    assert missing_output(["413 taps: fail 321, pass 92", "alpha 1.000000 ✓"], out) is not None  # order
    cmds = commands_from("```console\n$ a --x   # exit 1\nout\n$ make demo   # not run: set-up\n```\n")
    assert [(c.text, c.exit, c.not_run, c.shown) for c in cmds] == [("a --x", 1, None, ["out"]),
                                                                   ("make demo", 0, "set-up", [])]
    with pytest.raises(AssertionError):
        commands_from("```bash\nparity diff\n```\n")
    with pytest.raises(AssertionError):
        commands_from("```\n$ parity diff\n```\n")


def commands_from(text: str) -> list[Command]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "page.md"
        path.write_text(text)
        return commands(path)
