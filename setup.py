"""Build okadfa and its native extension okadfa._C.

The CPU kernels (csrc/*.cpp) are always built. The CUDA fallback (csrc/cuda/: the
torch-free kernels *.cu and the torch binding bindings.cpp) is added when a CUDA
toolkit (nvcc, CUDA_HOME) and a CUDA build of torch are both present, or when
OKADFA_FORCE_CUDA=1. Knobs (all optional):

  OKADFA_FORCE_CUDA=1      build the CUDA kernels even if no GPU torch is detected
  OKADFA_SKIP_CUDA=1       never build the CUDA kernels
  OKADFA_CUDA_ARCHS="9.0"  architectures for nvcc, e.g. "8.0;9.0" or "8.0 9.0+PTX"
                           (sets TORCH_CUDA_ARCH_LIST; default: torch's choice, i.e.
                           the visible GPUs, or all archs of the toolkit without one)
  DEBUG=1                  -O0 -g instead of -O3

No --use_fast_math: the seeded DFA feedback (csrc/philox.h) goes through logf/cosf
and must match the reference to a few float32 ulps.

Build with the installed torch: `pip install --no-build-isolation -e .`
"""
import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda():
    if _flag("OKADFA_SKIP_CUDA"):
        return False
    if _flag("OKADFA_FORCE_CUDA"):
        return True
    return CUDA_HOME is not None and torch.version.cuda is not None


def _extension():
    debug = _flag("DEBUG")
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-std=c++17", "-fopenmp", "-DOKADFA_EXTENSION"]
    sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_kernels = sorted(glob.glob("csrc/cuda/*.cu"))
    cuda_bindings = sorted(glob.glob("csrc/cuda/*.cpp"))   # include torch's CUDA headers: CUDA builds only
    if _want_cuda() and cuda_kernels:
        if os.environ.get("OKADFA_CUDA_ARCHS"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ["OKADFA_CUDA_ARCHS"]
        nvcc = ["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]
        nvcc += ["-std=c++17", "-DOKADFA_EXTENSION"]
        return CUDAExtension(
            "okadfa._C",
            sources + cuda_bindings + cuda_kernels,
            extra_compile_args={"cxx": cxx + ["-DOKADFA_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("okadfa._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


setup(
    packages=["okadfa", "okadfa.ops", "okadfa.reference", "okadfa.kernels"],
    package_dir={"okadfa.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
