"""Every code block of README.md runs, so the README cannot rot.

Python blocks run in order, each as written, in a temporary working directory. A block whose
first line is an import starts a fresh namespace; any other block continues the one before it,
as a reader continues a session (e.g. the key_mask example reuses the API tour's q, k, v, w).
Shell blocks are checked, not run (they build, train for minutes or install): every `make`
target exists in the Makefile, every `okadfa train` / `okadfa compare` / `okadfa bench` line parses with the
command's own parser, and every `python -m okadfa.bench.<script>` line parses with the script's parser, and every other
`python -m <module>` names a module that exists.
"""
import contextlib
import importlib.util
import io
import os
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = [(m.group(1), m.group(2), README.count("\n", 0, m.start()) + 1)
          for m in re.finditer(r"^```(\w*)\n(.*?)^```", README, re.S | re.M)]
PYTHON = [(code, line) for lang, code, line in BLOCKS if lang == "python"]
SHELL = [(code, line) for lang, code, line in BLOCKS if lang == "bash"]
NEEDS = {"transformers": "transformers", "Trainer": "accelerate"}    # optional packages a block may need


def test_the_readme_has_code_blocks():
    assert len(PYTHON) >= 10 and len(SHELL) >= 4, (len(PYTHON), len(SHELL))


def test_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = None
    for code, line in PYTHON:
        for word, package in NEEDS.items():
            if word in code and importlib.util.find_spec(package) is None:
                pytest.skip(f"README.md:{line} needs {package}")
        if namespace is None or re.match(r"(import|from) ", code):
            namespace = {"__name__": "__readme__"}
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"the code block at README.md:{line} raised {type(exc).__name__}: {exc}") from exc


def _commands(code):
    """The commands of a shell block, comments and line continuations removed."""
    for raw in code.replace("\\\n", " ").splitlines():
        words = shlex.split(raw, comments=True)
        if words:
            yield words


class _Parsed(Exception):
    """Raised in place of running a benchmark once its options have parsed."""


def _parse_bench_script(monkeypatch, module, argv, where):
    """`python -m okadfa.bench.<module> argv` parses with the script's own parser (made by
    okadfa.bench.common.script_parser), stopping before anything is measured."""
    from okadfa.bench import common
    mod = importlib.import_module(module)

    def parsing_only(*args, **kwargs):
        parser = common.script_parser(*args, **kwargs)
        parse = parser.parse_args

        def parse_then_stop(argv=None, namespace=None):
            parse(argv, namespace)
            raise _Parsed
        parser.parse_args = parse_then_stop
        return parser
    monkeypatch.setattr(mod, "script_parser", parsing_only)
    with pytest.raises(_Parsed):
        try:
            mod.main(argv)
        except SystemExit as exc:
            raise AssertionError(f"{where}: the options do not parse ({exc})") from exc


def test_shell_blocks_name_real_targets_options_and_modules(monkeypatch):
    from okadfa.bench import report
    from okadfa.training import cli, train
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    checked = 0
    for code, line in SHELL:
        for words in _commands(code):
            where = f"README.md:{line}: {' '.join(words)}"
            tool, rest = os.path.basename(words[0]), words[1:]
            if tool == "make":
                assert set(rest) <= targets, where
            elif tool == "okadfa" and "--help" in rest or rest[:1] == ["--version"]:
                with contextlib.redirect_stdout(io.StringIO()):
                    try:
                        status = cli.main(rest)
                    except SystemExit as exc:          # argparse's --help
                        status = exc.code
                assert status == 0, where
            elif tool == "okadfa" and rest[0] in ("train", "compare"):
                options = rest[1:]
                if rest[0] == "compare" and "--out" in options:     # compare's own --out; the rest is train's
                    i = options.index("--out")
                    options = options[:i] + options[i + 2:] + ["--out", "-"]
                train.parse_args(options)
            elif tool == "okadfa" and rest[0] == "bench":
                report.parse_args(rest[1:])
            elif "-m" in words:
                module = words[words.index("-m") + 1]
                if module.startswith("okadfa.bench."):
                    _parse_bench_script(monkeypatch, module, words[words.index("-m") + 2:], where)
                elif module not in ("venv", "pip", "build"):
                    assert importlib.util.find_spec(module) is not None, where
            else:
                continue
            checked += 1
    assert checked >= 8, checked


def _anchor(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def test_links_to_sections_and_files_resolve():
    """Every [..](#anchor) names a heading, every relative link a file, and the contents list every ## section."""
    anchors = {_anchor(t) for t in re.findall(r"^#+ (.+)$", README, re.M)}
    for target in re.findall(r"\]\(#([^)]+)\)", README):
        assert target in anchors, target
    for target in re.findall(r"\]\((?!#|https?:)([^)]+)\)", README):
        assert (ROOT / target).exists(), target
    contents = README[README.index("## Contents"):README.index("## Install")]
    for title in re.findall(r"^## (.+)$", README, re.M):
        assert title == "Contents" or f"(#{_anchor(title)})" in contents, title


def test_design_citations_name_the_file_and_an_existing_section():
    """The code cites the design as docs/design.md §N; the file and every cited section exist."""
    design = (ROOT / "docs" / "design.md").read_text()
    sections = set(re.findall(r"^## (\d+)\.", design, re.M))
    cited = 0
    for path in [*ROOT.glob("okadfa/**/*.py"), *ROOT.glob("csrc/**/*.[ch]*"), *ROOT.glob("tests/*.py")]:
        text = path.read_text(errors="replace")
        assert not re.search(r"(?<![/\w])DESIGN\.md", text), f"{path}: cite docs/design.md"
        for first, last in re.findall(r"docs/design\.md §(\d+)(?:[–-](\d+))?", text):
            assert {first, last or first} <= sections, f"{path}: docs/design.md §{first} does not exist"
            cited += 1
    assert cited >= 20, cited
