"""pytest-benchmark microbenchmarks of the DFA output head on the CPU.

    pytest bench/bench_dfa_head.py     (N=2048, d=768, V=50257, 12 points, error="hidden", float32)

Rows (okadfa.bench.common.make_dfa_head_step): the fused cpu dfa_head with seeded and with
stored feedback, and the unfused PyTorch head (N×V logits, F.cross_entropy, autograd,
then e B_pᵀ). `python -m okadfa.bench.report --only dfa_head` adds peak memory and writes JSON.
"""
import pytest
import torch

import okadfa
from okadfa.bench.common import DFA_HEAD_ROWS, DFA_HEAD_SHAPE, make_dfa_head_step


@pytest.mark.parametrize("name", DFA_HEAD_ROWS)
def test_dfa_head(benchmark, name):
    if name.startswith("cpu") and not okadfa.backends()["cpu"]["available"]:
        pytest.skip("native extension not built")
    benchmark.group = "dfa_head " + " ".join(f"{k}={v}" for k, v in DFA_HEAD_SHAPE.items())
    benchmark.extra_info.update(threads=torch.get_num_threads(), **DFA_HEAD_SHAPE)
    benchmark.pedantic(make_dfa_head_step(name, **DFA_HEAD_SHAPE), rounds=3, warmup_rounds=1)
