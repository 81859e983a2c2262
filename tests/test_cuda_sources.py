"""The CUDA fallback's sources (csrc/cuda/) without a GPU.

* The kernels (*.cu, *.cuh, launchers.h) are torch-free: `nvcc -c` compiles each
  .cu file on its own, here and in CI (skipped when nvcc is missing).
* Every op schema (csrc/registration.cpp) has a CUDA implementation (<op>_binding.cpp).
* The kernels' logic runs on the CPU: the .cu files are compiled as C++ with a small
  emulation of the CUDA subset they use (one std::thread per CUDA thread, barriers
  for __syncthreads and warp shuffles) and compared with okadfa.reference. This
  checks the algorithm, indexing and synchronisation structure, not GPU-specific
  behaviour (memory model, occupancy, device math accuracy); the backend-parametrized
  test files cover those on a GPU.
"""
import ctypes
import math
import os
import pathlib
import re
import shutil
import subprocess
import time

import pytest
import torch

from okadfa.reference.attention import favor_attention, linear_attention, random_features
from okadfa.feedback import FeedbackSpec, materialize_feedback

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
KERNELS = sorted(CUDA_DIR.glob("*.cu"))
NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")


def test_kernel_sources_exist():
    names = {p.name for p in KERNELS}
    assert {"chunked_attention.cu", "dfa_feedback.cu", "dfa_head.cu"} <= names, names
    for op in ("favor_attention", "linear_attention", "dfa_feedback", "dfa_head"):
        assert (CUDA_DIR / f"{op}_binding.cpp").is_file(), op


@pytest.mark.parametrize("path", [*KERNELS, *CUDA_DIR.glob("*.cuh"), CUDA_DIR / "launchers.h"],
                         ids=lambda p: p.name)
def test_kernels_are_torch_free(path):
    text = path.read_text()
    bad = re.findall(r'#\s*include\s*[<"](torch|ATen|c10|pybind11)/', text)
    assert not bad, f"{path.name} includes torch headers ({bad}); only the <op>_binding.cpp files and their headers may"


def test_every_schema_has_a_cuda_impl():
    # Ops with tensor arguments (those without one, such as seeded_feedback, dispatch on the CPU).
    text = re.sub(r'"\s*\n\s*"', "", (ROOT / "csrc" / "registration.cpp").read_text())   # join literals
    schemas = {name for name, args in re.findall(r'm\.def\(\s*"(\w+)\(([^)]*)\)', text) if "Tensor" in args}
    impls = {name for path in CUDA_DIR.glob("*_binding.cpp")
             for name in re.findall(r'm\.impl\(\s*"(\w+)"', path.read_text())}
    assert schemas, "no schemas found in csrc/registration.cpp"
    assert schemas <= impls, f"ops without a CUDA implementation in csrc/cuda/*_binding.cpp: {sorted(schemas - impls)}"


# Declarations that torch's ATen/cuda headers need from CUDA libraries the toolkit here may lack
# (cuBLAS, cuSPARSE, cuSOLVER) and torch's generated CUDA macros: enough to type-check the bindings.
CUDA_LIBRARY_STUBS = {
    "cusparse.h": "typedef struct cusparseContext* cusparseHandle_t; typedef int cusparseStatus_t;\n"
                  "const char* cusparseGetErrorString(cusparseStatus_t);",
    "cublas_v2.h": "typedef struct cublasContext* cublasHandle_t; typedef int cublasStatus_t;\n"
                   "const char* cublasGetStatusString(cublasStatus_t);",
    "cublasLt.h": "typedef struct cublasLtContext* cublasLtHandle_t;",
    "cusolverDn.h": "typedef struct cusolverDnContext* cusolverDnHandle_t;",
    "cusolver_common.h": "typedef int cusolverStatus_t;",
    "c10/cuda/impl/cuda_cmake_macros.h": "",
}


@pytest.mark.skipif(GXX is None, reason="g++ is not on PATH")
@pytest.mark.parametrize("path", sorted(CUDA_DIR.glob("*_binding.cpp")), ids=lambda p: p.name)
def test_bindings_type_check_against_torch_headers(path, tmp_path):
    # A CPU build of torch still ships ATen/cuda and c10/cuda headers: `g++ -fsyntax-only` checks
    # every binding's use of them and of ../checks.h, launchers.h, binding.h without a CUDA build.
    import sysconfig
    from torch.utils import cpp_extension
    homes = [os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, "/usr/local/cuda"]
    homes += [str(pathlib.Path(NVCC).resolve().parents[1])] if NVCC else []
    found = [pathlib.Path(h) / "include" for h in homes if h and (pathlib.Path(h) / "include" / "cuda_runtime_api.h").is_file()]
    if not found:
        pytest.skip("no CUDA toolkit headers (cuda_runtime_api.h)")
    cuda_include = found[0]
    torch_include = [pathlib.Path(p) for p in cpp_extension.include_paths()]
    if not any((p / "ATen" / "cuda" / "CUDAContext.h").is_file() for p in torch_include):
        pytest.skip("this torch ships no ATen/cuda headers")
    for name, text in CUDA_LIBRARY_STUBS.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("#pragma once\n" + text + "\n")
    cmd = [GXX, "-std=c++17", "-fsyntax-only", *(f"-I{p}" for p in torch_include),
           f"-I{sysconfig.get_paths()['include']}", f"-I{cuda_include}", f"-I{tmp_path}", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA sources cannot be compile-checked")
@pytest.mark.parametrize("path", KERNELS, ids=lambda p: p.name)
def test_nvcc_compiles(path, tmp_path):
    cmd = [NVCC, "-c", "-std=c++17", "-arch=sm_80", "-O1", str(path), "-o", str(tmp_path / (path.stem + ".o"))]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({time.monotonic() - start:.1f} s):\n{proc.stderr}"


# ---------------------------------------------------------------- host emulation of the kernels

EMULATION_HEADER = r"""
// Host emulation of the CUDA subset okadfa's kernels use (tests only).
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
typedef int cudaError_t;
enum { cudaSuccess = 0 };
typedef struct CUstream_st* cudaStream_t;
enum cudaMemcpyKind { cudaMemcpyDeviceToDevice = 3 };
inline cudaError_t cudaGetLastError() { return 0; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr) { std::memset(p, v, n); return 0; }
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind, cudaStream_t = nullptr) {
  std::memmove(d, s, n);
  return 0;
}
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
namespace emu {
struct Block {
  std::barrier<> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint64_t> xch;
  explicit Block(int n) : bar(n), xch(n) {
    for (int w = 0; w < n / 32; ++w) warps.emplace_back(new std::barrier<>(32));
  }
};
inline Block* cur = nullptr;
struct Cfg { dim3 g, b; };
inline Cfg cfg(dim3 g, dim3 b, size_t = 0, cudaStream_t = nullptr) { return {g, b}; }
template <class F, class... A>
void launch(Cfg c, F f, A... a) {   // blocks one after another, the threads of a block concurrently
  gridDim = c.g;
  blockDim = c.b;
  const int n = c.b.x;
  for (unsigned z = 0; z < c.g.z; ++z)
    for (unsigned y = 0; y < c.g.y; ++y)
      for (unsigned x = 0; x < c.g.x; ++x) {
        Block blk(n);
        cur = &blk;
        std::vector<std::thread> ts;
        for (int t = 0; t < n; ++t)
          ts.emplace_back([&, t] { threadIdx = dim3(t); blockIdx = dim3(x, y, z); f(a...); });
        for (auto& t : ts) t.join();
      }
}
template <class T>
T xchg(T v, int src) {
  const int warp = threadIdx.x / 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  cur->xch[threadIdx.x] = bits;
  cur->warps[warp]->arrive_and_wait();
  T r = v;
  if (src >= 0 && src < 32) std::memcpy(&r, &cur->xch[warp * 32 + src], sizeof(T));
  cur->warps[warp]->arrive_and_wait();
  return r;
}
}  // namespace emu
inline void __syncthreads() { emu::cur->bar.arrive_and_wait(); }
template <class T> T __shfl_xor_sync(unsigned, T v, int m) { return emu::xchg(v, int(threadIdx.x % 32) ^ m); }
template <class T> T __shfl_up_sync(unsigned, T v, int d) { return emu::xchg(v, int(threadIdx.x % 32) - d); }
template <class T> T __shfl_sync(unsigned, T v, int s) { return emu::xchg(v, s); }
template <class T> inline T max(T a, T b) { return a > b ? a : b; }
"""

EMULATION_SHIM = r"""
#include <vector>
#include "cuda/launchers.h"
using namespace okadfa::cuda;
extern "C" int attention(long bh, long tn, long dq, long m, long dv, int fused, int causal, double ss, long group,
                         const double* q, const double* k, const double* v, const double* w, const unsigned char* mask,
                         double* out, double* ln, const double* go, double* gq, double* gk, double* gv, double* gw) {
  AttentionShape s;
  s.bh = bh; s.tn = tn; s.dq = dq; s.m = m; s.dv = dv; s.fused = fused; s.causal = causal; s.sqrt_scale = ss;
  s.key_mask = mask;
  s.need_dw = fused;
  std::vector<double> ws(attention_workspace(s, true, group), 777.0);   // garbage: nothing may read it unwritten
  int rc = attention_forward<double>(s, q, k, v, w, out, ln, ws.data(), group, nullptr);
  if (rc) return rc;
  return attention_backward<double>(s, go, q, k, v, w, out, ln, gq, gk, gv, gw, ws.data(), group, nullptr);
}
extern "C" int project(const float* e, long rows, long E, const float* stored, long points, long dim,
                       unsigned long long seed, int dist, int shared, float* out, long out_stride) {
  return dfa_project<float>(e, rows, E, stored, points, dim, seed, dist, shared, out, out_stride, nullptr);
}
extern "C" int xent(double* y, long rows, long V, const long long* t, long ignore, const long long* nv, double* lr) {
  return softmax_xent<double>(y, rows, V, (const int64_t*)t, ignore, (const int64_t*)nv, lr, nullptr);
}
"""


def _emulated_sources(dest):
    """Copies of the CUDA sources with `k<<<cfg>>>(args)` rewritten as emu::launch(cfg, k, args)."""
    (dest / "cuda").mkdir(parents=True)
    shutil.copy(ROOT / "csrc" / "philox.h", dest / "philox.h")
    launch = re.compile(r"([\w:]+(?:<[^<>()]*>)?)<<<(.*?)>>>\(")
    for path in [*CUDA_DIR.glob("*.cu"), *CUDA_DIR.glob("*.cuh"), CUDA_DIR / "launchers.h"]:
        text = launch.sub(r"emu::launch(emu::cfg(\2), \1, ", path.read_text())
        assert "<<<" not in text, f"{path.name}: a launch the emulation cannot rewrite (keep `<<<...>>>(` on one line)"
        (dest / "cuda" / path.name).write_text(text)
    include = dest / "include"
    include.mkdir()
    for name in ("cuda_runtime.h", "cuda_runtime_api.h"):
        (include / name).write_text(EMULATION_HEADER)
    (dest / "shim.cpp").write_text(EMULATION_SHIM)
    return [dest / "cuda" / p.name for p in KERNELS] + [dest / "shim.cpp"]


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    if GXX is None:
        pytest.skip("g++ is not on PATH: the CUDA kernels cannot be emulated on the host")
    dest = tmp_path_factory.mktemp("cuda_emulation")
    sources = _emulated_sources(dest)
    lib = dest / "libokadfa_cuda_emulated.so"
    cmd = [GXX, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", f"-I{dest / 'include'}", f"-I{dest}",
           "-x", "c++", *map(str, sources), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "barrier" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("g++ lacks C++20 <barrier>, needed by the host emulation")
    assert proc.returncode == 0, f"compiling the emulated kernels failed:\n{proc.stderr}"
    return ctypes.CDLL(str(lib))


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def _rel(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-3)).item()


def _run_emulated(emulated, q, k, v, w, go, M, fused, causal, scale, key_mask=None):
    """The emulated CUDA forward and backward (heads in groups of 2): out, lognorm, dq, dk, dv, dw.
    key_mask: None or bool (B, H, T), True = a real key."""
    B, H, T, Dv = v.shape
    out, ln = torch.empty_like(v), torch.empty(B, H, T, dtype=torch.float64)
    gq, gk, gv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    gw = torch.full_like(w, 5.0) if fused else None
    rc = emulated.attention(ctypes.c_long(B * H), ctypes.c_long(T), ctypes.c_long(q.shape[-1]), ctypes.c_long(M),
                            ctypes.c_long(Dv), ctypes.c_int(fused), ctypes.c_int(causal),
                            ctypes.c_double(math.sqrt(scale) if fused else 1.0), ctypes.c_long(2),
                            _ptr(q), _ptr(k), _ptr(v), _ptr(w),
                            _ptr(None if key_mask is None else key_mask.contiguous()), _ptr(out), _ptr(ln), _ptr(go),
                            _ptr(gq), _ptr(gk), _ptr(gv), _ptr(gw))
    assert rc == 0
    return out, ln, gq, gk, gv, gw


@pytest.mark.parametrize("where", ["v", "k"])
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_emulated_causal_attention_keeps_non_finite_future_out_of_the_past(emulated, where, bad):
    """A NaN/Inf value or key at position 20 (inside the first chunk of 32) changes no output before it."""
    g = torch.Generator().manual_seed(2)
    B, H, T, Dk, M, Dv = 1, 2, 45, 6, 10, 4
    q, k = (torch.randn(B, H, T, Dk, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, H, T, Dv, generator=g, dtype=torch.float64)
    w = random_features(M, Dk, generator=g, dtype=torch.float64)
    go = torch.zeros_like(v)
    clean = _run_emulated(emulated, q, k, v, w, go, M, True, True, 0.4)[0]
    (v if where == "v" else k)[:, :, 20] = bad
    poisoned = _run_emulated(emulated, q, k, v, w, go, M, True, True, 0.4)[0]
    assert torch.equal(poisoned[:, :, :20], clean[:, :, :20])
    assert not torch.isfinite(poisoned[:, :, 20]).all()


@pytest.mark.parametrize("fused", [True, False], ids=["favor", "linear"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_emulated_attention_matches_reference(emulated, fused, causal):
    g = torch.Generator().manual_seed(1)
    B, H, T, Dk, M, Dv = 1, 3, 45, 6, 10, 4         # 2 chunks of 32 rows, the last one partial
    v = torch.randn(B, H, T, Dv, generator=g, dtype=torch.float64)
    if fused:
        q, k = (torch.randn(B, H, T, Dk, generator=g, dtype=torch.float64) * 1.5 for _ in range(2))
        w = random_features(M, Dk, generator=g, dtype=torch.float64)
        scale = 0.4
    else:
        q, k = (torch.rand(B, H, T, M, generator=g, dtype=torch.float64) + 0.05 for _ in range(2))
        w, scale = None, 1.0
    go = torch.randn(B, H, T, Dv, generator=g, dtype=torch.float64)
    out, ln, gq, gk, gv, gw = _run_emulated(emulated, q, k, v, w, go, M, fused, causal, scale)
    leaves = [x.clone().requires_grad_() for x in ((q, k, v, w) if fused else (q, k, v))]
    if fused:
        ref = favor_attention(*leaves, causal=causal, scale=scale)
    else:
        ref = linear_attention(*leaves, causal=causal)
    ref.backward(go)
    assert _rel(out, ref.detach()) < 1e-12
    for name, got, leaf in zip(("dq", "dk", "dv", "dw"), (gq, gk, gv, gw), leaves):
        assert _rel(got, leaf.grad) < 1e-11, name
    # lognorm is log Σ_s exp(lq_t)·exp(lk_s) (fused, without the 1/M and −‖q̂‖²/2 factors) or log Σ_s a_ts.
    if fused:
        s = math.sqrt(scale)
        lq = (q * s) @ w.T
        lk = (k * s) @ w.T - (k * k).sum(-1, keepdim=True) * scale / 2
        a = torch.einsum("bhtm,bhsm->bhts", lq.exp(), lk.exp())
    else:
        a = q @ k.transpose(-1, -2)
    a = a.tril() if causal else a
    assert _rel(ln, a.sum(-1).log()) < 1e-12


@pytest.mark.parametrize("fused", [True, False], ids=["favor", "linear"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_emulated_key_mask_matches_reference(emulated, fused, causal):
    """Left and right padding and a hole (a fully masked first chunk in one head): outputs and every
    gradient equal the reference's with the same key_mask; masked keys' NaN values and keys reach nothing."""
    g = torch.Generator().manual_seed(4)
    B, H, T, Dk, M, Dv = 1, 3, 45, 6, 10, 4
    v = torch.randn(B, H, T, Dv, generator=g, dtype=torch.float64)
    if fused:
        q, k = (torch.randn(B, H, T, Dk, generator=g, dtype=torch.float64) for _ in range(2))
        w = random_features(M, Dk, generator=g, dtype=torch.float64)
        scale = 0.4
    else:
        q, k = (torch.rand(B, H, T, M, generator=g, dtype=torch.float64) + 0.05 for _ in range(2))
        w, scale = None, 1.0
    mask = torch.ones(B, H, T, dtype=torch.bool)
    mask[0, 0, :35] = False                          # left padding past the first chunk of 32
    mask[0, 1, 40:] = False                          # right padding
    mask[0, 2, 10:13] = False                        # a hole
    go = torch.randn(B, H, T, Dv, generator=g, dtype=torch.float64)
    leaves = [x.clone().requires_grad_() for x in ((q, k, v, w) if fused else (q, k, v))]
    if fused:
        ref = favor_attention(*leaves, causal=causal, scale=scale, key_mask=mask)
    else:
        ref = linear_attention(*leaves, causal=causal, key_mask=mask)
    ref.backward(go)
    v_bad = v.clone()
    v_bad[~mask] = math.nan
    out, ln, gq, gk, gv, gw = _run_emulated(emulated, q, k, v_bad, w, go, M, fused, causal, scale, mask)
    assert _rel(out, ref.detach()) < 1e-12
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask])) and (ln[~mask] == -math.inf).all()
    for name, got, leaf in zip(("dq", "dk", "dv", "dw"), (gq, gk, gv, gw), leaves):
        assert _rel(got, leaf.grad) < 1e-11, name


@pytest.mark.parametrize("dist", ["normal", "uniform"])
@pytest.mark.parametrize("shared", [False, True], ids=["unshared", "shared"])
def test_emulated_feedback_projection(emulated, dist, shared):
    N, E, P, d = 7, 40, 3, 70                       # d spans two 64-column tiles, E three 16-deep steps
    e = torch.randn(N, E, generator=torch.Generator().manual_seed(2))
    spec = FeedbackSpec(P, d, E, seed=2**40 + 99, dist=dist, shared=shared)
    b = materialize_feedback(spec)
    expected = torch.einsum("ne,pde->pnd", e.double(), b.double())
    for stored in (None, b):
        out = torch.full((P, N, d), float("nan"))
        rc = emulated.project(_ptr(e), ctypes.c_long(N), ctypes.c_long(E), _ptr(stored), ctypes.c_long(P),
                              ctypes.c_long(d), ctypes.c_ulonglong(spec.seed), ctypes.c_int(dist == "uniform"),
                              ctypes.c_int(shared), _ptr(out), ctypes.c_long(N * d))
        assert rc == 0
        assert _rel(out.double(), expected) < 1e-5, "stored" if stored is not None else "seeded"


def test_emulated_softmax_cross_entropy(emulated):
    g = torch.Generator().manual_seed(3)
    n, V = 5, 300
    y = torch.randn(n, V, generator=g, dtype=torch.float64) * 3
    t = torch.tensor([4, -100, 299, 0, 17])
    nv = (t != -100).sum().reshape(1)
    dy, loss_rows = y.clone(), torch.empty(n, dtype=torch.float64)
    assert emulated.xent(_ptr(dy), ctypes.c_long(n), ctypes.c_long(V), _ptr(t), ctypes.c_long(-100), _ptr(nv),
                         _ptr(loss_rows)) == 0
    yy = y.clone().requires_grad_()
    loss = torch.nn.functional.cross_entropy(yy, t, ignore_index=-100)
    loss.backward()
    assert abs(loss_rows.sum().item() / nv.item() - loss.item()) < 1e-12
    assert loss_rows[1].item() == 0.0
    assert _rel(dy, yy.grad) < 1e-12
