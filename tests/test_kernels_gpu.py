"""The Triton sparse-KD kernels on a CUDA GPU at full size, in bf16/fp16/fp32 (skipped without CUDA).

Covered: the kernel and the fused-linear loss, loss and gradient, against the float64 reference, in
bf16, fp16 and fp32, every cache mode (topk, ghost, sampled), temperature T = 1 and 2, a custom
ignore_index with an all-ignored batch and grad_output != 1, extreme logits, and V in {16000, 32000,
128256} plus an odd V (32003, not a multiple of any block size).

Tolerance (logitcache.kernels.testing.assert_within_naive): the truth is the float64 reference on
the same (already rounded) low-precision logits; the "naive" baseline is the fp32 reference whose
gradient is then rounded to the logits' dtype, i.e. the best any implementation that returns a
gradient in that dtype can do up to fp32 arithmetic. The kernel may be at most 2x as far from the
truth as that baseline, plus 8 fp32 ulps of the largest value. No timing here (benchmarks/ does it).

``LOGITCACHE_GPU_TESTS=tiny`` runs the same tests on the CPU under ``TRITON_INTERPRET=1`` at tiny
shapes (the dry run of scripts/gpu-check.sh does, so that this file cannot rot); the tests that
measure CUDA memory or compile for CUDA are skipped there.
"""

from __future__ import annotations

import os

import pytest
import torch

TINY = os.environ.get("LOGITCACHE_GPU_TESTS", "") == "tiny"
if TINY:
    # The Triton interpreter is chosen when triton is first imported: set it before anything does.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from logitcache.kernels import (  # noqa: E402 (after the interpreter switch)
    fused_linear_sparse_kd_loss,
    fused_linear_sparse_kd_loss_reference,
    sparse_kd_loss,
    sparse_kd_loss_reference,
)
from logitcache.kernels.testing import assert_within_naive, make_case  # noqa: E402

DEVICE = "cpu" if TINY else "cuda"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (TINY or torch.cuda.is_available()), reason="needs a CUDA GPU"),
]
needs_cuda = pytest.mark.skipif(TINY, reason="measures CUDA memory / compiles for CUDA: GPU run only")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
MODES = ["topk", "ghost", "sampled", "hybrid"]
TEMPERATURES = [1.0, 2.0]
# (N, V, k): the benchmark's V = 16000, V = 32000, Llama-3's V = 128256 (streamed in chunks), an odd V.
SHAPES = [(4096, 16000, 64), (1024, 32000, 64), (512, 128256, 64), (333, 32003, 100)]
# (N, H, V, k) of the fused-linear tests; the first is the one run in every dtype, mode and T.
FUSED_SHAPES = [(2048, 1024, 32003, 64), (2048, 512, 16000, 64), (512, 1024, 128256, 64)]
EXTREME_SHAPE = (1024, 16000, 64)
if TINY:  # one odd shape, not a multiple of any block size
    SHAPES = [(7, 300, 5)]
    FUSED_SHAPES = [(9, 16, 300, 5)]
    EXTREME_SHAPE = (7, 300, 5)


def _to_output_dtype(grad32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The naive baseline's rounding of an fp32 gradient to the output dtype: round to nearest, as a
    GPU store does; under the Triton interpreter (tiny mode) bf16 stores truncate the fp32 bits
    (seen here: 529 of 1024 random values differ from round-to-nearest, errors up to 1 ulp instead
    of 0.5), so the baseline truncates too. Without this the bound would be half what the
    interpreter can reach, whatever the kernel does."""
    if TINY and dtype == torch.bfloat16:
        bits = grad32.float().contiguous().view(torch.int32) & ~0xFFFF  # keep sign, exponent, 7 bits
        return bits.view(torch.float32).to(dtype)  # exact: the value is a bf16 value already
    return grad32.to(dtype)


def _check(case, dtype, *, grad_scale=1.0, **kwargs):
    logits = case.logits.to(dtype)  # the low-precision input every path sees
    # Three separate leaves: .float() of an fp32 tensor (.double() of fp64) is the same tensor, and a
    # shared leaf would accumulate the three gradients (or make a clone a non-leaf without .grad).
    exact_in = logits.double().clone().requires_grad_()
    exact = sparse_kd_loss_reference(exact_in, case.targets, case.ids, case.weights, case.tail, **kwargs)
    (exact * grad_scale).backward()
    naive_in = logits.float().clone().requires_grad_()
    tail32 = None if case.tail is None else case.tail.float()
    naive = sparse_kd_loss_reference(naive_in, case.targets, case.ids, case.weights.float(), tail32, **kwargs)
    (naive * grad_scale).backward()
    ours_in = logits.clone().requires_grad_()
    ours = sparse_kd_loss(
        ours_in, case.targets, case.ids, case.weights.float(), tail32, backend="triton", **kwargs
    )
    (ours * grad_scale).backward()
    assert ours_in.grad.dtype == dtype
    assert_within_naive(ours.detach(), exact.detach(), naive.detach(), "loss")
    assert_within_naive(ours_in.grad, exact_in.grad, _to_output_dtype(naive_in.grad, dtype), "grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", TEMPERATURES, ids=lambda t: f"T{t:g}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}V{}k{}".format(*s))
def test_triton_full_size(dtype, mode, temperature, shape):
    n, vocab, k = shape
    if mode == "sampled" and n > 1024:
        n = 1024  # the sampled-case builder loops over rows in Python
    case = make_case(n, vocab, k, mode, seed=1, device=DEVICE)
    _check(case, dtype, temperature=temperature)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["topk", "ghost"])
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "tv"])
def test_triton_divergences_full_size(dtype, mode, divergence):
    """Reverse KL, JSD and TV (the DIVERGENCE constexpr's other branches) at the odd full size."""
    n, vocab, k = SHAPES[-1]
    case = make_case(n, vocab, k, mode, seed=9, device=DEVICE)
    _check(case, dtype, temperature=2.0, divergence=divergence, jsd_beta=0.3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["topk", "ghost"])
def test_triton_custom_ignore_index_and_grad_output(dtype, mode):
    """ignore_index = -1 (not the default -100), every 3rd position ignored, grad_output = 0.75."""
    n, vocab, k = SHAPES[0]
    case = make_case(n, vocab, k, mode, seed=7, ignore_every=0, device=DEVICE)
    case.targets[::3] = -1
    _check(case, dtype, grad_scale=0.75, temperature=2.0, ignore_index=-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_triton_all_ignored(dtype, reduction):
    """Every position ignored: loss 0 (not NaN) and a zero gradient, whatever grad_output is."""
    n, vocab, k = SHAPES[0]
    case = make_case(n, vocab, k, "ghost", seed=8, device=DEVICE)
    case.targets[:] = -1
    logits = case.logits.to(dtype).requires_grad_()
    loss = sparse_kd_loss(
        logits,
        case.targets,
        case.ids,
        case.weights.float(),
        case.tail.float(),
        backend="triton",
        ignore_index=-1,
        reduction=reduction,
        temperature=2.0,
    )
    (loss * 3.0).backward()
    assert loss.item() == 0.0
    assert logits.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", TEMPERATURES, ids=lambda t: f"T{t:g}")
def test_triton_extreme_logits(dtype, temperature):
    n, vocab, k = EXTREME_SHAPE
    case = make_case(n, vocab, k, "ghost", seed=2, device=DEVICE)
    case.logits[:, ::3] = 1e4  # exact in bf16, fp16 and fp32
    case.logits[:, 1::3] = -1e4
    _check(case, dtype, temperature=temperature)


@needs_cuda
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


def _check_fused(shape, dtype, mode, temperature, seed):
    """Naive baseline here: the dense reference fed the same dtype (its logits are rounded to that
    dtype by the matmul, as ours are). Gradients are compared by relative Frobenius error, since ours
    accumulate grad_weight over chunks in the weight's dtype: ours <= 2x naive + 4 unit roundoffs."""
    n, hidden_size, vocab, k = shape
    case = make_case(n, vocab, k, mode, seed=seed, device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(seed + 1)
    hidden = torch.randn(n, hidden_size, generator=gen, device=DEVICE).to(dtype)  # (N, H)
    weight = (torch.randn(vocab, hidden_size, generator=gen, device=DEVICE) / hidden_size**0.5).to(
        dtype
    )  # (V, H)
    results = []
    for fn, work_dtype, extra in (
        (fused_linear_sparse_kd_loss_reference, torch.float64, {}),
        (fused_linear_sparse_kd_loss_reference, dtype, {}),
        (fused_linear_sparse_kd_loss, dtype, {"backend": "triton"}),
    ):
        h = hidden.to(work_dtype).clone().requires_grad_()  # a fresh leaf per implementation
        w = weight.to(work_dtype).clone().requires_grad_()
        weight_dtype = torch.float64 if work_dtype == torch.float64 else torch.float32
        loss = fn(
            h,
            w,
            case.targets,
            case.ids,
            case.weights.to(weight_dtype),
            None if case.tail is None else case.tail.to(weight_dtype),
            temperature=temperature,
            **extra,
        )
        (loss * 0.5).backward()  # grad_output != 1
        results.append((loss.detach(), h.grad, w.grad))
    exact, naive, ours = results
    assert_within_naive(ours[0], exact[0], naive[0], "loss")
    roundoff = torch.finfo(dtype).eps / 2
    for index, what in ((1, "grad_hidden"), (2, "grad_weight")):
        want = exact[index]
        rel_ours = float((ours[index].double() - want).norm() / want.norm())
        rel_naive = float((naive[index].double() - want).norm() / want.norm())
        assert rel_ours <= 2 * rel_naive + 4 * roundoff, f"{what}: {rel_ours:.3e} vs naive {rel_naive:.3e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", TEMPERATURES, ids=lambda t: f"T{t:g}")
def test_fused_linear_full_size(dtype, mode, temperature):
    _check_fused(FUSED_SHAPES[0], dtype, mode, temperature, seed=4)


@pytest.mark.parametrize("shape", FUSED_SHAPES[1:], ids=lambda s: "N{}H{}V{}k{}".format(*s))
def test_fused_linear_other_vocab_sizes(shape):
    _check_fused(shape, torch.bfloat16, "ghost", 2.0, seed=5)


@needs_cuda
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
