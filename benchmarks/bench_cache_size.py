"""Cache size, throughput and fidelity for every value/id encoding, codec setting and k.

    .venv/bin/python -m benchmarks.bench_cache_size --teacher RUN/teachers/llama --teacher RUN/teachers/gpt2 \\
        --windows RUN/data --split dev --num-windows 64 --csv bench_cache_size.csv

Without ``--teacher`` it runs a small randomly initialised LlamaForCausalLM over random windows:
that only checks that the script runs; its numbers are NOT REAL (a random model's distribution is
nearly flat, unlike a trained LM's) and every row says so in the ``source`` column.

Per row (one cache written with the library's writer to a temp dir, then read back):

* ``B/pos``: bytes on disk of the ids, values and tail shard files per position (``B/entry`` = / k);
* ``write``: positions/s of ``create_cache`` + encode + compress + write of every shard;
* ``rd_block`` / ``rd_scat``: positions/s of ``read_windows`` on random aligned blocks of
  ``windows_per_chunk`` windows, and on 16 scattered windows per call (decode included);
* fidelity at T = 1, against a student whose logits are the teacher's log-probabilities plus
  unit Gaussian noise (seeded), per position, averaged:
  ``q_loss`` = |sparse KL from the cache - sparse KL from the exact float64 top-k| (renormalised
  weights: the encoding's error; target < 1e-3 nats), ``q_loss_g`` the same in ghost-bucket mode,
  ``q_grad`` = L1 norm of the difference of the gradients w.r.t. the student logits
  (= sum |w_cache - w_exact|), ``full_loss`` / ``full_loss_g`` = |loss from the cache - KL(p || q)
  over the full vocabulary| (truncation + encoding), ``full_grad`` / ``full_grad_g`` = L1 of the
  gradient difference against the full-vocabulary KL gradient ``q - p``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import git_commit
from logitcache.cache import (
    SAMPLED_ENCODING,
    CacheMetadata,
    Compressor,
    Encoding,
    TeacherInfo,
    create_cache,
    ensemble_logprobs,
    open_cache,
    select_hybrid,
    select_sampled,
    select_topk,
)
from logitcache.cache.metadata import VALUE_CODES as FORMAT_VALUE_CODES
from logitcache.cache.select import HybridSelection, SampledSelection, TopkSelection

# every value code of the format except the sampled mode's counts and the uncompressed float32 reference
VALUE_CODES = tuple(code for code in FORMAT_VALUE_CODES if code not in ("count", "logp_fp32"))
CODECS = {
    "zstd3-bit": Compressor("zstd", 3, "bitshuffle"),
    "zstd3-byte": Compressor("zstd", 3, "shuffle"),
    "zstd3-none": Compressor("zstd", 3, "noshuffle"),
    "zstd1-bit": Compressor("zstd", 1, "bitshuffle"),
    "zstd7-bit": Compressor("zstd", 7, "bitshuffle"),
    "lz4-5-bit": Compressor("lz4", 5, "bitshuffle"),
}
DEFAULT_CODEC = "default"  # Encoding() defaults: see docs/cache-format.md
FAKE_SHA = hashlib.sha256(b"benchmark").hexdigest()


# ------------------------------------------------------------------------------------------ inputs


def random_teacher_logits(
    num_windows: int, seq_len: int, vocab: int, seed: int
) -> tuple[list[torch.Tensor], list[str]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=seq_len,
    )
    model = LlamaForCausalLM(config).eval()
    windows = torch.randint(0, vocab, (num_windows, seq_len), generator=torch.Generator().manual_seed(seed))
    return [forward(model, windows)], ["random-init-llama"]


def forward(model: torch.nn.Module, windows: torch.Tensor, batch: int = 8) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch):
            outs.append(model(input_ids=windows[start : start + batch]).logits.float())  # (B, T, V)
    return torch.cat(outs)


def load_windows(path: str, split: str, num_windows: int, seed: int) -> np.ndarray:
    if path.endswith(".npy"):
        windows = np.load(path)
    else:
        from logitcache.pipeline.prepare import PreparedData

        windows = PreparedData.open(path).windows(split)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(windows.shape[0], size=min(num_windows, windows.shape[0]), replace=False))
    return windows[pick].astype(np.int64)


def real_teacher_logits(dirs: list[str], windows: np.ndarray) -> tuple[list[torch.Tensor], list[str]]:
    from transformers import AutoModelForCausalLM

    logits, names = [], []
    tokens = torch.from_numpy(windows)
    for directory in dirs:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        logits.append(forward(model, tokens))
        names.append(Path(directory).name)
    return logits, names


# ------------------------------------------------------------------------------------------ measurement


def stored_bytes(root: Path, name: str) -> int:
    return (
        sum(p.stat().st_size for p in (root / name / "c").rglob("*") if p.is_file())
        if (root / name).exists()
        else 0
    )


def write_cache(root: Path, metadata: CacheMetadata, selection, per_chunk: int, per_shard: int) -> float:  # noqa: ANN001
    num_windows, seq_len = selection.entropy.shape  # (N, T) in every mode
    start_time = time.perf_counter()
    writer = create_cache(
        root,
        metadata,
        num_windows=num_windows,
        seq_len=seq_len,
        windows_per_chunk=per_chunk,
        windows_per_shard=per_shard,
    )
    for shard in writer.pending_shards():
        a, b = writer.shard_rows(shard)
        fields = {f: getattr(selection, f)[a:b] for f in selection.__dataclass_fields__}
        writer.write_shard(shard, type(selection)(**fields))
    writer.finalize()
    return time.perf_counter() - start_time


def read_rates(root: Path, per_chunk: int, seed: int, min_seconds: float = 0.3) -> tuple[float, float]:
    reader = open_cache(root)
    rng = np.random.default_rng(seed)
    n, t = reader.num_windows, reader.seq_len
    blocks = max(1, n // per_chunk)
    positions, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        b = int(rng.integers(blocks))
        reader.read_windows(slice(b * per_chunk, min(n, (b + 1) * per_chunk)))
        positions += min(n, (b + 1) * per_chunk) - b * per_chunk
    block_rate = positions * t / (time.perf_counter() - start)
    positions, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        idx = rng.choice(n, size=min(16, n), replace=False)
        reader.read_windows(idx)
        positions += len(idx)
    return block_rate, positions * t / (time.perf_counter() - start)


def fidelity(
    root: Path,
    teacher_logp: torch.Tensor,
    student_logp: torch.Tensor,
    exact: TopkSelection | SampledSelection | HybridSelection,
    chunk: int = 512,
) -> dict[str, float]:
    """Errors per position (means), see the module docstring. All in float64."""
    reader = open_cache(root)
    renorm = reader.read_windows(slice(None))
    ghost = reader.read_windows(slice(None), weights="ghost") if reader.metadata.mode == "topk" else None
    vocab = teacher_logp.shape[-1]
    flat = lambda x: x.reshape(-1, x.shape[-1]) if x.dim() == 3 else x.reshape(-1)  # noqa: E731
    p_all, q_all = flat(teacher_logp), flat(student_logp)
    ids_c, w_c = flat(renorm.ids), flat(renorm.weights).double()
    ids_x = flat(exact.ids) if isinstance(exact, TopkSelection) else None
    sums = {
        key: 0.0
        for key in ("q_loss", "q_loss_g", "q_grad", "full_loss", "full_loss_g", "full_grad", "full_grad_g")
    }
    n = p_all.shape[0]
    for s in range(0, n, chunk):
        logp = p_all[s : s + chunk].double()  # (P, V)
        logq = q_all[s : s + chunk].double()
        p, q = logp.exp(), logq.exp()
        kl_full = (p * (logp - logq)).sum(-1)  # (P,)
        ids, w = ids_c[s : s + chunk], w_c[s : s + chunk]
        dense = torch.zeros_like(p).scatter_add_(-1, ids, w)  # (P, V), padding slots add 0
        xlogx = lambda x: torch.where(x > 0, x * torch.log(x.clamp_min(1e-300)), torch.zeros_like(x))  # noqa: E731
        loss_c = (xlogx(w) - w * logq.gather(-1, ids)).sum(-1)
        sums["full_loss"] += float((loss_c - kl_full).abs().sum())
        sums["full_grad"] += float((p - dense).abs().sum())
        if isinstance(exact, TopkSelection):
            ix = ids_x[s : s + chunk]
            px = p.gather(-1, ix)
            wx = px / px.sum(-1, keepdim=True)
            loss_x = (xlogx(wx) - wx * logq.gather(-1, ix)).sum(-1)
            dense_x = torch.zeros_like(p).scatter_add_(-1, ix, wx)
            sums["q_loss"] += float((loss_c - loss_x).abs().sum())
            sums["q_grad"] += float((dense - dense_x).abs().sum())
            # ghost bucket: stored entries + tail, the tail against the student's mass outside the ids
            assert ghost is not None
            wg = flat(ghost.weights)[s : s + chunk].double()
            tail = flat(ghost.tail)[s : s + chunk].double()
            q_in = q.gather(-1, ids).sum(-1)
            loss_g = (xlogx(wg) - wg * logq.gather(-1, ids)).sum(-1) + xlogx(tail) - tail * torch.log1p(-q_in)
            tail_x = (1 - px.sum(-1)).clamp_min(0)
            qx_in = q.gather(-1, ix).sum(-1)
            loss_gx = (
                (xlogx(px) - px * logq.gather(-1, ix)).sum(-1) + xlogx(tail_x) - tail_x * torch.log1p(-qx_in)
            )
            sums["q_loss_g"] += float((loss_g - loss_gx).abs().sum())
            sums["full_loss_g"] += float((loss_g - kl_full).abs().sum())
            in_set = torch.zeros_like(p).scatter_(-1, ids, 1.0) > 0
            target = torch.where(
                in_set, torch.zeros_like(p).scatter_add_(-1, ids, wg), tail[:, None] * q / (1 - q_in)[:, None]
            )
            sums["full_grad_g"] += float((p - target).abs().sum())
    del vocab
    out = {key: value / n for key, value in sums.items()}
    if not isinstance(exact, TopkSelection):  # sampled, hybrid: no exact top-k to compare with
        for key in ("q_loss", "q_loss_g", "q_grad", "full_loss_g", "full_grad_g"):
            out[key] = float("nan")
    return out


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--teacher", action="append", default=[], help="HF model dir (repeat for an ensemble)"
    )
    parser.add_argument("--windows", help="prepared data folder (RUN/data) or a .npy of (N, T) token windows")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--num-windows", type=int, default=16)
    parser.add_argument("--random-vocab", type=int, default=16000)
    parser.add_argument("--random-seq-len", type=int, default=128)
    parser.add_argument("--ks", default="8,16,32,64,128")
    parser.add_argument("--codes", default=",".join(VALUE_CODES))
    parser.add_argument("--id-codes", default="sorted_gaps,rank")
    parser.add_argument(
        "--chunk-windows", type=int, default=4, help="windows per inner chunk for the main sweep"
    )
    parser.add_argument(
        "--chunk-sweep", default="1,4,16,64", help="windows_per_chunk values for the read-rate sweep"
    )
    parser.add_argument("--sampled", action="store_true", help="also write sampled-mode caches (n = k)")
    parser.add_argument(
        "--hybrid", default="", help="hybrid caches to write, as HEAD+DRAWS pairs, e.g. 32+32,32+64"
    )
    parser.add_argument(
        "--csv", default="bench_cache_size.csv", help="CSV file to append rows to ('' = none)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.teacher:
        if not args.windows:
            parser.error("--teacher needs --windows")
        windows = load_windows(args.windows, args.split, args.num_windows, args.seed)
        logits, names = real_teacher_logits(args.teacher, windows)
        source = "real:" + "+".join(names)
    else:
        logits, names = random_teacher_logits(
            args.num_windows, args.random_seq_len, args.random_vocab, args.seed
        )
        source = "RANDOM-INIT-NOT-REAL"
        print(
            "NOTE: no --teacher given: a randomly initialised Llama over random windows. These numbers are NOT REAL."
        )
    window_ids = list(range(logits[0].shape[0]))
    teacher_logp = ensemble_logprobs(logits, teacher_names=names, window_indices=window_ids)  # (N, T, V)
    del logits
    num_windows, seq_len, vocab = teacher_logp.shape
    noise = torch.randn(teacher_logp.shape, generator=torch.Generator().manual_seed(args.seed + 1))
    student_logp = torch.log_softmax(teacher_logp + noise, -1)
    del noise
    teachers = tuple(TeacherInfo(n, n, FAKE_SHA, "float32") for n in names)
    ks = [k for k in (int(x) for x in args.ks.split(",")) if k < vocab]
    stamp = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "device": f"{platform.machine()} {os.cpu_count()} cores",
        "source": source,
        "vocab": vocab,
        "seq_len": seq_len,
        "positions": num_windows * seq_len,
    }
    rows: list[dict[str, object]] = []
    per_chunk = min(args.chunk_windows, num_windows)

    def run(
        k: int,
        encoding: Encoding,
        selection,  # noqa: ANN001
        mode: str,
        codec: str,
        chunk_windows: int,
        with_fidelity: bool,
        tail_draws: int = 0,
    ) -> dict:
        metadata = CacheMetadata(
            vocab_size=vocab,
            tokenizer_sha256=FAKE_SHA,
            dataset_sha256=FAKE_SHA,
            teachers=teachers,
            k=k,
            package_version="bench",
            mode=mode,
            num_samples={"sampled": k, "hybrid": tail_draws}.get(mode),
            encoding=encoding,
        )
        with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
            root = Path(tmp) / "cache"
            seconds = write_cache(root, metadata, selection, chunk_windows, chunk_windows * 4)
            sizes = {name: stored_bytes(root, name) for name in ("ids", "values", "tail")}
            positions = num_windows * seq_len
            block, scattered = read_rates(root, chunk_windows, args.seed)
            fid = fidelity(root, teacher_logp, student_logp, selection) if with_fidelity else {}
        row = {
            **stamp,
            "mode": mode,
            "k": k,
            "id_code": encoding.id_code,
            "value_code": encoding.value_code,
            "codec": codec,
            "windows_per_chunk": chunk_windows,
            "B_pos": sum(sizes.values()) / positions,
            "B_entry": sum(sizes.values()) / positions / metadata.width,
            "ids_B_pos": sizes["ids"] / positions,
            "values_B_pos": sizes["values"] / positions,
            "tail_B_pos": sizes["tail"] / positions,
            "write_pos_s": positions / seconds,
            "read_block_pos_s": block,
            "read_scattered_pos_s": scattered,
            **fid,
        }
        rows.append(row)
        print_row(row)
        return fid

    print_header()
    fidelity_cache: dict[tuple[int, str], dict] = {}
    for k in ks:
        selection = select_topk(teacher_logp, k=k)
        for code in args.codes.split(","):
            for id_code in args.id_codes.split(","):
                key = (k, code)
                fid = run(
                    k,
                    Encoding(id_code=id_code, value_code=code),
                    selection,
                    "topk",
                    DEFAULT_CODEC,
                    per_chunk,
                    with_fidelity=key not in fidelity_cache,
                )
                if key in fidelity_cache:
                    rows[-1].update(fidelity_cache[key])  # fidelity depends on k and value code only
                else:
                    fidelity_cache[key] = fid
        if args.sampled:
            sampled = select_sampled(teacher_logp, num_samples=k, seed=args.seed, window_indices=window_ids)
            run(k, SAMPLED_ENCODING, sampled, "sampled", DEFAULT_CODEC, per_chunk, with_fidelity=True)
    for spec in filter(None, args.hybrid.split(",")):
        head, draws = (int(x) for x in spec.split("+"))
        hybrid = select_hybrid(
            teacher_logp, k=head, num_samples=draws, seed=args.seed, window_indices=window_ids
        )
        print(f"  (next row: hybrid, k = head {head}, plus {draws} tail draws)")
        run(
            head, Encoding(), hybrid, "hybrid", DEFAULT_CODEC, per_chunk, with_fidelity=True, tail_draws=draws
        )
    k_ref = 64 if 64 in ks else ks[-1]
    selection = select_topk(teacher_logp, k=k_ref)
    default = Encoding()
    print(f"\ncodec sweep (k={k_ref}, {default.id_code}/{default.value_code}; one codec for all arrays):")
    for codec, compressor in CODECS.items():
        run(
            k_ref,
            Encoding(value_code=default.value_code, compressor=compressor, id_compressor=compressor),
            selection,
            "topk",
            codec,
            per_chunk,
            False,
        )
    print(f"\nchunk sweep (k={k_ref}, default encoding): windows_per_chunk -> read rates")
    for chunk_windows in (int(x) for x in args.chunk_sweep.split(",")):
        if chunk_windows <= num_windows:
            run(k_ref, default, selection, "topk", DEFAULT_CODEC, chunk_windows, False)
    if args.csv:
        fields = list(dict.fromkeys(key for row in rows for key in row))
        new = not Path(args.csv).exists()
        with open(args.csv, "a", newline="") as handle:
            out = csv.DictWriter(handle, fieldnames=fields)
            if new:
                out.writeheader()
            out.writerows(rows)
        print(f"\nappended {len(rows)} rows to {args.csv}")
    if source.startswith("RANDOM"):
        print("REMINDER: numbers above come from a random-init model: NOT REAL.")


COLUMNS = [
    ("mode", 7, "s"),
    ("k", 4, "d"),
    ("id_code", 11, "s"),
    ("value_code", 10, "s"),
    ("codec", 10, "s"),
    ("windows_per_chunk", 5, "d"),
    ("B_pos", 7, ".1f"),
    ("B_entry", 6, ".2f"),
    ("ids_B_pos", 6, ".1f"),
    ("values_B_pos", 6, ".1f"),
    ("tail_B_pos", 5, ".1f"),
    ("write_pos_s", 8, ".0f"),
    ("read_block_pos_s", 8, ".0f"),
    ("read_scattered_pos_s", 8, ".0f"),
    ("q_loss", 8, ".1e"),
    ("q_loss_g", 8, ".1e"),
    ("q_grad", 8, ".1e"),
    ("full_loss", 8, ".1e"),
    ("full_loss_g", 8, ".1e"),
    ("full_grad", 8, ".1e"),
    ("full_grad_g", 8, ".1e"),
]
SHORT = {
    "windows_per_chunk": "wpc",
    "ids_B_pos": "ids",
    "values_B_pos": "vals",
    "tail_B_pos": "tail",
    "write_pos_s": "write/s",
    "read_block_pos_s": "rdblk/s",
    "read_scattered_pos_s": "rdsct/s",
}


def print_header() -> None:
    print(" ".join(f"{SHORT.get(name, name):>{width}}" for name, width, _ in COLUMNS))


def print_row(row: dict) -> None:
    cells = []
    for name, width, fmt in COLUMNS:
        value = row.get(name, "")
        cells.append(f"{value:>{width}{fmt}}" if value != "" else " " * width)
    print(" ".join(cells), flush=True)


if __name__ == "__main__":
    main()
