"""pytest-benchmark microbenchmarks of causal favor_attention on the CPU.

    pytest bench/bench_favor_attention.py            (B=1, H=8, M=256, D=64, float32)

okadfa/bench/report.py runs the full table (more T, peak memory, peers) and writes JSON.
"""
import pytest
import torch

from okadfa.bench.common import make_step, peers

BACKENDS = ["cpu", "reference", "sdpa"] + sorted(peers())


@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("T", [1024, 4096])
@pytest.mark.parametrize("name", BACKENDS)
def test_favor_attention(benchmark, name, T, passes):
    if name == "cpu" and not __import__("okadfa").backends()["cpu"]["available"]:
        pytest.skip("native extension not built")
    benchmark.group = f"T={T} {passes}"
    benchmark.extra_info.update(T=T, passes=passes, threads=torch.get_num_threads())
    benchmark.pedantic(make_step(name, T, passes), rounds=5, warmup_rounds=1)
