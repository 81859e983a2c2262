"""pytest-benchmark microbenchmarks of causal linear_attention on the CPU.

    pytest bench/bench_linear_attention.py       (B=1, H=8, M=64 elu+1 features, Dv=64, float32)

Rows: the native cpu kernel, the chunked reference (plain PyTorch, linear in T) and the plain
PyTorch O(T²) form (okadfa.reference.linear_attention_naive: the masked T×T weight matrix, what
one writes without a kernel). Forward and forward+backward, at T = 1024 and 4096.
"""
import pytest
import torch
import torch.nn.functional as F

import okadfa
from okadfa.reference import linear_attention_naive

SHAPE = dict(B=1, H=8, M=64, Dv=64)
ROWS = ["cpu", "reference", "naive"]


def make_linear_step(name: str, T: int, passes: str):
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(SHAPE["B"], SHAPE["H"], T, SHAPE["M"], generator=g) for _ in range(2))
    v = torch.randn(SHAPE["B"], SHAPE["H"], T, SHAPE["Dv"], generator=g)
    inputs = [x.requires_grad_(passes == "fwd+bwd") for x in (q, k, v)]

    def step():
        fq, fk = F.elu(inputs[0]) + 1, F.elu(inputs[1]) + 1
        if name == "naive":
            out = linear_attention_naive(fq, fk, inputs[2], causal=True)
        else:
            out = okadfa.linear_attention(fq, fk, inputs[2], causal=True, backend=name)
        if passes == "fwd+bwd":
            out.sum().backward()
        return out
    return step


@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("T", [1024, 4096])
@pytest.mark.parametrize("name", ROWS)
def test_linear_attention(benchmark, name, T, passes):
    if name == "cpu" and not okadfa.backends()["cpu"]["available"]:
        pytest.skip("native extension not built")
    benchmark.group = f"linear_attention T={T} {passes}"
    benchmark.extra_info.update(T=T, passes=passes, threads=torch.get_num_threads(), **SHAPE)
    benchmark.pedantic(make_linear_step(name, T, passes), rounds=5, warmup_rounds=1)
