"""pytest-benchmark microbenchmarks of dfa_feedback on the CPU: every DFA signal g_p = e B_pᵀ.

    pytest bench/bench_dfa_feedback.py     (N=2048 rows, E=d=768, P=12 points, float32)

Rows: the native cpu op with seeded feedback (regenerated in the kernel, nothing stored) and
with stored feedback, and plain PyTorch on the stored tensor (torch.einsum, i.e. one batched
GEMM over the points: what one writes without the op).
"""
import pytest
import torch

import okadfa

SHAPE = dict(N=2048, E=768, P=12)
ROWS = ["cpu seeded", "cpu stored", "torch einsum"]


def make_feedback_step(name: str):
    N, E, P = SHAPE["N"], SHAPE["E"], SHAPE["P"]
    error = torch.randn(N, E, generator=torch.Generator().manual_seed(0))
    spec = okadfa.FeedbackSpec(P, E, E, seed=1)
    stored = okadfa.materialize_feedback(spec)
    if name == "cpu seeded":
        return lambda: okadfa.dfa_feedback(error, spec, backend="cpu")
    if name == "cpu stored":
        return lambda: okadfa.dfa_feedback(error, stored, backend="cpu")
    return lambda: torch.einsum("ne,pde->pnd", error, stored)


@pytest.mark.parametrize("name", ROWS)
def test_dfa_feedback(benchmark, name):
    if name.startswith("cpu") and not okadfa.backends()["cpu"]["available"]:
        pytest.skip("native extension not built")
    benchmark.group = "dfa_feedback " + " ".join(f"{k}={v}" for k, v in SHAPE.items())
    benchmark.extra_info.update(threads=torch.get_num_threads(), **SHAPE)
    benchmark.pedantic(make_feedback_step(name), rounds=3, warmup_rounds=1)
