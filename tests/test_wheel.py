"""The wheel: `pip wheel --no-build-isolation --no-deps` builds a platform wheel with
okadfa._C, the Triton kernels (okadfa.kernels) and every subpackage; installed into a fresh
virtualenv next to the same torch it imports from that virtualenv and runs the ops on every
available backend.

Slow: on 2 cores about 50 s, nearly all of it compiling the extension (the virtualenv gets
torch meanwhile); deselect with `-m "not wheel"`. Needs network or a local mirror: torch and
its dependencies are installed into the fresh virtualenv from the package index pip is
configured with (PyPI; find-links such as a local torch CPU wheel are preferred).
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.wheel

REPO = Path(__file__).resolve().parents[1]

# without git: not copied into the build tree (VCS data, environments, earlier build outputs)
_IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__",
                                 ".pytest_cache", ".benchmarks", "*.so", "*.o", "*.whl", ".whl", ".gl",
                                 "_build_info.py")

# runs in the fresh virtualenv, from a directory outside the source tree (python -I: no
# PYTHON* variables, no user site, no script directory on sys.path)
_SMOKE = r"""
import json, sys, sysconfig, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    import okadfa
from okadfa import _build_info

purelib, platlib = sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]
assert okadfa.__file__.startswith((purelib, platlib)), okadfa.__file__
status = okadfa.backends()
print(json.dumps(status, indent=1), file=sys.stderr)


def rel_rms(a, b):
    return ((a.double() - b.double()).pow(2).mean().sqrt() / b.double().pow(2).mean().sqrt()).item()


g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(2, 3, 50, 16, generator=g) for _ in range(3))
w = okadfa.random_features(32, 16, generator=g)
ref = okadfa.favor_attention(q, k, v, w, causal=True, backend="reference")
favor = {}
for name, st in status.items():
    if not st["available"] or name == "reference":
        continue
    dev = "cuda" if name == "cuda" or (name == "triton" and torch.cuda.is_available()) else "cpu"
    out = okadfa.favor_attention(*(x.to(dev) for x in (q, k, v, w)), causal=True, backend=name)
    favor[name] = rel_rms(out.cpu(), ref)

spec = okadfa.FeedbackSpec(4, 24, 10, seed=3)
e = torch.randn(7, 10, generator=g)
dfa_err = rel_rms(okadfa.dfa_feedback(e, spec, backend="cpu"), okadfa.dfa_feedback(e, spec, backend="reference"))

print(json.dumps({
    "file": okadfa.__file__, "backends": status, "favor": favor, "dfa_err": dfa_err,
    "build_torch": _build_info.TORCH_VERSION, "torch": torch.__version__,
    "okadfa_warnings": [str(w.message) for w in caught if "okadfa" in str(w.message)],
}))
"""


def _run(cmd, what, timeout, **kwargs):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, \
        f"{what} failed ({result.returncode}):\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    return result


def _torch_requirement():
    """The running torch's version without its local label: `torch==2.13.0` also matches a
    local 2.13.0+cpu build where pip's find-links or index has one (pip prefers it), while
    `torch==2.13.0+cpu` would not be found on PyPI. The C++ ABI is the version's."""
    return f"torch=={str(torch.__version__).split('+')[0]}"


def _copy_source(dst):
    """The source tree as a clone would have it, plus new files git does not ignore (no
    build outputs, no okadfa/_C*.so, no checkpoints); without git, a filtered copy."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=REPO, capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        shutil.copytree(REPO, dst, ignore=_IGNORE)
        return
    for rel in filter(None, listed.decode().split("\0")):
        path = REPO / rel
        if path.is_file():   # listed but deleted in the working tree: skipped
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dst / rel)


def _packages_in_source():
    """Dotted names of every package the wheel must carry: okadfa's subpackages (any folder
    under okadfa/ with an __init__.py, okadfa.kernels among them)."""
    names = set()
    for init in (REPO / "okadfa").rglob("__init__.py"):
        if "__pycache__" not in init.parts:
            names.add(".".join(init.parent.relative_to(REPO).parts))
    return names


def test_wheel_builds_installs_and_runs(tmp_path):
    if not (REPO / "setup.py").is_file() or not (REPO / "csrc").is_dir():
        pytest.skip(f"no source tree at {REPO} (okadfa is installed without its sources)")
    try:
        import ensurepip  # noqa: F401
        import venv  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"cannot create a virtualenv with this Python: {exc}")

    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "OKADFA_BACKEND", "PIP_REQUIRE_VIRTUALENV")}
    env["MAX_JOBS"] = env.get("MAX_JOBS") or "2"

    # The fresh virtualenv gets torch while the wheel compiles (pip downloads/unpacks vs the compiler).
    venv_dir = tmp_path / "venv"
    vpy = venv_dir / "bin" / "python"
    start = time.monotonic()
    q = shlex.quote
    setup_venv = subprocess.Popen(
        f"{q(sys.executable)} -m venv {q(str(venv_dir))} && "
        f"{q(str(vpy))} -m pip install -q --no-compile {q(_torch_requirement())}",
        shell=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # 1. build from a copy of the source tree: no build/ or egg-info in the checkout,
        #    no race with an in-place build, no stale okadfa/_C*.so picked up
        src, dist = tmp_path / "src", tmp_path / "dist"
        _copy_source(src)
        _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", str(dist), str(src)],
             "pip wheel", timeout=1800, env=env, cwd=tmp_path)
        print(f"wheel built after {time.monotonic() - start:.0f} s")
        wheels = list(dist.glob("okadfa-*.whl"))
        assert len(wheels) == 1, wheels
        wheel = wheels[0]

        # 2. a platform wheel for this interpreter
        abi = f"cp{sys.version_info.major}{sys.version_info.minor}"
        plat = sysconfig.get_platform().replace("-", "_").replace(".", "_")
        assert re.fullmatch(rf"okadfa-[^-]+-{abi}-{abi}-{re.escape(plat)}\.whl", wheel.name), \
            f"{wheel.name}: expected a {abi}-{abi}-{plat} wheel"
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
            meta = next(n for n in names if n.endswith(".dist-info/WHEEL"))
            assert "Root-Is-Purelib: false" in zf.read(meta).decode()
            metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
            license_file = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
            build_info = {}
            exec(zf.read("okadfa/_build_info.py").decode(), build_info)
        assert any(re.fullmatch(r"okadfa/_C\..*\.so", n) for n in names), sorted(names)
        assert build_info["TORCH_VERSION"] == torch.__version__
        assert build_info["TORCH_CUDA_VERSION"] == torch.version.cuda
        assert isinstance(build_info["WITH_CUDA"], bool)
        for package in _packages_in_source():
            assert package.replace(".", "/") + "/__init__.py" in names, f"{package} is missing from {wheel.name}"
        for folder, prefix in (("okadfa", "okadfa/"),):
            for py in (REPO / folder).rglob("*.py"):
                if "__pycache__" in py.parts or py.name == "_build_info.py":
                    continue
                arc = prefix + py.relative_to(REPO / folder).as_posix()
                assert arc in names, f"{arc} is missing from {wheel.name}"
        # the torch it was built against (its C++ ABI), and every runtime dependency, in the metadata
        series = ".".join(torch.__version__.split("+")[0].split(".")[:2])
        requires = set(re.findall(r"^Requires-Dist: ([^;\n]+)$", metadata, re.M))
        assert {f"torch=={series}.*", "numpy", "safetensors>=0.4"} <= requires, requires
        assert license_file and "License: MIT" in metadata, metadata[:600]
        stray = sorted(n for n in names if not n.startswith("okadfa/") and ".dist-info/" not in n)
        assert not stray, f"files outside okadfa/: {stray}"

        # 3. install it next to torch in the fresh virtualenv
        out, _ = setup_venv.communicate(timeout=1800)
        assert setup_venv.returncode == 0, \
            f"creating the virtualenv / installing {_torch_requirement()} failed:\n{out[-6000:]}"
        print(f"virtualenv with torch ready after {time.monotonic() - start:.0f} s")
        _run([str(vpy), "-m", "pip", "install", "-q", str(wheel)], "pip install (wheel, with its dependencies)",
             timeout=600, env=env, cwd=tmp_path)

        # 4. import it from there and run the ops
        run_dir = tmp_path / "elsewhere"
        run_dir.mkdir()
        result = _run([str(vpy), "-I", "-c", _SMOKE], "the smoke script in the fresh virtualenv", timeout=600,
                      env=env, cwd=run_dir)
        print(f"smoke test done after {time.monotonic() - start:.0f} s")

        # 5. the okadfa command trains from there (its runtime dependencies came with the wheel)
        (run_dir / "data").mkdir()
        (run_dir / "data" / "text.txt").write_text((REPO / "README.md").read_text()[:100_000])
        _run([str(venv_dir / "bin" / "okadfa"), "train", "--preset", "tiny", "--steps", "2", "--batch-size", "2",
              "--seq-len", "32", "--data", "data", "--out", "run", "--eval-every", "2", "--eval-batches", "1",
              "--sample-tokens", "4", "--no-progress"], "okadfa train in the fresh virtualenv", timeout=600,
             env=env, cwd=run_dir)
        assert (run_dir / "run" / "checkpoint.safetensors").is_file()
        compared = _run([str(venv_dir / "bin" / "okadfa"), "compare", "--variants", "favor+dfa,favor+bp", "--out", "cmp",
              "--preset", "tiny", "--set", "n_layers=1", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
              "--data", "data", "--eval-every", "2", "--eval-batches", "1", "--sample-tokens", "0"],
             "okadfa compare in the fresh virtualenv", timeout=600, env=env, cwd=run_dir)
        assert "| favor+dfa |" in (run_dir / "cmp" / "report.md").read_text()
        assert "no plots: matplotlib is not installed" in compared.stdout       # none in the fresh virtualenv
        # 6. and benchmarks (okadfa.bench ships in the wheel): the small DFA head section, no plots
        _run([str(venv_dir / "bin" / "okadfa"), "bench", "--device", "cpu", "--quick", "--only", "dfa_head",
              "--no-plots", "--out", "bench-out"], "okadfa bench in the fresh virtualenv", timeout=600, env=env,
             cwd=run_dir)
        assert (run_dir / "bench-out" / "cpu_dfa_head_quick.json").is_file()
    finally:
        if setup_venv.poll() is None:
            setup_venv.kill()
            setup_venv.wait()
        shutil.rmtree(venv_dir, ignore_errors=True)   # ~1 GB of torch: not kept among pytest's tmp dirs
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).resolve().is_relative_to(venv_dir.resolve()), report["file"]
    assert report["okadfa_warnings"] == [], report["okadfa_warnings"]
    assert report["build_torch"] == torch.__version__
    assert report["torch"].split("+")[0] == torch.__version__.split("+")[0], report["torch"]
    status = report["backends"]
    assert status["cpu"]["available"], status["cpu"]["reason"]
    ran = set(report["favor"])
    assert ran == {n for n, s in status.items() if s["available"] and n != "reference"}
    assert "cpu" in ran
    for name, err in report["favor"].items():
        assert err < (1e-4 if name == "triton" else 1e-5), f"favor_attention backend={name}: relative RMS {err:.3g}"
    assert report["dfa_err"] < 1e-6, report["dfa_err"]
