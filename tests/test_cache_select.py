"""Ensemble and per-position selection (cache/select.py) against independent float64 NumPy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from logitcache.cache.select import (
    HybridSelection,
    ensemble_hybrid,
    ensemble_logprobs,
    ensemble_sampled,
    ensemble_topk,
    select_hybrid,
    select_sampled,
    select_topk,
    sorted_topk,
    tail_cdf,
    tail_uniforms,
    window_seed,
)
from logitcache.pipeline.errors import CacheError, TeacherError

# (B, T, V) with an odd V and T so nothing lines up with a power of two
SHAPE = (3, 5, 37)


def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _teachers(seed: int = 0, n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g, dtype=torch.float64) * 3 for _ in range(n)]


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_mean_logits_matches_reference(temperature: float) -> None:
    zs = _teachers()
    weights = [1.0, 2.0, 0.5]
    got = ensemble_logprobs(
        zs, teacher_names=["a", "b", "c"], window_indices=[0, 1, 2], weights=weights, temperature=temperature
    )
    mean = sum(w * z.numpy() for w, z in zip(weights, zs, strict=True)) / sum(weights)
    want = _np_log_softmax(mean / temperature)
    # float64 throughout: only rounding differences (~1e-15 relative) remain
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)


def test_mean_probs_matches_reference() -> None:
    zs = _teachers(1, 2)
    weights = [3.0, 1.0]
    got = ensemble_logprobs(
        zs,
        teacher_names=["a", "b"],
        window_indices=[0, 1, 2],
        rule="mean_probs",
        weights=weights,
        temperature=2.0,
    )
    probs = sum(w * np.exp(_np_log_softmax(z.numpy() / 2.0)) for w, z in zip(weights, zs, strict=True)) / 4.0
    np.testing.assert_allclose(got.numpy(), np.log(probs), rtol=0, atol=1e-12)


def test_float32_and_bf16_teachers_compute_in_float32() -> None:
    zs = [z.to(torch.bfloat16) for z in _teachers(2, 2)]
    got = ensemble_logprobs(zs, teacher_names=["a", "b"], window_indices=[0, 1, 2])
    assert got.dtype == torch.float32
    want = _np_log_softmax((zs[0].double().numpy() + zs[1].double().numpy()) / 2)
    # the bf16 inputs are exact in float32; float32 log_softmax error ~ 1e-6 at |logp| ~ 10
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-5)


def test_topk_ids_logprobs_and_tail() -> None:
    logp = ensemble_logprobs(_teachers(3, 1), teacher_names=["a"], window_indices=[0, 1, 2])
    sel = select_topk(logp, k=6)
    lp = logp.numpy()
    order = np.argsort(-lp, axis=-1, kind="stable")[..., :6]
    np.testing.assert_array_equal(np.sort(sel.ids.numpy(), -1), np.sort(order, -1))
    np.testing.assert_allclose(sel.logprobs.numpy(), np.take_along_axis(lp, sel.ids.numpy(), -1), atol=1e-6)
    probs = np.exp(lp)
    tail = probs.sum(-1) - np.take_along_axis(probs, order, -1).sum(-1)
    np.testing.assert_allclose(sel.tail.numpy(), tail, rtol=1e-6, atol=1e-7)
    entropy = -(probs * lp).sum(-1)
    np.testing.assert_allclose(sel.entropy.numpy(), entropy, rtol=1e-6)


def test_tiny_tail_is_accurate_in_float32() -> None:
    # One very peaked position: tail ~ 35 * e^-30 ~ 3.3e-12, far below float32's 1 - sum resolution (6e-8).
    z = torch.zeros(1, 1, 37, dtype=torch.float32)
    z[0, 0, :2] = 30.0
    sel = select_topk(torch.log_softmax(z, -1), k=2)
    exact = 35 * np.exp(-30.0) / (2 + 35 * np.exp(-30.0))
    assert sel.tail.item() == pytest.approx(exact, rel=1e-5)
    naive = 1 - torch.softmax(z, -1)[0, 0, :2].sum().item()
    assert abs(naive - exact) > 1e-9 or naive == 0.0  # the naive formula loses it entirely


def test_sampled_counts_reproducible_across_batch_split() -> None:
    logp = ensemble_logprobs(_teachers(4, 1), teacher_names=["a"], window_indices=[10, 11, 12])
    whole = select_sampled(logp.float(), num_samples=8, seed=7, window_indices=[10, 11, 12])
    first = select_sampled(logp[:1].float(), num_samples=8, seed=7, window_indices=[10])
    rest = select_sampled(logp[1:].float(), num_samples=8, seed=7, window_indices=[11, 12])
    torch.testing.assert_close(whole.ids, torch.cat([first.ids, rest.ids]))
    torch.testing.assert_close(whole.counts, torch.cat([first.counts, rest.counts]))
    assert bool((whole.counts.sum(-1) == 8).all())
    other_seed = select_sampled(logp.float(), num_samples=8, seed=8, window_indices=[10, 11, 12])
    assert not torch.equal(other_seed.ids, whole.ids)
    assert window_seed(7, 10) != window_seed(7, 11)


def test_sampled_structure_matches_draws() -> None:
    # Independent check: redraw with the documented generator and count with np.unique.
    logp = torch.log_softmax(torch.randn(1, 4, 37, generator=torch.Generator().manual_seed(5)), -1)
    sel = select_sampled(logp, num_samples=12, seed=3, window_indices=[42])
    g = torch.Generator().manual_seed(window_seed(3, 42))
    draws = torch.multinomial(logp[0].exp(), 12, replacement=True, generator=g).numpy()
    for t in range(4):
        ids, counts = np.unique(draws[t], return_counts=True)
        u = len(ids)
        np.testing.assert_array_equal(sel.ids[0, t, :u].numpy(), ids)
        np.testing.assert_array_equal(sel.counts[0, t, :u].numpy(), counts)
        assert bool((sel.counts[0, t, u:] == 0).all())
        assert bool((sel.ids[0, t, u:] == ids[-1]).all())  # padding repeats the last real id


def test_sampled_is_unbiased_on_average() -> None:
    # Over many windows the mean count/n per id converges to p (std of the mean ~ sqrt(p/(n W))).
    logp = torch.log_softmax(torch.randn(1, 1, 37, generator=torch.Generator().manual_seed(6)) * 2, -1)
    windows = 400
    sel = select_sampled(
        logp.expand(windows, 1, 37).contiguous(), num_samples=16, seed=0, window_indices=list(range(windows))
    )
    estimate = torch.zeros(37, dtype=torch.float64)
    estimate.scatter_add_(0, sel.ids.reshape(-1), sel.counts.reshape(-1).double() / 16)
    estimate /= windows
    p = logp.exp().reshape(-1).double()
    assert float((estimate - p).abs().max()) < 5 * float((p / (16 * windows)).sqrt().max())


def test_nan_logits_name_teacher_and_window() -> None:
    zs = _teachers(0, 2)
    zs[1][2, 3, 4] = float("nan")
    with pytest.raises(TeacherError, match=r"teacher 'gpt2'.*window 17, position 3"):
        ensemble_logprobs(zs, teacher_names=["llama", "gpt2"], window_indices=[15, 16, 17])
    zs[1][2, 3, 4] = float("inf")
    with pytest.raises(TeacherError, match="gpt2"):
        ensemble_logprobs(zs, teacher_names=["llama", "gpt2"], window_indices=[15, 16, 17], rule="mean_probs")


def test_different_vocab_sizes_refused() -> None:
    a = torch.zeros(1, 2, 37)
    b = torch.zeros(1, 2, 40)
    with pytest.raises(TeacherError, match="same tokenizer"):
        ensemble_logprobs([a, b], teacher_names=["a", "b"], window_indices=[0])


def test_k_at_least_vocab_refused() -> None:
    logp = torch.log_softmax(torch.zeros(1, 2, 37), -1)
    with pytest.raises(CacheError, match="k < vocab"):
        select_topk(logp, k=37)
    with pytest.raises(CacheError, match="vocab"):
        select_sampled(logp, num_samples=37, seed=0, window_indices=[0])


# ensemble_topk: the fused path of `pipe cache-logits`, checked against a float64 NumPy top-k of the
# ensemble distribution (independent of ensemble_logprobs/select_topk).


def _np_topk_reference(zs: list[torch.Tensor], weights: list[float], rule: str, temperature: float, k: int):
    z64 = [z.double().numpy() for z in zs]
    total = sum(weights)
    if rule == "mean_logits":
        lp = _np_log_softmax(sum(w * z for w, z in zip(weights, z64, strict=True)) / total / temperature)
    else:
        probs = (
            sum(w * np.exp(_np_log_softmax(z / temperature)) for w, z in zip(weights, z64, strict=True))
            / total
        )
        lp = np.log(probs)
    order = np.argsort(-lp, axis=-1, kind="stable")[..., :k]
    probs = np.exp(lp)
    tail = 1.0 - np.take_along_axis(probs, order, -1).sum(-1)
    entropy = -(probs * lp).sum(-1)
    return lp, order, tail, entropy


@pytest.mark.parametrize("rule", ["mean_logits", "mean_probs"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_elements", [37, 37 * 4, None])  # one row, several rows, one block
def test_ensemble_topk_matches_reference(rule: str, dtype: torch.dtype, block_elements: int | None) -> None:
    zs = [z.to(dtype) for z in _teachers(5, 3)]
    weights, temperature, k = [1.0, 2.0, 0.5], 1.7, 6
    sel = ensemble_topk(
        zs,
        teacher_names=["a", "b", "c"],
        window_indices=[0, 1, 2],
        k=k,
        rule=rule,
        weights=weights,
        temperature=temperature,
        block_elements=block_elements,
    )
    lp, order, tail, entropy = _np_topk_reference(zs, weights, rule, temperature, k)
    assert sel.ids.shape == (*SHAPE[:2], k) and sel.ids.dtype == torch.int64
    assert sel.logprobs.dtype == sel.tail.dtype == sel.entropy.dtype == torch.float32
    # rank order, same ids (random normal logits: no ties at the k-th place)
    np.testing.assert_array_equal(sel.ids.numpy(), order)
    atol = 2e-6  # float32 results (bf16 inputs are exact in float32; float64 ones are rounded at the end)
    np.testing.assert_allclose(sel.logprobs.numpy(), np.take_along_axis(lp, order, -1), rtol=0, atol=atol)
    np.testing.assert_allclose(sel.tail.numpy(), tail, rtol=1e-5, atol=atol)
    np.testing.assert_allclose(sel.entropy.numpy(), entropy, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("rule", ["mean_logits", "mean_probs"])
def test_ensemble_topk_equals_the_plain_path(rule: str) -> None:
    zs = [z.float() for z in _teachers(6, 2)]
    args = {"teacher_names": ["a", "b"], "window_indices": [0, 1, 2], "rule": rule, "temperature": 2.0}
    plain = select_topk(ensemble_logprobs(zs, **args), k=5)
    fused = ensemble_topk(zs, k=5, block_elements=37 * 2, **args)
    np.testing.assert_array_equal(fused.ids.numpy(), plain.ids.numpy())
    for field in ("logprobs", "tail", "entropy"):
        np.testing.assert_allclose(
            getattr(fused, field).numpy(), getattr(plain, field).numpy(), rtol=1e-5, atol=1e-6
        )


def test_ensemble_topk_single_teacher_leaves_its_logits_untouched() -> None:
    z = _teachers(7, 1)[0].float()
    before = z.clone()
    sel = ensemble_topk([z], teacher_names=["a"], window_indices=[0, 1, 2], k=4)
    torch.testing.assert_close(z, before, rtol=0, atol=0)
    lp, order, tail, _ = _np_topk_reference([z], [1.0], "mean_logits", 1.0, 4)
    np.testing.assert_array_equal(sel.ids.numpy(), order)
    np.testing.assert_allclose(sel.tail.numpy(), tail, rtol=1e-5)


@pytest.mark.parametrize("rule", ["mean_logits", "mean_probs"])
def test_ensemble_topk_tiny_tail_is_accurate(rule: str) -> None:
    z = torch.zeros(1, 1, 37, dtype=torch.float32)
    z[0, 0, :2] = 30.0
    sel = ensemble_topk([z, z.clone()], teacher_names=["a", "b"], window_indices=[0], k=2, rule=rule)
    exact = 35 * np.exp(-30.0) / (2 + 35 * np.exp(-30.0))
    assert sel.tail.item() == pytest.approx(exact, rel=1e-5)


@pytest.mark.parametrize("rule", ["mean_logits", "mean_probs"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_ensemble_topk_names_the_teacher_with_a_bad_logit(rule: str, bad: float) -> None:
    zs = [z.float() for z in _teachers(0, 2)]
    zs[1][2, 3, 4] = bad
    with pytest.raises(TeacherError, match=r"teacher 'gpt2'.*window 17, position 3"):
        ensemble_topk(
            zs,
            teacher_names=["llama", "gpt2"],
            window_indices=[15, 16, 17],
            k=3,
            rule=rule,
            block_elements=37,
        )


def test_ensemble_topk_refuses_bad_arguments() -> None:
    zs = [torch.zeros(1, 2, 37)]
    with pytest.raises(CacheError, match="k < vocab"):
        ensemble_topk(zs, teacher_names=["a"], window_indices=[0], k=37)
    with pytest.raises(CacheError, match="ensemble rule"):
        ensemble_topk(zs, teacher_names=["a"], window_indices=[0], k=3, rule="median")
    with pytest.raises(TeacherError, match="same tokenizer"):
        ensemble_topk([zs[0], torch.zeros(1, 2, 40)], teacher_names=["a", "b"], window_indices=[0], k=3)


# sorted_topk: torch.topk's exact answer (values and ids, bit for bit), found from a few candidates per
# row on the CPU. The fast path needs V >= 1024 (4 x 256 groups) and k < 128; every V here is odd.


def _rows_with_special_cases(rows: int, vocab: int, k: int, seed: int) -> torch.Tensor:
    """Rows of distinct values in random order, then rows that must fall back to torch.topk: ties at and above the k-th
    place, NaN, +-inf, -0.0 beside 0.0 at the top, all equal, all -inf."""
    g = torch.Generator().manual_seed(seed)
    # distinct values in every row (float32 randn repeats values often enough to tie in a top-64)
    z = torch.stack([torch.randperm(vocab, generator=g) for _ in range(rows + 9)]).float() * 3e-3 - 5
    order = torch.argsort(z[rows], descending=True)
    z[rows, order[k]] = z[rows, order[k - 1]]  # tie between the k-th and (k+1)-th largest
    order = torch.argsort(z[rows + 1], descending=True)
    z[rows + 1, order[1]] = z[rows + 1, order[0]]  # tie at the top
    z[rows + 2, 5] = float("nan")
    z[rows + 3, vocab - 1] = float("inf")
    z[rows + 4, 7] = float("-inf")  # harmless: the row stays exact
    z[rows + 5, :] = -1.0
    z[rows + 5, 3], z[rows + 5, 9] = 0.0, -0.0  # equal as floats, different bits
    z[rows + 6, :] = 0.5
    z[rows + 7, :] = float("-inf")
    z[rows + 8, :] = torch.arange(vocab, dtype=torch.float32) * 1e-3  # a sorted row: top ids at the end
    return z


@pytest.mark.parametrize(("rows", "vocab", "k"), [(5, 1029, 1), (13, 4133, 64), (3, 2051, 127), (4, 1024, 8)])
def test_sorted_topk_is_torch_topk_bit_for_bit(rows: int, vocab: int, k: int) -> None:
    z = _rows_with_special_cases(rows, vocab, k, seed=vocab)
    values, ids = sorted_topk(z, k)
    want = torch.topk(z, k, dim=-1, largest=True, sorted=True)
    assert values.dtype == torch.float32 and ids.dtype == torch.int64 and values.shape == (rows + 9, k)
    torch.testing.assert_close(values, want.values, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(ids, want.indices)


def test_sorted_topk_recomputes_only_rows_with_ties(monkeypatch: pytest.MonkeyPatch) -> None:
    z = _rows_with_special_cases(20, 4133, 64, seed=1)
    calls: list[tuple[int, ...]] = []
    real_topk = torch.topk

    def counting_topk(values: torch.Tensor, *args: object, **kwargs: object) -> object:
        calls.append(tuple(values.shape))
        return real_topk(values, *args, **kwargs)

    monkeypatch.setattr(torch, "topk", counting_topk)
    sorted_topk(z[:20], 64)  # random rows: no ties, no torch.topk over a whole row
    assert calls == []
    sorted_topk(z, 64)
    # rows 20..28 of _rows_with_special_cases, except the -inf entry (22 + 4 = 24) and the sorted row
    assert calls == [(7, 4133)]


@pytest.mark.parametrize("rule", ["mean_logits", "mean_probs"])
@pytest.mark.parametrize("block_elements", [4133 * 3, None])
def test_ensemble_topk_wide_vocab_matches_reference(rule: str, block_elements: int | None) -> None:
    # V = 4133 > 1024: the fast top-k path (SHAPE's V = 37 never takes it)
    g = torch.Generator().manual_seed(11)
    zs = [torch.randn(2, 7, 4133, generator=g) * 3 for _ in range(2)]
    weights, temperature, k = [1.0, 3.0], 1.3, 64
    sel = ensemble_topk(
        zs,
        teacher_names=["a", "b"],
        window_indices=[0, 1],
        k=k,
        rule=rule,
        weights=weights,
        temperature=temperature,
        block_elements=block_elements,
    )
    lp, order, tail, entropy = _np_topk_reference(zs, weights, rule, temperature, k)
    np.testing.assert_array_equal(sel.ids.numpy(), order)
    np.testing.assert_allclose(sel.logprobs.numpy(), np.take_along_axis(lp, order, -1), rtol=0, atol=2e-6)
    np.testing.assert_allclose(sel.tail.numpy(), tail, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(sel.entropy.numpy(), entropy, rtol=1e-5, atol=2e-6)


def _plain_mean_logits_topk(zs: list[torch.Tensor], scales: list[float], k: int) -> tuple[torch.Tensor, ...]:
    """The formula of the module docstring over the whole (B, T, V) at once, in plain torch ops."""
    z = zs[0].float() * scales[0]
    for other, scale in zip(zs[1:], scales[1:], strict=True):
        z.add_(other, alpha=scale)
    top_z, top_ids = torch.topk(z, k, dim=-1, largest=True, sorted=True)
    m = top_z[..., :1]
    e = (z - m).exp()
    ez = torch.linalg.vecdot(e, z - m)
    e_top = e.gather(-1, top_ids)
    rest = e.scatter(-1, top_ids, 0.0).sum(-1)
    s = rest + e_top.sum(-1)
    return top_ids, (top_z - m) - s.log()[..., None], rest / s, s.log() - ez / s


@pytest.mark.parametrize("block_elements", [4133, 4133 * 5, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ensemble_topk_is_the_plain_formula_bit_for_bit(
    block_elements: int | None, dtype: torch.dtype
) -> None:
    # What a cache stores must not depend on blocks, work buffers or the top-k search: the fused
    # path equals the formula evaluated in one go, to the last bit (so the stored bytes are the same).
    g = torch.Generator().manual_seed(12)
    zs = [(torch.randn(3, 5, 4133, generator=g) * 3).to(dtype) for _ in range(2)]
    sel = ensemble_topk(
        zs,
        teacher_names=["a", "b"],
        window_indices=[0, 1, 2],
        k=64,
        weights=[1.0, 2.0],
        block_elements=block_elements,
    )
    ids, logp, tail, entropy = _plain_mean_logits_topk(zs, [1 / 3, 2 / 3], 64)
    assert torch.equal(sel.ids, ids)
    for got, want in ((sel.logprobs, logp), (sel.tail, tail), (sel.entropy, entropy)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ensemble_sampled: select_sampled(ensemble_logprobs(...)) a block of windows at a time;
# ensemble_hybrid: ensemble_topk's fused pass, plus the tail draws from its unnormalised probabilities.


def _hybrid_case(rule: str) -> tuple[list[torch.Tensor], dict]:
    g = torch.Generator().manual_seed(13)
    zs = [torch.randn(5, 6, 1031, generator=g) * 3 for _ in range(2)]  # V > 1024: the fast top-k path
    args = {
        "teacher_names": ["a", "b"],
        "window_indices": [7, 3, 9, 1, 4],
        "rule": rule,
        "weights": [2.0, 1.0],
        "temperature": 1.3,
    }
    return zs, args


@pytest.mark.parametrize("rule", ["mean_logits", "mean_probs"])
@pytest.mark.parametrize("block_elements", [1, 2 * 6 * 1031, None])  # one position, two windows, all at once
def test_blockwise_hybrid_and_sampled_are_the_whole_batch_bit_for_bit(
    rule: str, block_elements: int | None
) -> None:
    zs, args = _hybrid_case(rule)
    windows = args["window_indices"]
    logp = ensemble_logprobs(zs, **args)
    got = ensemble_sampled(zs, num_samples=12, seed=5, block_elements=block_elements, **args)
    want = select_sampled(logp, num_samples=12, seed=5, window_indices=windows)
    for field in want.__dataclass_fields__:
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=0, atol=0)
    # hybrid: any block size gives the whole batch's result, whose head is ensemble_topk's
    whole = ensemble_hybrid(zs, k=16, num_samples=8, seed=5, **args)
    got = ensemble_hybrid(zs, k=16, num_samples=8, seed=5, block_elements=block_elements, **args)
    assert isinstance(got, HybridSelection)
    for field in HybridSelection.__dataclass_fields__:
        torch.testing.assert_close(getattr(got, field), getattr(whole, field), rtol=0, atol=0)
    head = ensemble_topk(zs, k=16, **args)
    pairs = ((got.head_ids, head.ids), (got.head_logprobs, head.logprobs), (got.tail, head.tail))
    for mine, theirs in (*pairs, (got.entropy, head.entropy)):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("rule", ["mean_logits", "mean_probs"])
def test_hybrid_draws_follow_the_reference_tail_distribution(rule: str) -> None:
    """The fused draws against select_hybrid (float64 CDF of the float32 log p): every draw in its
    uniform's CDF interval up to rounding, and here (no uniform on a step) the same draws."""
    zs, args = _hybrid_case(rule)
    windows = args["window_indices"]
    m = 40
    got = ensemble_hybrid(zs, k=16, num_samples=m, seed=5, **args)
    logp = ensemble_logprobs(zs, **args)
    want = select_hybrid(logp, k=16, num_samples=m, seed=5, window_indices=windows)
    assert torch.equal(got.head_ids.sort(-1).values, want.head_ids.sort(-1).values)
    torch.testing.assert_close(got.tail, want.tail, rtol=1e-5, atol=1e-7)
    for b, window in enumerate(windows):
        cdf = tail_cdf(logp[b], want.head_ids[b])  # (T, V) the reference's
        cdf = cdf / cdf[:, -1:]
        lower = torch.cat([torch.zeros_like(cdf[:, :1]), cdf[:, :-1]], dim=1)
        uniforms = tail_uniforms(5, window, seq_len=cdf.shape[0], num_samples=m).sort(-1).values
        drawn = torch.stack(
            [
                torch.repeat_interleave(got.tail_ids[b, t], got.tail_counts[b, t].long())
                for t in range(cdf.shape[0])
            ]
        )  # (T, m) ascending
        below, above = lower.gather(1, drawn) - uniforms, uniforms - cdf.gather(1, drawn)
        assert float(torch.maximum(below, above).max()) < 1e-6
    assert torch.equal(got.tail_counts, want.tail_counts) and torch.equal(got.tail_ids, want.tail_ids)


def test_hybrid_row_with_an_underflowed_tail_draws_uniformly_outside_the_head() -> None:
    z = torch.full((1, 2, 1031), -200.0)
    z[0, :, :3] = 0.0  # three ids hold all the mass; exp(-200) underflows in float32
    sel = ensemble_hybrid([z], teacher_names=["a"], window_indices=[0], k=3, num_samples=64, seed=1)
    assert torch.equal(sel.head_ids.sort(-1).values, torch.tensor([[[0, 1, 2]] * 2]))
    assert bool((sel.tail == 0).all())
    drawn = sel.tail_ids[sel.tail_counts > 0]
    assert bool((drawn >= 3).all()) and drawn.unique().numel() > 40  # spread over the other 1028 ids


@pytest.mark.parametrize("rule", ["mean_logits", "mean_probs"])
@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_blockwise_hybrid_names_the_teacher_with_a_bad_logit(rule: str, bad: float) -> None:
    zs = [z.float() for z in _teachers(0, 2)]
    zs[1][2, 3, 4] = bad  # in the last of three one-window blocks
    args = {
        "teacher_names": ["llama", "gpt2"],
        "window_indices": [15, 16, 17],
        "rule": rule,
        "block_elements": 1,
    }
    with pytest.raises(TeacherError, match=r"teacher 'gpt2'.*window 17, position 3"):
        ensemble_hybrid(zs, k=3, num_samples=4, seed=0, **args)
    with pytest.raises(TeacherError, match=r"teacher 'gpt2'.*window 17, position 3"):
        ensemble_sampled(zs, num_samples=4, seed=0, **args)


def test_blockwise_hybrid_refuses_bad_arguments() -> None:
    zs = [torch.zeros(2, 3, 37)]
    args = {"teacher_names": ["a"], "window_indices": [0, 1], "seed": 0}
    with pytest.raises(CacheError, match="k \\+ num_samples"):
        ensemble_hybrid(zs, k=30, num_samples=7, **args)
    with pytest.raises(CacheError, match="0 < k"):
        ensemble_hybrid(zs, k=0, num_samples=7, **args)
    with pytest.raises(CacheError, match="2 window indices"):
        ensemble_hybrid(zs, k=3, num_samples=7, **{**args, "window_indices": [0]})
    with pytest.raises(CacheError, match="ensemble rule"):
        ensemble_sampled(zs, num_samples=7, rule="median", **args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_hybrid_on_cuda_matches_the_cpu_up_to_rounding() -> None:
    """The GPU run of `pipe cache-logits`: same head ids, and every draw in its uniform's interval of
    the CPU reference CDF (the uniforms come from the CPU generator on every device)."""
    zs, args = _hybrid_case("mean_logits")
    m = 40
    cpu = ensemble_hybrid(zs, k=16, num_samples=m, seed=5, **args)
    gpu = ensemble_hybrid([z.cuda() for z in zs], k=16, num_samples=m, seed=5, **args)
    assert torch.equal(gpu.head_ids.cpu().sort(-1).values, cpu.head_ids.sort(-1).values)
    torch.testing.assert_close(gpu.tail.cpu(), cpu.tail, rtol=1e-4, atol=1e-6)
    logp = ensemble_logprobs(zs, **args)
    for b, window in enumerate(args["window_indices"]):
        cdf = tail_cdf(logp[b], cpu.head_ids[b])
        cdf = cdf / cdf[:, -1:]
        lower = torch.cat([torch.zeros_like(cdf[:, :1]), cdf[:, :-1]], dim=1)
        uniforms = tail_uniforms(5, window, seq_len=cdf.shape[0], num_samples=m).sort(-1).values
        ids, counts = gpu.tail_ids[b].cpu(), gpu.tail_counts[b].cpu().long()
        drawn = torch.stack([torch.repeat_interleave(ids[t], counts[t]) for t in range(cdf.shape[0])])
        below, above = lower.gather(1, drawn) - uniforms, uniforms - cdf.gather(1, drawn)
        assert float(torch.maximum(below, above).max()) < 1e-4  # TAIL_CDF_SLACK of verify-cache
