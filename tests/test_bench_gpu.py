"""okadfa.bench.gpu (the GPU benchmark suite) runs end to end; here on the CPU at tiny sizes."""
import json

import okadfa


def test_gpu_suite_harness_on_cpu(tmp_path, monkeypatch):
    from okadfa.bench import gpu

    monkeypatch.setattr(gpu, "HEADS", 2)
    monkeypatch.setattr(gpu, "INPUT_SETS", 2)
    gpu.main(["--device", "cpu", "--quick", "--max-t", "64", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "cpu_kernels_quick.json").read_text())
    assert data["meta"]["dtype"] == "bfloat16" and "date" in data["meta"]
    names = {r["backend"] for r in data["attention"]}
    assert "sdpa" in names and ("cpu" in names) == okadfa.backends()["cpu"]["available"]
    for r in data["attention"]:
        assert r["T"] == 64 and r["median_ms"] > 0 and r["peak_mb"] >= 0
    fused, unfused = data["dfa_head"]
    assert fused["median_ms"] > 0 and unfused["peak_mb"] > fused["peak_mb"]
    assert "fused/unfused" in (tmp_path / "cpu_kernels_quick.md").read_text()


def test_gpu_timing_takes_the_spread_from_do_bench(monkeypatch):
    """On a GPU the row's median and IQR come from triton's per-call CUDA-event times (ms)."""
    import pytest
    import torch

    testing = pytest.importorskip("triton.testing")
    from okadfa.bench import gpu

    monkeypatch.setattr(testing, "do_bench", lambda fn, **kw: [1.0, 2.0, 3.0, 4.0, 10.0] if kw["return_mode"] == "all"
                        else None)
    row = gpu._timing(lambda: None, torch.device("cuda"))
    assert row == dict(median_ms=pytest.approx(3.0), iqr_ms=pytest.approx(2.0), runs=5, noisy=True)
