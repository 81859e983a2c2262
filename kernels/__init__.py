"""okadfa.kernels: the Triton kernels (the "triton" backend, DESIGN.md §2).

Importing this package registers the okadfa::triton_* custom ops
(torch.library.triton_op); okadfa.ops dispatches to them for backend="triton".
"""
from . import dfa_feedback, favor_attention  # noqa: F401
