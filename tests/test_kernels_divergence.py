"""Reverse KL, JSD and TV (``divergence=``): the reference against hand-computed values and
limits, every backend (torch, Triton in the interpreter on CPU, the fused-linear variant, the
dense online loss) against the reference, and the loss parts (mean CE, mean divergence).

Tolerances follow test_kernels.py: an fp32 backend may be at most 2x as far from the float64
reference as the fp32 reference is, plus 8 fp32 ulps of the largest value
(:func:`~logitcache.kernels.testing.assert_within_naive`); the torch backend in float64 is held to
1e-10 (exact formulas on O(1) sums of <= 64 terms: rounding ~1e-14, a wrong term >= 1e-4). The
Triton kernel computes in fp32 whatever the logits' dtype, so its float64 run gets the fp32 bound.
Hand-computed values: 1e-12 in float64 (a few O(1) logs).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # The Triton interpreter is chosen when triton is first imported: set it before anything does.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from logitcache.kernels import (
    BACKEND_ENV_VAR,
    SparseKDParams,
    dense_kd_loss,
    fused_linear_sparse_kd_loss,
    fused_linear_sparse_kd_loss_reference,
    sparse_kd_loss,
    sparse_kd_loss_reference,
)
from logitcache.kernels.errors import KernelError
from logitcache.kernels.testing import IGNORE, assert_within_naive, make_case

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "tv"]
TAILS = ["ghost", "topk"]  # topk = renormalised weights, no tail ("renormalize")
BACKENDS = ["triton", "torch"]


@pytest.fixture(autouse=True)
def _interpret_triton_on_cpu(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)


def _cast(case, dtype):
    tail = None if case.tail is None else case.tail.to(dtype)
    return case.logits.to(dtype), case.weights.to(dtype), tail


def _loss_and_grad(fn, case, dtype, *, grad_scale=0.75, **kwargs):
    logits, weights, tail = _cast(case, dtype)
    logits = logits.clone().requires_grad_()
    loss = fn(logits, case.targets, case.ids, weights, tail, **kwargs)
    (loss * grad_scale).backward()
    return loss.detach(), logits.grad


def _backend(name):
    def run(*args, **kwargs):
        return sparse_kd_loss(*args, backend=name, **kwargs)

    return run


# ---------------------------------------------------------------------------------------------
# The reference against hand-computed values (V = 3) and known limits
# ---------------------------------------------------------------------------------------------

# Student softmax(z) = (1/6, 2/6, 3/6); S = ids (2, 0).
Z = [0.0, math.log(2.0), math.log(3.0)]
Q = [1 / 6, 2 / 6, 3 / 6]


def _by_hand(divergence, p, q, beta=0.3):
    """D(p, q) over the listed outcomes, written out with math.log (no torch)."""
    if divergence == "forward_kl":
        return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)
    if divergence == "reverse_kl":
        return sum(b * math.log(b / a) for a, b in zip(p, q, strict=True) if b > 0)
    if divergence == "jsd":
        total = 0.0
        for a, b in zip(p, q, strict=True):
            m = beta * a + (1 - beta) * b
            total += beta * (a * math.log(a / m) if a > 0 else 0.0)
            total += (1 - beta) * (b * math.log(b / m) if b > 0 else 0.0)
        return total
    return 0.5 * sum(abs(a - b) for a, b in zip(p, q, strict=True))


# (tail mode, teacher weights at ids (2, 0), tail, teacher outcomes, student outcomes)
HAND_CASES = {
    # ghost: outcomes (id 2, id 0, bucket {1}); student bucket = q_1
    "ghost": ([0.5, 0.3], 0.2, [0.5, 0.3, 0.2], [Q[2], Q[0], Q[1]]),
    # renormalize, JSD / TV: the teacher puts 0 outside S, the student's bucket is q_1
    "renormalize": ([0.6, 0.4], None, [0.6, 0.4, 0.0], [Q[2], Q[0], Q[1]]),
}


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("mode", ["ghost", "renormalize"])
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_hand_computed_values(backend, mode, divergence):
    weights, tail, p, q = HAND_CASES[mode]
    if mode == "renormalize" and divergence == "reverse_kl":
        # no bucket: the student restricted to S and renormalised, (3/6, 1/6) / (4/6)
        p, q = p[:2], [0.75, 0.25]
    if mode == "renormalize" and divergence == "forward_kl":
        p, q = p[:2], q[:2]  # the existing forward KL: sum w log(w / q_S), no bucket
    want = _by_hand(divergence, p, q)
    fn = sparse_kd_loss_reference if backend == "reference" else _backend(backend)
    got = fn(
        torch.tensor([Z], dtype=torch.float64),
        torch.tensor([1]),
        torch.tensor([[2, 0]]),
        torch.tensor([weights], dtype=torch.float64),
        None if tail is None else torch.tensor([tail], dtype=torch.float64),
        ce_weight=0.0,
        kl_weight=1.0,
        divergence=divergence,
        jsd_beta=0.3,
    )
    tol = 1e-12 if backend != "triton" else 1e-6  # Triton computes in fp32
    assert want > 0.01 and abs(float(got) - want) <= tol, (float(got), want)


def _matching_teacher(logits, k, *, temperature=1.0, seed=0):
    """Teacher entries equal to the student's own temperature-T softmax: (ids, weights, tail)."""
    gen = torch.Generator().manual_seed(seed)
    n, vocab = logits.shape
    q = torch.softmax(logits / temperature, dim=-1)  # (N, V)
    ids = torch.argsort(torch.rand(n, vocab, generator=gen), dim=1)[:, :k]  # (N, k)
    weights = q.gather(1, ids)
    tail = q.scatter(1, ids, 0.0).sum(dim=1)  # masked sum
    return ids, weights, tail


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_zero_when_student_equals_teacher(backend, divergence):
    """Ghost: entries + tail from the student itself; renormalize: S = the whole vocabulary
    (otherwise the student's mass outside S is a real difference for JSD / TV)."""
    logits = torch.randn(5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([1, IGNORE, 3, 4, 5])
    fn = sparse_kd_loss_reference if backend == "reference" else _backend(backend)
    kwargs = dict(ce_weight=0.0, kl_weight=1.0, divergence=divergence, temperature=2.0)
    ids, weights, tail = _matching_teacher(logits, 6, temperature=2.0)
    full_ids, full_weights, _ = _matching_teacher(logits, 16, temperature=2.0, seed=1)
    for ids_, weights_, tail_ in ((ids, weights, tail), (full_ids, full_weights, None)):
        z = logits.clone().requires_grad_()
        loss = fn(z, targets, ids_, weights_, tail_, **kwargs)
        loss.backward()
        tol = 1e-12 if backend != "triton" else 1e-6
        assert abs(float(loss.detach())) <= tol
        if divergence != "tv":  # TV's gradient at (floating-point) ties: see the exact-tie test
            assert float(z.grad.abs().max()) <= tol


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_tv_gradient_at_exact_ties_is_the_zero_subgradient(backend):
    """Uniform logits over V = 8 give q = 1/8 exactly (all binary fractions below are exact).
    The subgradient of |p - q| at a tie is taken as 0 (torch.sign(0), as autograd of abs).

    Renormalize, a teacher of 1/8 at every id: every outcome ties, value and gradient 0.
    Ghost, ids (0, 2, 4, 6) with weights (1/8, 1/8, 3/16, 1/16) and tail 1/2 (the student's
    bucket is 4/8 = 1/2): ties at ids 0, 2 and the bucket, h = (0, 0, -1/2, +1/2, 0), hbar = 0,
    so dTV/dz = q (h - hbar) = (0, 0, -1/16, +1/16) at the ids and 0 elsewhere; TV = 1/16. Any
    other choice at the ties (e.g. +1/2) moves hbar and makes the tied ids' gradient non-zero."""
    fn = sparse_kd_loss_reference if backend == "reference" else _backend(backend)
    targets = torch.tensor([0, 1])
    z = torch.zeros(2, 8, requires_grad=True)
    ids = torch.stack([torch.randperm(8), torch.randperm(8)])
    loss = fn(z, targets, ids, torch.full((2, 8), 1 / 8), None, ce_weight=0.0, kl_weight=1.0, divergence="tv")
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(z.grad.abs().max()) == 0.0

    z = torch.zeros(2, 8, requires_grad=True)
    ids = torch.tensor([[0, 2, 4, 6], [6, 4, 2, 0]])
    weights = torch.tensor([[1 / 8, 1 / 8, 3 / 16, 1 / 16], [1 / 8, 1 / 8, 3 / 16, 1 / 16]])
    tail = torch.full((2,), 0.5)
    loss = fn(z, targets, ids, weights, tail, ce_weight=0.0, kl_weight=1.0, divergence="tv")
    loss.backward()
    want = torch.zeros(2, 8)
    want[0, 4], want[0, 6] = -1 / 16, 1 / 16
    want[1, 2], want[1, 0] = -1 / 16, 1 / 16
    assert float(loss.detach()) == 1 / 16
    assert torch.equal(z.grad, want / 2)  # mean over the 2 positions


@pytest.mark.parametrize("mode", TAILS)
def test_jsd_limits_are_forward_and_reverse_kl(mode):
    """JSD_beta / beta -> KL(teacher || student) as beta -> 0 (both tails); JSD_beta / (1 - beta)
    -> KL(student || teacher) as beta -> 1 with a ghost bucket (without a tail the bucket's teacher
    mass is 0, so that limit diverges and reverse_kl restricts the student to S instead). The gap
    is O(beta) (about 2e-6 relative here at beta = 1e-7; float64 rounding is far below)."""
    case = make_case(6, 30, 5, mode, seed=11)
    kwargs = dict(ce_weight=0.0, kl_weight=1.0, temperature=2.0)
    args = (case.logits, case.targets, case.ids, case.weights, case.tail)

    def ref(**options):
        return float(sparse_kd_loss_reference(*args, **kwargs, **options))

    beta = 1e-7
    forward = ref(divergence="forward_kl")
    assert abs(ref(divergence="jsd", jsd_beta=beta) / beta - forward) <= 1e-4 * forward
    if mode == "ghost":
        reverse = ref(divergence="reverse_kl")
        near_one = 1.0 - beta
        assert abs(ref(divergence="jsd", jsd_beta=near_one) / (1.0 - near_one) - reverse) <= 1e-4 * reverse


def test_reverse_kl_floors_zero_teacher_weights():
    """A weight quantised to 0 counts as PROB_FLOOR = 1e-8 in reverse KL: finite, and the same in
    every backend."""
    case = make_case(4, 20, 5, "ghost", seed=12)
    case.weights[:, 1] = 0.0
    want = _loss_and_grad(sparse_kd_loss_reference, case, torch.float64, divergence="reverse_kl")
    assert math.isfinite(float(want[0]))
    got = _loss_and_grad(_backend("torch"), case, torch.float64, divergence="reverse_kl")
    assert abs(float(got[0] - want[0])) <= 1e-10 and float((got[1] - want[1]).abs().max()) <= 1e-10


# ---------------------------------------------------------------------------------------------
# Backends against the reference (autograd of the reference is the gradient's truth)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("mode", TAILS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference_fp32(backend, temperature, mode, divergence):
    """N = 7 (every 4th position ignored), V = 37 (odd, 3 chunks of 16 on Triton), k = 5."""
    case = make_case(7, 37, 5, mode, seed=hash((mode, divergence)) % 1000)
    kwargs = dict(temperature=temperature, ce_weight=0.3, kl_weight=0.7, divergence=divergence, jsd_beta=0.3)
    extra = {"block_v": 16} if backend == "triton" else {}
    exact = _loss_and_grad(sparse_kd_loss_reference, case, torch.float64, **kwargs)
    naive = _loss_and_grad(sparse_kd_loss_reference, case, torch.float32, **kwargs)
    ours = _loss_and_grad(_backend(backend), case, torch.float32, **kwargs, **extra)
    assert ours[0].dtype == torch.float32
    assert_within_naive(ours[0], exact[0], naive[0], "loss")
    assert_within_naive(ours[1], exact[1], naive[1], "grad")


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("mode", TAILS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference_fp64(backend, temperature, mode, divergence):
    case = make_case(7, 37, 5, mode, seed=hash((mode, divergence, 64)) % 1000)
    kwargs = dict(temperature=temperature, ce_weight=0.3, kl_weight=0.7, divergence=divergence, jsd_beta=0.6)
    exact = _loss_and_grad(sparse_kd_loss_reference, case, torch.float64, **kwargs)
    ours = _loss_and_grad(_backend(backend), case, torch.float64, **kwargs)
    if backend == "torch":
        assert ours[0].dtype == torch.float64
        assert abs(float(ours[0] - exact[0])) <= 1e-10 * max(1.0, abs(float(exact[0])))
        assert float((ours[1] - exact[1]).abs().max()) <= 1e-10
    else:  # fp32 inside the kernel
        naive = _loss_and_grad(sparse_kd_loss_reference, case, torch.float32, **kwargs)
        assert_within_naive(ours[0], exact[0], naive[0], "loss")
        assert_within_naive(ours[1], exact[1], naive[1], "grad")


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "tv"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_padding_all_ignored_and_empty_rows(backend, divergence):
    """Padding ids (-1) are not in S; a row whose ids are all padding has only the bucket (ghost)
    or no outcome (reverse KL without a tail: 0); an all-ignored batch gives 0 and no gradient."""
    case = make_case(6, 24, 4, "ghost", seed=13)
    case.ids[1, 2:] = -1
    case.weights[1, 2:] = 0.0
    case.ids[2] = -1
    case.weights[2] = 0.0
    case.tail[2] = 1.0
    for tail in (case.tail, None):
        kwargs = dict(ce_weight=0.4, kl_weight=0.6, divergence=divergence, temperature=2.0)
        base = make_case(6, 24, 4, "ghost", seed=13)
        base.ids, base.weights, base.tail = case.ids, case.weights, tail
        exact = _loss_and_grad(sparse_kd_loss_reference, base, torch.float64, **kwargs)
        ours = _loss_and_grad(_backend(backend), base, torch.float64, **kwargs)
        tol = 1e-10 if backend == "torch" else 1e-5
        assert abs(float(ours[0] - exact[0])) <= tol and float((ours[1] - exact[1]).abs().max()) <= tol
    case.targets[:] = IGNORE
    loss, grad = _loss_and_grad(_backend(backend), case, torch.float32, divergence=divergence)
    assert float(loss) == 0.0 and float(grad.abs().max()) == 0.0


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_triton_inplace_matches_reference(divergence):
    case = make_case(7, 37, 5, "ghost", seed=14)
    kwargs = dict(temperature=2.0, divergence=divergence)
    exact = _loss_and_grad(sparse_kd_loss_reference, case, torch.float64, grad_scale=2.5, **kwargs)
    naive = _loss_and_grad(sparse_kd_loss_reference, case, torch.float32, grad_scale=2.5, **kwargs)
    logits, weights, tail = _cast(case, torch.float32)
    buffer = logits.clone().requires_grad_()
    loss = sparse_kd_loss(
        buffer, case.targets, case.ids, weights, tail, backend="triton", inplace_grad=True, **kwargs
    )
    (loss * 2.5).backward()
    assert_within_naive(loss.detach(), exact[0], naive[0], "loss")
    assert_within_naive(buffer.grad, exact[1], naive[1], "grad")


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("mode", TAILS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_matches_reference(backend, mode, divergence):
    case = make_case(9, 40, 5, mode, seed=15)
    gen = torch.Generator().manual_seed(16)
    hidden = torch.randn(9, 8, generator=gen, dtype=torch.float64)  # (N, H)
    weight = torch.randn(40, 8, generator=gen, dtype=torch.float64) / 8**0.5  # (V, H)
    kwargs = dict(temperature=2.0, ce_weight=0.3, kl_weight=0.7, divergence=divergence, jsd_beta=0.4)

    def run(fn, dtype, **extra):
        h = hidden.to(dtype).clone().requires_grad_()
        w = weight.to(dtype).clone().requires_grad_()
        tail = None if case.tail is None else case.tail.to(dtype)
        loss = fn(h, w, case.targets, case.ids, case.weights.to(dtype), tail, **kwargs, **extra)
        (loss * 1.5).backward()
        return loss.detach(), h.grad, w.grad

    exact = run(fused_linear_sparse_kd_loss_reference, torch.float64)
    naive = run(fused_linear_sparse_kd_loss_reference, torch.float32)
    ours = run(fused_linear_sparse_kd_loss, torch.float32, backend=backend, chunk_size=4, block_v=16)
    for what, got, want, base in zip(("loss", "grad_hidden", "grad_weight"), ours, exact, naive, strict=True):
        assert_within_naive(got, want, base, what)
    if backend == "torch":
        ours64 = run(fused_linear_sparse_kd_loss, torch.float64, backend=backend, chunk_size=4)
        for got, want in zip(ours64, exact, strict=True):
            assert float((got - want).abs().max()) <= 1e-10


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_dense_loss_is_the_reference_with_every_id(divergence):
    """Online mode: S = the whole vocabulary, no tail; value and autograd gradient."""
    gen = torch.Generator().manual_seed(17)
    logits = torch.randn(2, 3, 11, dtype=torch.float64, generator=gen)
    targets = torch.randint(0, 11, (2, 3), generator=gen)
    targets[0, 0] = IGNORE
    teacher = torch.log_softmax(torch.randn(2, 3, 11, dtype=torch.float64, generator=gen) * 3, -1)
    ids = torch.arange(11).expand(2, 3, 11)
    kwargs = dict(temperature=2.0, ce_weight=0.25, kl_weight=0.75, divergence=divergence, jsd_beta=0.7)
    z1 = logits.clone().requires_grad_()
    got = dense_kd_loss(z1, targets, teacher, **kwargs)
    got.backward()
    z2 = logits.clone().requires_grad_()
    want = sparse_kd_loss_reference(z2, targets, ids, teacher.exp(), **kwargs)
    want.backward()
    assert abs(float((got - want).detach())) <= 1e-10 and float((z1.grad - z2.grad).abs().max()) <= 1e-10


# ---------------------------------------------------------------------------------------------
# Loss parts: the mean CE and the mean divergence, returned by the same pass
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_parts_equal_a_reference_computation(backend, divergence):
    case = make_case(7, 30, 4, "ghost", seed=18)
    temperature, ce_weight, kl_weight = 2.0, 0.3, 0.7
    kwargs = dict(temperature=temperature, divergence=divergence)
    valid = case.targets != IGNORE
    want_ce = float(F.cross_entropy(case.logits[valid], case.targets[valid]))
    # the reference with the divergence alone: T^2 * mean D
    want_kd = float(
        sparse_kd_loss_reference(*_args(case), ce_weight=0.0, kl_weight=1.0, **kwargs) / temperature**2
    )
    logits, weights, tail = _cast(case, torch.float32)
    hidden = case.logits.float()  # hidden @ eye(V) = the logits: the fused variant on the same batch
    eye = torch.eye(30)
    runs = {
        "sparse": sparse_kd_loss(
            logits, case.targets, case.ids, weights, tail, ce_weight=ce_weight, kl_weight=kl_weight,
            backend=backend, return_parts=True, **kwargs,
        ),
        "fused": fused_linear_sparse_kd_loss(
            hidden, eye, case.targets, case.ids, weights, tail, ce_weight=ce_weight, kl_weight=kl_weight,
            backend=backend, return_parts=True, chunk_size=3, **kwargs,
        ),
    }  # fmt: skip
    for what, (loss, parts) in runs.items():
        assert parts.shape == (2,) and not parts.requires_grad, what
        assert abs(float(parts[0]) - want_ce) <= 1e-5 * want_ce, what
        assert abs(float(parts[1]) - want_kd) <= 1e-5 * max(want_kd, 1e-3), what
        recombined = ce_weight * float(parts[0]) + kl_weight * temperature**2 * float(parts[1])
        assert abs(recombined - float(loss)) <= 1e-5 * float(loss), what


def _args(case):
    return case.logits, case.targets, case.ids, case.weights, case.tail


def test_dense_parts_and_all_ignored_parts():
    gen = torch.Generator().manual_seed(19)
    logits = torch.randn(4, 9, dtype=torch.float64, generator=gen)
    targets = torch.tensor([1, IGNORE, 3, 4])
    teacher = torch.log_softmax(torch.randn(4, 9, dtype=torch.float64, generator=gen), -1)
    loss, parts = dense_kd_loss(
        logits, targets, teacher, ce_weight=0.5, kl_weight=0.5, divergence="jsd", return_parts=True
    )
    valid = targets != IGNORE
    assert abs(float(parts[0]) - float(F.cross_entropy(logits[valid], targets[valid]))) <= 1e-6
    kd_only = dense_kd_loss(logits, targets, teacher, ce_weight=0.0, kl_weight=1.0, divergence="jsd")
    assert abs(float(parts[1]) - float(kd_only)) <= 1e-6
    assert abs(0.5 * float(parts[0]) + 0.5 * float(parts[1]) - float(loss)) <= 1e-6
    case = make_case(3, 9, 2, "ghost", seed=20)
    case.targets[:] = IGNORE
    _, parts = sparse_kd_loss(*_args(case), backend="torch", return_parts=True)
    assert parts.tolist() == [0.0, 0.0]


def test_params_validate_divergence_and_beta():
    assert SparseKDParams.from_alpha(0.5, divergence="tv").divergence == "tv"
    for bad in (dict(divergence="kl"), dict(jsd_beta=0.0), dict(jsd_beta=1.0), dict(jsd_beta=1.5)):
        with pytest.raises(KernelError):
            SparseKDParams(**bad)
