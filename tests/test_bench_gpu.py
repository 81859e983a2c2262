"""bench.gpu (the GPU benchmark suite) runs end to end; here on the CPU at tiny sizes."""
import json

import okadfa


def test_gpu_suite_harness_on_cpu(tmp_path, monkeypatch):
    from bench import gpu

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
