"""The benchmark harness, shipped with the package so that benchmarks run from an install
(`okadfa bench` is `python -m okadfa.bench.report`).

    report        microbenchmarks of this device (favor_attention against SDPA and the peers, the DFA head), JSON,
                  tables and plots (plots.py)
    model         the whole model: FAVOR+ against softmax, DFA against backprop, per precision
    decoding      token-by-token decoding: FavorState against a KV cache
    decoding_hf   the same through Hugging Face generate() on a random Llama
    profile_step  one training step under the profiler, attributed to its parts
    cpu_bf16      the bfloat16 CPU kernels against plain PyTorch
    approximation favor_sdpa's error against SDPA
    dfa_sweep     the learning-rate / warm-up measurements behind the DFA defaults (runs `okadfa train`)
    gpu           the GPU suite (triton and cuda backends against SDPA's flash kernel)
    common        what they share: inputs, timers with their spread, peak memory, FLOP counts, result files

The pytest-benchmark files (bench/bench_<op>.py) and the committed results (bench/results/) stay in the
source checkout. Nothing in okadfa outside this package imports it.
"""
