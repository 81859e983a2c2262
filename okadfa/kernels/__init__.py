"""okadfa.kernels: the Triton kernels (the "triton" backend, docs/design.md §2), one module per op
(<op>.py registers okadfa::triton_<op>...) on shared kernels (chunked_attention.py for both
attention ops) and helpers (_utils.py).

Importing this package registers the okadfa::triton_* custom ops
(torch.library.triton_op); okadfa.ops gives them fake tensors and autograd and dispatches
to them for backend="triton".
"""
# From the source tree's root this directory is also importable as a top-level `kernels`,
# the name of Hugging Face's kernel-hub package, which transformers probes by importing it.
# Imported under that name it does nothing: registering the ops a second time would drop
# their autograd.
if __name__ == "okadfa.kernels":
    from . import dfa_feedback, dfa_head, favor_attention, linear_attention  # noqa: F401
