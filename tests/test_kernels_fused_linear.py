"""Fused linear + sparse-KD: both chunked backends (Triton in the interpreter on CPU, and the
closed-form torch backend) against the dense reference.

Tolerance: as in test_kernels.py, the fp32 path may be at most 2x as far from the float64 truth as
the fp32 dense reference is (plus 8 fp32 ulps of the largest value). The chunked path sums
grad_weight over chunks in a different order than one dense matmul, which stays within that bound.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # The Triton interpreter is chosen when triton is first imported: set it before anything does.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from logitcache.kernels import (
    BACKEND_ENV_VAR,
    fused_linear_sparse_kd_loss,
    fused_linear_sparse_kd_loss_reference,
)
from logitcache.kernels.errors import KernelError
from logitcache.kernels.fused_linear import default_chunk_size
from logitcache.kernels.testing import IGNORE, assert_within_naive, make_case


@pytest.fixture(autouse=True)
def _interpret_triton_on_cpu(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)


def _inputs(n, hidden_size, vocab, k, mode, seed):
    case = make_case(n, vocab, k, mode, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    hidden = torch.randn(n, hidden_size, generator=gen, dtype=torch.float64)  # (N, H)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) / hidden_size**0.5  # (V, H)
    return case, hidden, weight


def _run(fn, hidden, weight, case, dtype, grad_scale, **kwargs):
    hidden = hidden.detach().to(dtype).clone().requires_grad_()
    weight = weight.detach().to(dtype).clone().requires_grad_()
    tail = None if case.tail is None else case.tail.to(dtype)
    loss = fn(hidden, weight, case.targets, case.ids, case.weights.to(dtype), tail, **kwargs)
    (loss * grad_scale).backward()
    return loss.detach(), hidden.grad, weight.grad


BACKENDS = ["triton", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("mode", "temperature", "reduction", "chunk_size"),
    [
        ("topk", 1.0, "mean", 5),  # 33 rows in chunks of 5: a ragged last chunk
        ("ghost", 2.0, "batchmean-compat", 8),
        ("sampled", 2.0, "sum", None),  # default chunk size
    ],
)
def test_fused_linear_matches_dense_reference(backend, mode, temperature, reduction, chunk_size):
    case, hidden, weight = _inputs(33, 16, 100, 5, mode, seed=20)
    kwargs = dict(temperature=temperature, reduction=reduction, ce_weight=0.3, kl_weight=0.7)
    exact = _run(fused_linear_sparse_kd_loss_reference, hidden, weight, case, torch.float64, 1.5, **kwargs)
    naive = _run(fused_linear_sparse_kd_loss_reference, hidden, weight, case, torch.float32, 1.5, **kwargs)
    ours = _run(
        fused_linear_sparse_kd_loss,
        hidden,
        weight,
        case,
        torch.float32,
        1.5,
        backend=backend,
        chunk_size=chunk_size,
        block_v=32,
        **kwargs,
    )
    for what, got, want, base in zip(("loss", "grad_hidden", "grad_weight"), ours, exact, naive, strict=True):
        assert_within_naive(got, want, base, what)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_three_dim_hidden_and_all_ignored(backend):
    case, hidden, weight = _inputs(6, 8, 17, 3, "ghost", seed=21)
    hidden_3d = hidden.reshape(2, 3, 8).float().requires_grad_()
    weight = weight.float().requires_grad_()
    targets = torch.full((2, 3), IGNORE)
    loss = fused_linear_sparse_kd_loss(
        hidden_3d,
        weight,
        targets,
        case.ids.reshape(2, 3, 3),
        case.weights.reshape(2, 3, 3).float(),
        case.tail.reshape(2, 3).float(),
        backend=backend,
        chunk_size=4,
    )
    loss.backward()
    assert loss.item() == 0.0
    assert hidden_3d.grad.abs().max().item() == 0.0 and weight.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_under_torch_compile_has_no_graph_break(backend):
    case, hidden, weight = _inputs(7, 8, 17, 3, "topk", seed=22)
    hidden = hidden.float()
    weight = weight.float().requires_grad_()

    def step(hidden, weight):
        return fused_linear_sparse_kd_loss(
            hidden,
            weight,
            case.targets,
            case.ids,
            case.weights.float(),
            temperature=2.0,
            backend=backend,
            chunk_size=4,
        )

    torch.compile(step, fullgraph=True, backend="aot_eager")(hidden, weight).backward()
    compiled_grad = weight.grad.clone()
    weight.grad = None
    step(hidden, weight).backward()
    assert (compiled_grad - weight.grad).abs().max().item() <= 1e-6


def test_default_chunk_size_follows_hidden_to_vocab_ratio():
    assert default_chunk_size(16384, 1024, 128256) == 256  # logits chunk ~ the size of hidden
    assert default_chunk_size(7, 64, 17) == 7  # never more than N
    assert default_chunk_size(1, 8, 100000) == 1
    # torch backend (CPU): at least 2**21 logits per chunk, so per-chunk op overhead stays small
    assert default_chunk_size(2016, 96, 4096, "torch") == 512
    assert default_chunk_size(16384, 1024, 128256) == default_chunk_size(16384, 1024, 128256, "torch")


@pytest.mark.parametrize("mode", ["topk", "ghost", "sampled"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_linear_torch_backend_float64_matches_reference(mode, temperature):
    """float64: exact formulas on both sides, so 1e-10 (see test_kernels.py)."""
    case, hidden, weight = _inputs(33, 16, 100, 5, mode, seed=24)
    kwargs = dict(temperature=temperature, ce_weight=0.3, kl_weight=0.7)
    want = _run(fused_linear_sparse_kd_loss_reference, hidden, weight, case, torch.float64, 0.5, **kwargs)
    got = _run(
        fused_linear_sparse_kd_loss, hidden, weight, case, torch.float64, 0.5, backend="torch", chunk_size=7,
        **kwargs,
    )  # fmt: skip
    for g, w in zip(got, want, strict=True):
        assert float((g - w).abs().max()) <= 1e-10


def test_fused_linear_torch_backend_recomputes_underflowing_rows():
    """A chunk row whose outside mass underflows is recomputed from hidden @ weight.T in log space."""
    case, hidden, weight = _inputs(6, 4, 20, 19, "ghost", seed=25)
    weight = torch.zeros_like(weight)
    weight[:, 0] = -1e4
    weight[case.ids[1], 0] = 1e4  # row 1: only its one outside id is far below the rest
    hidden = torch.zeros_like(hidden)
    hidden[:, 0] = 1.0
    want = _run(fused_linear_sparse_kd_loss_reference, hidden, weight, case, torch.float64, 1.0)
    got = _run(
        fused_linear_sparse_kd_loss, hidden, weight, case, torch.float64, 1.0, backend="torch", chunk_size=4
    )
    assert torch.isfinite(want[0])
    for g, w in zip(got, want, strict=True):
        assert float((g - w).abs().max()) <= 1e-10 * max(1.0, float(w.abs().max()))


def test_fused_linear_shape_errors():
    case, hidden, weight = _inputs(4, 8, 17, 3, "topk", seed=23)
    with pytest.raises(KernelError):
        fused_linear_sparse_kd_loss(hidden, weight[:, :4], case.targets, case.ids, case.weights)
    with pytest.raises(KernelError):
        fused_linear_sparse_kd_loss(hidden, weight.float(), case.targets, case.ids, case.weights)
