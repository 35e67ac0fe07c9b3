"""Benchmark of the fused sparse-KD loss kernel against copy bandwidth, eager, torch.compile, Liger.

Run on a CUDA machine from the repository root (one command; prints a markdown table and appends
CSV rows)::

    python -m benchmarks.bench_kernel                       # both default shapes, bf16, topk + ghost
    python -m benchmarks.bench_kernel --csv $OUT/bench_kernel.csv --dtypes bf16,fp16,fp32
    python -m benchmarks.bench_kernel --sweep-blocks        # also time other BLOCK_V choices

Liger-Kernel is optional: carry its wheel (``../shared/device/fetch-wheels.sh liger-kernel==0.8.5``,
then ``pip install --no-index --no-deps --target /tmp/site .whl/*.whl`` and
``PYTHONPATH=/tmp/site:$PWD``); without it the Liger rows say "not installed".

What each row measures (``pass`` column):

- ``copy``: ``dst.copy_(src)`` of an N x V tensor in the same dtype (read + write N*V elements):
  the bandwidth the kernel is measured against, taken in the same run;
- ``fwd``: the forward call; ours computes loss and gradient there (Liger's CE also does), the
  reference only the loss;
- ``fwd+bwd``: forward and ``loss.backward()``: what a training step pays.

``GB/s`` for our rows uses the bytes the kernel must move: one read of the logits, one write of
the gradient, the teacher ids/weights (and tail, targets); ``% copy`` = that over the copy row's
GB/s. The in-place rows overwrite their logits with gradients at every repetition (the work does
not depend on the values). Timings are do_bench p50 (p20-p80 in the CSV). ``--smoke`` runs tiny
shapes on CPU under the Triton interpreter to check that the script works (2 timed calls per row,
``torch.compile`` with the ``eager`` backend: Dynamo traces, Inductor does not generate code); its
numbers mean nothing.

Every row is also appended to ``--jsonl`` as soon as it is measured (benchmarks.gpu_check reads it
back, also after stopping the benchmark at its time budget). A row whose measurement raised (out of
memory, a missing peer library, an error) keeps its place with a ``note``; the others go on.
``--compile-modes`` limits the ``torch.compile`` rows (each costs a compilation) to some modes.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from benchmarks import (
    REPO_ROOT,
    append_jsonl,
    device_name,
    git_commit,
    import_peer,
    peak_extra_mb,
    report_rows,
    time_ms,
    today,
)

COLUMNS = (
    "device",
    "date",
    "commit",
    "shape",
    "dtype",
    "mode",
    "impl",
    "pass",
    "ms",
    "ms_p20",
    "ms_p80",
    "GB/s",
    "% copy",
    "peak extra MiB",
    "x vs eager",
    "note",
)
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_args(argv=None):  # noqa: ANN001
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="16384x16000x64,8192x128256x64", help="NxVxk, comma-separated")
    parser.add_argument("--dtypes", default="bf16", help="comma-separated: bf16,fp16,fp32")
    parser.add_argument("--modes", default="topk,ghost", help="topk (renormalised) and/or ghost (tail)")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--csv", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "bench_kernel.csv")
    parser.add_argument("--skip-eager", action="store_true", help="skip eager and torch.compile baselines")
    parser.add_argument(
        "--compile-modes", default=None, help="modes that get torch.compile rows (default: all of --modes)"
    )
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (smoke: eager)")
    parser.add_argument("--rep-ms", type=int, default=200, help="do_bench repetition time per row (ms)")
    parser.add_argument("--warmup-ms", type=int, default=25, help="do_bench warm-up time per row (ms)")
    parser.add_argument(
        "--jsonl", type=Path, default=None, help="also append each row here as it is measured"
    )
    parser.add_argument("--sweep-blocks", action="store_true", help="time BLOCK_V in {1024..32768} too")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (interpreter), no CSV")
    return parser.parse_args(argv)


def make_inputs(n, vocab, k, dtype, mode, device):  # noqa: ANN001
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(n, vocab, generator=gen, device=device) * 2).to(dtype)  # (N, V)
    targets = torch.randint(0, vocab, (n,), generator=gen, device=device)  # (N,)
    targets[::17] = -100
    teacher = torch.randn(n, vocab, generator=gen, device=device) * 2  # (N, V) fp32, freed below
    top_vals, ids = torch.topk(teacher, k, dim=1)  # (N, k) distinct ids
    log_norm = torch.logsumexp(teacher, dim=1, keepdim=True)
    del teacher
    probs = (top_vals - log_norm).exp()  # (N, k) teacher top-k probabilities
    if mode == "topk":
        return logits, targets, ids, probs / probs.sum(dim=1, keepdim=True), None
    tail = (1.0 - probs.sum(dim=1)).clamp(min=0.0)  # benchmark data only: the cache writes a masked sum
    return logits, targets, ids, probs, tail


def copy_bandwidth(n, vocab, dtype, device, args=None) -> tuple[tuple[float, float, float], float]:  # noqa: ANN001
    """(do_bench ms of an N x V copy, its GB/s counting one read and one write)."""
    import torch

    src = torch.randn(n, vocab, device=device).to(dtype)  # random data, not zeros (METHOD.md)
    dst = torch.empty_like(src)
    timing = (
        {} if args is None else dict(rep_ms=args.rep_ms, warmup_ms=args.warmup_ms, cpu_reps=args.cpu_reps)
    )
    ms = time_ms(lambda: dst.copy_(src), **timing)
    return ms, 2 * src.numel() * src.element_size() / ms[0] / 1e6


def bench_mode(args, base, n, vocab, k, dtype, mode, copy_gbs, device, *, peers: bool) -> list[dict]:  # noqa: ANN001
    import torch

    from logitcache.kernels import sparse_kd_loss, sparse_kd_loss_reference

    logits, targets, ids, weights, tail = make_inputs(n, vocab, k, dtype, mode, device)
    elem = logits.element_size()
    must_move = (
        2 * n * vocab * elem
        + n * k * (ids.element_size() + weights.element_size())
        + n * (targets.element_size() + 4 + (4 if tail is not None else 0))
    )
    kw = dict(temperature=args.temperature)
    leaf = logits.clone().requires_grad_()
    inplace_leaf = logits.clone().requires_grad_()
    del logits
    rows: list[dict] = []

    def add(impl, pass_, fn, grads=None, bytes_moved=None):  # noqa: ANN001
        row = dict(base, mode=mode, impl=impl, **{"pass": pass_})
        try:
            ms = time_ms(
                fn, grad_to_none=grads, rep_ms=args.rep_ms, warmup_ms=args.warmup_ms, cpu_reps=args.cpu_reps
            )
            row.update(ms=ms[0], ms_p20=ms[1], ms_p80=ms[2], **{"peak extra MiB": peak_extra_mb(fn)})
            if bytes_moved is not None:
                row["GB/s"] = bytes_moved / ms[0] / 1e6
                row["% copy"] = 100.0 * row["GB/s"] / copy_gbs
        except torch.OutOfMemoryError:
            row["note"] = "out of memory"
        except Exception as exc:  # noqa: BLE001 (one failing row must not stop the others)
            row["note"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        for tensor in grads or []:
            tensor.grad = None
        if device == "cuda" and "note" in row:
            torch.cuda.empty_cache()
        rows.append(row)
        append_jsonl(args.jsonl, dict(row, part="kernel"))

    def skip(impl, pass_, why):  # noqa: ANN001
        row = dict(base, mode=mode, impl=impl, note=why, **{"pass": pass_})
        rows.append(row)
        append_jsonl(args.jsonl, dict(row, part="kernel"))

    def ours_fwd(block_v=None):  # noqa: ANN001
        return sparse_kd_loss(leaf, targets, ids, weights, tail, backend="triton", block_v=block_v, **kw)

    def inplace_fwd():
        return sparse_kd_loss(
            inplace_leaf, targets, ids, weights, tail, backend="triton", inplace_grad=True, **kw
        )

    add("ours", "fwd", ours_fwd, bytes_moved=must_move)
    add("ours", "fwd+bwd", lambda: ours_fwd().backward(), grads=[leaf], bytes_moved=must_move)
    add("ours-inplace", "fwd", inplace_fwd, bytes_moved=must_move)
    add(
        "ours-inplace",
        "fwd+bwd",
        lambda: inplace_fwd().backward(),
        grads=[inplace_leaf],
        bytes_moved=must_move,
    )
    if args.sweep_blocks:
        for block_v in (1024, 2048, 4096, 8192, 16384, 32768):
            if block_v <= 2 * vocab:
                add(f"ours BLOCK_V={block_v}", "fwd", lambda b=block_v: ours_fwd(b), bytes_moved=must_move)
    if not args.skip_eager:
        add("eager", "fwd", lambda: sparse_kd_loss_reference(leaf, targets, ids, weights, tail, **kw))
        add(
            "eager",
            "fwd+bwd",
            lambda: sparse_kd_loss_reference(leaf, targets, ids, weights, tail, **kw).backward(),
            grads=[leaf],
        )
        compile_modes = (args.compile_modes or args.modes).split(",")
        if mode in compile_modes:
            compiled = torch.compile(sparse_kd_loss_reference, dynamic=False, backend=args.compile_backend)
            add(
                "torch.compile",
                "fwd+bwd",
                lambda: compiled(leaf, targets, ids, weights, tail, **kw).backward(),
                grads=[leaf],
            )
        else:
            skip("torch.compile", "fwd+bwd", "skipped: not in --compile-modes")
    if peers:
        liger_ce, note = import_peer("liger_kernel.transformers", "LigerCrossEntropyLoss", device=device)
        if note:
            skip("liger CE only", "fwd+bwd", note)
        else:
            liger = liger_ce()
            add("liger CE only", "fwd", lambda: liger(leaf, targets), bytes_moved=must_move)
            add(
                "liger CE only",
                "fwd+bwd",
                lambda: liger(leaf, targets).backward(),
                grads=[leaf],
                bytes_moved=must_move,
            )
    eager = {r["pass"]: r["ms"] for r in rows if r["impl"] == "eager" and "ms" in r}
    for row in rows:
        if row.get("pass") in eager and "ms" in row:
            row["x vs eager"] = eager[row["pass"]] / row["ms"]
    return rows


def run(args) -> list[dict]:  # noqa: ANN001
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    facts = dict(device=device_name(), date=today(), commit=git_commit())
    rows: list[dict] = []
    for shape in args.shapes.split(","):
        n, vocab, k = (int(x) for x in shape.lower().split("x"))
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, DTYPES[dtype_name])
            copy_ms, copy_gbs = copy_bandwidth(n, vocab, dtype, device, args)
            base = dict(facts, shape=f"{n}x{vocab}x{k}", dtype=dtype_name)
            copy_row = dict(
                base,
                mode="-",
                impl="copy",
                ms=copy_ms[0],
                ms_p20=copy_ms[1],
                ms_p80=copy_ms[2],
                **{"pass": "copy", "GB/s": copy_gbs, "% copy": 100.0},
            )
            rows.append(copy_row)
            append_jsonl(args.jsonl, dict(copy_row, part="kernel"))
            for index, mode in enumerate(args.modes.split(",")):
                # the CE-only peer does not depend on the cache mode: measured once per shape and dtype
                rows.extend(
                    bench_mode(args, base, n, vocab, k, dtype, mode, copy_gbs, device, peers=index == 0)
                )
                if device == "cuda":
                    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> None:  # noqa: ANN001
    args = parse_args(argv)
    args.cpu_reps = 3
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.shapes, args.dtypes = "7x300x5", "fp32"
        args.compile_backend, args.cpu_reps = "eager", 2
    report_rows(run(args), COLUMNS, args.csv, smoke=args.smoke)


if __name__ == "__main__":
    main()
