"""pytest-benchmark microbenchmarks of dfa_feedback on the CPU: every DFA signal g_p = e B_pᵀ.

    pytest bench/bench_dfa_feedback.py     (N=2048 rows, E=d=768, P=12 points, float32 and bfloat16)

Rows: the native cpu op with seeded feedback (regenerated in the kernel, nothing stored) and
with stored feedback, and plain PyTorch on the stored tensor (torch.einsum, i.e. one batched
GEMM over the points: what one writes without the op), each with the error and the stored
matrices in float32 and in bfloat16.
"""
import pytest
import torch

import okadfa

SHAPE = dict(N=2048, E=768, P=12)
ROWS = ["cpu seeded", "cpu stored", "torch einsum"]


def make_feedback_step(name: str, dtype: torch.dtype = torch.float32):
    N, E, P = SHAPE["N"], SHAPE["E"], SHAPE["P"]
    error = torch.randn(N, E, generator=torch.Generator().manual_seed(0)).to(dtype)
    spec = okadfa.FeedbackSpec(P, E, E, seed=1)
    stored = okadfa.materialize_feedback(spec).to(dtype)
    if name == "cpu seeded":
        return lambda: okadfa.dfa_feedback(error, spec, backend="cpu")
    if name == "cpu stored":
        return lambda: okadfa.dfa_feedback(error, stored, backend="cpu")
    return lambda: torch.einsum("ne,pde->pnd", error, stored)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", ROWS)
def test_dfa_feedback(benchmark, name, dtype):
    if name.startswith("cpu") and not okadfa.backends()["cpu"]["available"]:
        pytest.skip("native extension not built")
    benchmark.group = f"dfa_feedback {dtype} " + " ".join(f"{k}={v}" for k, v in SHAPE.items())
    benchmark.extra_info.update(threads=torch.get_num_threads(), dtype=str(dtype), **SHAPE)
    benchmark.pedantic(make_feedback_step(name, dtype), rounds=3, warmup_rounds=1)
