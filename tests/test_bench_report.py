"""The benchmark report runs end to end on tiny sizes and writes well-formed results."""
import json

import pytest

import okadfa

pytest.importorskip("bench.report")


def test_report_quick_run(tmp_path, monkeypatch):
    from bench import common, report

    monkeypatch.setattr(common, "H", 2)
    monkeypatch.setattr(report, "H", 2)
    report.main(["--quick", "--max-t", "256", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "cpu_favor_attention_quick.json").read_text())
    assert {"date", "torch", "threads", "matmul_gflops"} <= set(data["meta"])
    rows = data["rows"]
    assert {r["backend"] for r in rows} >= {"reference", "sdpa"}
    for r in rows:
        assert r["median_ms"] > 0 and r["peak_mb"] >= 0 and r["T"] == 256
    if okadfa.backends()["cpu"]["available"]:
        cpu = [r for r in rows if r["backend"] == "cpu"]
        assert {(r["passes"], r["M"]) for r in cpu} == {("fwd", 256), ("fwd+bwd", 256), ("fwd+bwd", 128)}
        assert all(r["gflops"] > 0 for r in cpu)
    assert "| 256 |" in (tmp_path / "cpu_favor_attention_quick.md").read_text()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("T,chunk", [(200, 64), (64, 64), (10, 4)])
def test_flop_count_matches_the_kernels_gemms(causal, T, chunk):
    """bench.common.chunked_flops against the GEMMs the cpu kernel actually ran."""
    import torch

    import okadfa
    from bench.common import chunked_flops

    if not okadfa.backends()["cpu"]["available"]:
        pytest.skip("native extension not built")
    from okadfa import _C

    B, H, M, Dk, Dv = 1, 3, 24, 8, 5
    q, k = torch.randn(2, B, H, T, Dk).unbind(0)
    v, w = torch.randn(B, H, T, Dv), okadfa.random_features(M, Dk)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # one task per head: no column split
    try:
        _C.gemm_flops(True)
        out, lognorm = torch.ops.okadfa.favor_attention_fwd(q, k, v, w, causal, 0.3, chunk)
        fwd = _C.gemm_flops(True)
        torch.ops.okadfa.favor_attention_bwd(torch.randn_like(out), q, k, v, w, out, lognorm, causal, 0.3, chunk, False)
        bwd = _C.gemm_flops(True)
    finally:
        torch.set_num_threads(threads)
    kw = dict(m=M, dk=Dk, dv=Dv, chunk=chunk, causal=causal, bh=B * H)
    assert fwd == chunked_flops(T, **kw)
    assert bwd == chunked_flops(T, backward=True, **kw)
