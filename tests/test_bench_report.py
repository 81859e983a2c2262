"""The benchmark report runs end to end on tiny sizes and writes well-formed results."""
import json

import pytest

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
    assert "| 256 |" in (tmp_path / "cpu_favor_attention_quick.md").read_text()


def test_flop_count_matches_hand_count():
    from bench.common import chunked_flops

    M, Dk, Dv, C = 8, 4, 3, 2
    W = Dv + 1
    per_chunk = 2 * (2 * C * M * Dk) + 2 * C * C * M + 2 * C * C * W + 2 * (2 * C * M * W)
    assert chunked_flops(2 * C, m=M, dk=Dk, dv=Dv, chunk=C, bh=1) == 2 * per_chunk
