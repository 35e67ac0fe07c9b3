"""The Triton sparse-KD kernels on a CUDA GPU at full size, in bf16/fp16/fp32 (skipped without CUDA).

Tolerance (logitcache.kernels.testing.assert_within_naive): the truth is the float64 reference on
the same (already rounded) low-precision logits; the "naive" baseline is the fp32 reference whose
gradient is then rounded to the logits' dtype, i.e. the best any implementation that returns a
gradient in that dtype can do up to fp32 arithmetic. The kernel may be at most 2x as far from the
truth as that baseline, plus 8 fp32 ulps of the largest value. No timing here (benchmarks/ does it).
"""

from __future__ import annotations

import pytest
import torch

from logitcache.kernels import (
    fused_linear_sparse_kd_loss,
    fused_linear_sparse_kd_loss_reference,
    sparse_kd_loss,
    sparse_kd_loss_reference,
)
from logitcache.kernels.testing import assert_within_naive, make_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (N, V, k): the benchmark's V = 16000, Llama-3's V = 128256 (streamed in chunks), an odd shape
SHAPES = [(4096, 16000, 64), (512, 128256, 64), (333, 32003, 100)]


def _check(case, dtype, **kwargs):
    logits = case.logits.to(dtype)  # the low-precision input every path sees
    exact_in = logits.double().requires_grad_()
    exact = sparse_kd_loss_reference(exact_in, case.targets, case.ids, case.weights, case.tail, **kwargs)
    exact.backward()
    naive_in = logits.float().requires_grad_()
    tail32 = None if case.tail is None else case.tail.float()
    naive = sparse_kd_loss_reference(naive_in, case.targets, case.ids, case.weights.float(), tail32, **kwargs)
    naive.backward()
    ours_in = logits.clone().requires_grad_()
    ours = sparse_kd_loss(
        ours_in, case.targets, case.ids, case.weights.float(), tail32, backend="triton", **kwargs
    )
    ours.backward()
    assert ours_in.grad.dtype == dtype
    assert_within_naive(ours.detach(), exact.detach(), naive.detach(), "loss")
    assert_within_naive(ours_in.grad, exact_in.grad, naive_in.grad.to(dtype), "grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["topk", "ghost", "sampled"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}V{}k{}".format(*s))
def test_triton_full_size(dtype, mode, shape):
    n, vocab, k = shape
    if mode == "sampled" and n > 1024:
        n = 1024  # the sampled-case builder loops over rows in Python
    case = make_case(n, vocab, k, mode, seed=1, device="cuda")
    _check(case, dtype, temperature=2.0 if mode != "topk" else 1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_triton_extreme_logits(dtype):
    case = make_case(1024, 16000, 64, "ghost", seed=2, device="cuda")
    case.logits[:, ::3] = 1e4
    case.logits[:, 1::3] = -1e4
    _check(case, dtype, temperature=2.0)


def test_inplace_gradient_needs_only_a_small_block():
    """inplace_grad=True: the forward (where the gradient is produced) needs O(N * k) extra memory,
    not O(N * V). (Backward hands the same buffer to autograd.)"""
    case = make_case(4096, 16000, 64, "ghost", seed=3, device="cuda")
    logits = case.logits.to(torch.bfloat16).requires_grad_()
    ids, weights, tail = case.ids, case.weights.float(), case.tail.float()
    del case
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = sparse_kd_loss(
        logits,
        torch.zeros(4096, dtype=torch.long, device="cuda"),
        ids,
        weights,
        tail,
        backend="triton",
        inplace_grad=True,
    )
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    loss.backward()
    assert extra <= 4096 * 64 * 8 * 4 + (1 << 20), f"extra {extra} bytes"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fused_linear_full_size(dtype):
    """Naive baseline here: the dense reference fed the same dtype (its logits are rounded to that
    dtype by the matmul, as ours are). Gradients are compared by relative Frobenius error, since ours
    accumulate grad_weight over chunks in the weight's dtype: ours <= 2x naive + 4 unit roundoffs."""
    n, hidden_size, vocab, k = 2048, 1024, 32003, 64
    case = make_case(n, vocab, k, "ghost", seed=4, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(5)
    hidden = torch.randn(n, hidden_size, generator=gen, device="cuda").to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen, device="cuda") / hidden_size**0.5).to(dtype)
    results = []
    for fn, work_dtype, extra in (
        (fused_linear_sparse_kd_loss_reference, torch.float64, {}),
        (fused_linear_sparse_kd_loss_reference, dtype, {}),
        (fused_linear_sparse_kd_loss, dtype, {"backend": "triton"}),
    ):
        h = hidden.to(work_dtype).requires_grad_()
        w = weight.to(work_dtype).requires_grad_()
        weight_dtype = torch.float64 if work_dtype == torch.float64 else torch.float32
        loss = fn(
            h,
            w,
            case.targets,
            case.ids,
            case.weights.to(weight_dtype),
            case.tail.to(weight_dtype),
            temperature=2.0,
            **extra,
        )
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    exact, naive, ours = results
    assert_within_naive(ours[0], exact[0], naive[0], "loss")
    roundoff = torch.finfo(dtype).eps / 2
    for index, what in ((1, "grad_hidden"), (2, "grad_weight")):
        want = exact[index]
        rel_ours = float((ours[index].double() - want).norm() / want.norm())
        rel_naive = float((naive[index].double() - want).norm() / want.norm())
        assert rel_ours <= 2 * rel_naive + 4 * roundoff, f"{what}: {rel_ours:.3e} vs naive {rel_naive:.3e}"


def test_compiled_student_step_has_no_graph_break():
    case = make_case(256, 16000, 64, "topk", seed=6, device="cuda")
    weight = torch.randn(16000, 256, device="cuda", requires_grad=True)
    hidden = torch.randn(256, 256, device="cuda")

    def step(hidden, weight):
        return sparse_kd_loss(
            hidden @ weight.t(), case.targets, case.ids, case.weights.float(), temperature=2.0
        )

    torch.compile(step, fullgraph=True)(hidden, weight).backward()
    compiled = weight.grad.clone()
    weight.grad = None
    step(hidden, weight).backward()
    assert (compiled - weight.grad).abs().max().item() <= 1e-5 * weight.grad.abs().max().item() + 1e-7
