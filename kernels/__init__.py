"""logitcache.kernels: fused sparse-KD losses (Triton) and their plain-PyTorch references.

Public API:

- :func:`sparse_kd_loss` / :func:`sparse_kd_loss_reference` (logits in, loss out);
- :func:`dense_kd_loss` (a dense teacher: the online student's loss);
- :class:`SparseKDParams` (the options as one validated object; ``**params.keywords()``);
- :func:`fused_linear_sparse_kd_loss` / :func:`fused_linear_sparse_kd_loss_reference`
  (hidden states and output-projection weight in; the logits never exist at once).

The math is in :mod:`logitcache.kernels.sparse_kd`; backend choice in :mod:`logitcache.kernels._common`.
Backends: Triton (``_sparse_kd_triton.py``, CUDA) and the closed-form chunked torch backend
(``_sparse_kd_torch.py``, CPU and any device without Triton); the references are test oracles.
"""

from logitcache.kernels._common import BACKEND_ENV_VAR, REDUCTIONS, SparseKDParams, resolve_backend
from logitcache.kernels.errors import KernelError
from logitcache.kernels.fused_linear import (
    fused_linear_sparse_kd_loss,
    fused_linear_sparse_kd_loss_reference,
)
from logitcache.kernels.sparse_kd import (
    dense_kd_loss,
    sparse_kd_grad_reference,
    sparse_kd_loss,
    sparse_kd_loss_reference,
)

__all__ = [
    "BACKEND_ENV_VAR",
    "REDUCTIONS",
    "KernelError",
    "SparseKDParams",
    "dense_kd_loss",
    "fused_linear_sparse_kd_loss",
    "fused_linear_sparse_kd_loss_reference",
    "resolve_backend",
    "sparse_kd_grad_reference",
    "sparse_kd_loss",
    "sparse_kd_loss_reference",
]
