"""okadfa.kernels: the Triton kernels (the "triton" backend, DESIGN.md §2).

Importing this package registers the okadfa::triton_* custom ops
(torch.library.triton_op); okadfa.ops dispatches to them for backend="triton".
"""
# From the source tree's root this directory is also importable as a top-level `kernels`,
# the name of Hugging Face's kernel-hub package, which transformers probes by importing it.
# Imported under that name it does nothing: registering the ops a second time would drop
# their autograd.
if __name__ == "okadfa.kernels":
    from . import dfa_feedback, favor_attention  # noqa: F401
