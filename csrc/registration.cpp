// Schemas of the okadfa native ops. Implementations register per device in
// their own files (TORCH_LIBRARY_IMPL); autograd and fake tensors are
// registered from Python (okadfa/ops/).
#include <Python.h>
#include <torch/library.h>

#include "cpu_math.h"

TORCH_LIBRARY(okadfa, m) {
  // key_mask: None or bool (B, H, T), true = a real key (key padding; masked query rows are 0).
  m.def("favor_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor projection, Tensor? key_mask, bool causal, "
        "float scale, int chunk_size) -> (Tensor, Tensor)");
  m.def("favor_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor projection, Tensor out, "
        "Tensor lognorm, Tensor? key_mask, bool causal, float scale, int chunk_size, bool projection_grad) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_attention_fwd(Tensor q_feat, Tensor k_feat, Tensor v, Tensor? key_mask, bool causal, "
        "int chunk_size) -> (Tensor, Tensor)");
  m.def("linear_attention_bwd(Tensor grad_out, Tensor q_feat, Tensor k_feat, Tensor v, Tensor out, "
        "Tensor lognorm, Tensor? key_mask, bool causal, int chunk_size) -> (Tensor, Tensor, Tensor)");
  // DFA (docs/design.md §4). feedback: a stored (P, dim, E) tensor, or None for seeded
  // matrices (points, dim, seed = the uint64 seed's bits, dist 0 normal / 1 uniform,
  // shared); the other feedback arguments are ignored when it is stored.
  m.def("dfa_feedback(Tensor error, Tensor? feedback, int points, int dim, int seed, int dist, bool shared) "
        "-> Tensor");
  m.def("dfa_head(Tensor h, Tensor w_dec, Tensor targets, Tensor? feedback, int points, int dim, int seed, "
        "int dist, bool shared, int ignore_index, bool logits_error, int chunk_size) "
        "-> (Tensor loss, Tensor grad_h, Tensor grad_w_dec, Tensor signals)");
  // B_point (dim, error_dim), float32 on the CPU, as the CPU kernels generate it (diagnostics).
  m.def("seeded_feedback(int point, int dim, int error_dim, int seed, int dist) -> Tensor");
  // How the CPU kernels multiply matrices for inputs of a half dtype, in words (cpu_math.h).
  m.def("cpu_gemm_path(ScalarType dtype) -> str");
}

namespace {
std::string cpu_gemm_path(at::ScalarType dtype) { return okadfa::cpu::half_gemm_path(dtype).reason; }
}  // namespace

// No tensor arguments: the catch-all key.
TORCH_LIBRARY_IMPL(okadfa, CompositeExplicitAutograd, m) { m.impl("cpu_gemm_path", &cpu_gemm_path); }

// `import okadfa._C` loads this library and with it the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "okadfa native ops (see torch.ops.okadfa)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
