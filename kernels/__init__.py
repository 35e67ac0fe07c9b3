"""logitcache.kernels: fused sparse-KD losses (Triton) and their plain-PyTorch references.

Public API:

- :func:`sparse_kd_loss` / :func:`sparse_kd_loss_reference` (logits in, loss out);
- :func:`fused_linear_sparse_kd_loss` / :func:`fused_linear_sparse_kd_loss_reference`
  (hidden states and output-projection weight in; the logits never exist at once).

The math is in :mod:`logitcache.kernels.sparse_kd`; backend choice in :mod:`logitcache.kernels._common`.
"""

from logitcache.kernels._common import BACKEND_ENV_VAR, resolve_backend
from logitcache.kernels.fused_linear import (
    fused_linear_sparse_kd_loss,
    fused_linear_sparse_kd_loss_reference,
)
from logitcache.kernels.sparse_kd import (
    sparse_kd_grad_reference,
    sparse_kd_loss,
    sparse_kd_loss_reference,
)

__all__ = [
    "BACKEND_ENV_VAR",
    "fused_linear_sparse_kd_loss",
    "fused_linear_sparse_kd_loss_reference",
    "resolve_backend",
    "sparse_kd_grad_reference",
    "sparse_kd_loss",
    "sparse_kd_loss_reference",
]
