"""`pipe prepare-data`: corpus → tokenizer.json + packed token windows (Zarr v3) + manifest.

Output folder (``RUN/data``)::

    tokenizer.json      HF tokenizers ByteLevel BPE trained on the train split, or the pretrained
                        tokenizer of ``data.tokenizer`` (saved with its HF files beside it)
    windows.zarr/       Zarr v3 group; arrays train, dev, test of shape (windows, seq_len)
    manifest.json       counts, SHA-256 of inputs, tokenizer and each split's windows
    provenance.json     resolved config, versions, command (not part of the deterministic output)
    COMPLETE.json       written last

Each split is one token stream: every document contributes ``<s> tokens </s>``, and the stream
is cut into consecutive windows of ``seq_len`` tokens (the remainder, < seq_len tokens, is
dropped and counted in the manifest). The same corpus and config give identical bytes. With a
pretrained tokenizer, ``<s>`` is its BOS token and ``</s>`` its EOS token; a tokenizer without a
BOS token (Qwen2) or whose BOS is its EOS (GPT-2) gives ``tokens </s>``. The vocabulary size is the
tokenizer's (largest id + 1, added tokens included).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from logitcache.cache.hashing import array_sha256, file_sha256
from logitcache.pipeline.config import Config, data_fingerprint
from logitcache.pipeline.corpus import SPLITS, Document, read_corpus
from logitcache.pipeline.errors import DataError, StageError
from logitcache.pipeline.preflight import (
    StageLock,
    check_writable,
    finish_replacement,
    move_aside,
    replaced_path,
)
from logitcache.pipeline.progress import progress_bar
from logitcache.pipeline.rundir import (
    RunLayout,
    atomic_write_text,
    mark_complete,
    read_marker,
    stage_is_done,
    write_provenance,
)
from logitcache.pipeline.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    load_hf_tokenizer,
    load_pretrained_tokenizer,
    train_bpe,
    vocabulary_size,
)

MANIFEST_VERSION = 1
WINDOW_CHUNK_ROWS = 1024


def window_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def _pack(
    docs: list[list[int]], seq_len: int, dtype: np.dtype, prefix: list[int], suffix: list[int]
) -> tuple[np.ndarray, int]:
    """Concatenate ``prefix doc suffix`` streams and cut them into (windows, seq_len); return leftover count."""
    extra = len(prefix) + len(suffix)
    total = sum(len(ids) + extra for ids in docs)
    stream = np.empty(total, dtype=dtype)
    pos = 0
    for ids in docs:
        for part in (prefix, ids, suffix):
            stream[pos : pos + len(part)] = part
            pos += len(part)
    n_windows = total // seq_len
    return stream[: n_windows * seq_len].reshape(n_windows, seq_len), total - n_windows * seq_len


def _document_tokens(bos: int | None, eos: int | None, where: str) -> tuple[list[int], list[int]]:
    """The ids put before and after every document: ``<s>`` and ``</s>`` (see the module doc)."""
    if bos is None and eos is None:
        raise DataError(
            f"Expected the tokenizer {where} to define an EOS or BOS token (documents are separated by them). "
            "Got neither: set eos_token in its tokenizer_config.json."
        )
    prefix = [bos] if bos is not None and bos != eos else []
    suffix = [eos] if eos is not None else []
    return prefix, suffix


def _write_windows(group: zarr.Group, name: str, windows: np.ndarray) -> None:
    chunk_rows = max(1, min(WINDOW_CHUNK_ROWS, windows.shape[0]))
    array = group.create_array(
        name,
        shape=windows.shape,
        dtype=windows.dtype,
        chunks=(chunk_rows, windows.shape[1]),
        compressors=[ZstdCodec(level=3), Crc32cCodec()],
        fill_value=0,
    )
    if windows.size:
        array[...] = windows


def prepare_data(config: Config, *, overwrite: bool = False, progress: bool | None = None) -> Path:
    """Build ``RUN/data`` from ``config.data``; return its path. Skips if already complete."""
    layout = RunLayout(config.run_dir)
    out = layout.data
    fingerprint = data_fingerprint(config)
    if stage_is_done(out, fingerprint, overwrite=overwrite, what="prepared data"):
        return out
    check_writable(out, "the prepared data")
    data = config.data
    sources, splits = read_corpus(data)
    if not splits["train"]:
        raise DataError(
            "Expected documents in the train split. Got none: the corpus is too small or all held out."
        )
    special = {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID}  # the trained tokenizer's
    pretrained = None
    if data.tokenizer:  # checked before anything is written
        pretrained = load_pretrained_tokenizer(data.tokenizer)
        special = {
            "pad": pretrained.pad_token_id,
            "bos": pretrained.bos_token_id,
            "eos": pretrained.eos_token_id,
        }
    framing = _document_tokens(special["bos"], special["eos"], f"at {data.tokenizer}")
    with StageLock(out, "the prepared data"):
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _build(config, tmp, sources, splits, fingerprint, progress, pretrained, special, framing)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # an error (or Ctrl-C) leaves nothing behind
            raise
        # Replace without a gap: the old folder goes aside, the new one takes its place, then the old
        # one is deleted; an interruption in between leaves the old data at RUN/data.replaced.
        aside = replaced_path(out)
        move_aside(out, aside, is_complete=True)
        tmp.rename(out)
        finish_replacement(aside)
    return out


def _build(
    config: Config,
    tmp: Path,
    sources: list[Any],
    splits: dict[str, list[Document]],
    fingerprint: str,
    progress: bool | None,
    pretrained: Any,
    special: dict[str, int | None],
    framing: tuple[list[int], list[int]],
) -> None:
    """Write the whole prepared-data folder into ``tmp`` (see the module docstring). ``pretrained``:
    the HF tokenizer of ``data.tokenizer`` (None: train one); ``special``: its pad/bos/eos ids;
    ``framing``: the token ids put before and after every document."""
    data = config.data
    prefix, suffix = framing
    tmp.mkdir(parents=True)
    if pretrained is None:
        tokenizer = train_bpe(
            (d.text for d in splits["train"]), vocab_size=data.vocab_size, min_frequency=data.min_frequency
        )
        tokenizer.save(str(tmp / "tokenizer.json"))
        # Re-save through transformers so the folder also holds tokenizer_config.json (special tokens):
        # AutoTokenizer.from_pretrained(RUN/data) then works, and teachers copy these files as they are.
        load_hf_tokenizer(tmp / "tokenizer.json").save_pretrained(tmp)
    else:
        # The teachers' tokenizer as it is: its HF files (tokenizer.json among them) go to RUN/data.
        pretrained.save_pretrained(tmp)
        tokenizer = pretrained.backend_tokenizer
        tokenizer.no_truncation()  # documents are encoded whole (a tokenizer.json may enable either)
        tokenizer.no_padding()
    vocab_size = vocabulary_size(tokenizer.get_vocab(with_added_tokens=True))

    dtype = window_dtype(vocab_size)
    group = zarr.open_group(tmp / "windows.zarr", mode="w", zarr_format=3)
    split_stats: dict[str, Any] = {}
    for split in SPLITS:
        docs: list[Document] = splits[split]
        encoded = []
        for start in progress_bar(
            range(0, len(docs), 256), desc=f"tokenize {split}", progress=progress, leave=False
        ):
            batch = tokenizer.encode_batch(
                [d.text for d in docs[start : start + 256]], add_special_tokens=False
            )
            encoded.extend(e.ids for e in batch)
        windows, leftover = _pack(encoded, data.seq_len, dtype, prefix, suffix)
        if split in ("train", "dev") and windows.shape[0] == 0:
            more = (
                "lower data.dev_fraction or data.test_fraction (train gets the rest)"
                if split == "train"
                else "raise data.dev_fraction"
            )
            held = sum(len(e) + len(prefix) + len(suffix) for e in encoded)
            raise DataError(
                f"The {split} split holds {held} tokens, fewer than one window of "
                f"data.seq_len={data.seq_len}. Use a larger corpus, a smaller seq_len, or {more}."
            )
        _write_windows(group, split, windows)
        split_stats[split] = {
            "documents": len(docs),
            "words": sum(len(d.text.split()) for d in docs),
            "tokens": int(sum(len(e) for e in encoded)),
            "windows": int(windows.shape[0]),
            "dropped_tokens": int(leftover),
            "windows_sha256": array_sha256(windows),
        }

    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "data_config": asdict(data),
        "vocab_size": vocab_size,
        "seq_len": data.seq_len,
        "window_dtype": dtype.name,
        "special_tokens": special,
        "document_tokens": {"prefix": prefix, "suffix": suffix},
        "tokenizer_source": data.tokenizer or "trained",  # a pretrained tokenizer's folder, or trained here
        "inputs": [{"path": s.rel, "sha256": s.sha256, "bytes": s.bytes} for s in sources],
        "tokenizer_sha256": file_sha256(tmp / "tokenizer.json"),
        "splits": split_stats,
    }
    atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    write_provenance(tmp, config, "prepare-data")
    mark_complete(tmp, fingerprint, {s: split_stats[s]["windows"] for s in SPLITS})


@dataclass(frozen=True)
class PreparedData:
    """A prepared ``RUN/data`` folder, opened for reading."""

    root: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, root: str | Path) -> PreparedData:
        root = Path(root)
        if read_marker(root) is None:
            raise StageError(f"Expected prepared data in {root}. Run `pipe prepare-data CONFIG` first.")
        return cls(root, json.loads((root / "manifest.json").read_text()))

    @property
    def tokenizer_path(self) -> Path:
        return self.root / "tokenizer.json"

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def token_ids(self) -> dict[str, int | None]:
        """The special token ids a model of this data gets (``bos_token_id``, ``eos_token_id``, ``pad_token_id``)."""
        special = self.manifest["special_tokens"]
        return {f"{name}_token_id": special.get(name) for name in ("bos", "eos", "pad")}

    def hf_tokenizer(self) -> Any:  # -> PreTrainedTokenizerFast
        """The data's tokenizer through transformers, as models made from this data save it."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.root, trust_remote_code=False)

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])

    def windows(self, split: str) -> np.ndarray:
        """All windows of a split, (windows, seq_len), in their stored integer dtype."""
        group = zarr.open_group(self.root / "windows.zarr", mode="r")
        return group[split][...]

    def windows_sha256(self, split: str) -> str:
        return str(self.manifest["splits"][split]["windows_sha256"])

    def describe(self) -> str:
        """``vocab 4096, train 1200 windows, dev 60 windows, test 60 windows`` (what `pipe prepare-data` prints)."""
        splits = ", ".join(f"{name} {s['windows']} windows" for name, s in self.manifest["splits"].items())
        return f"vocab {self.vocab_size}, {splits}"


@dataclass(frozen=True)
class TokenWindows:
    """Token windows (N, T) and the tokenizer that made them: what a cache is computed over.

    The cache records ``tokenizer_sha256`` (of ``tokenizer.json``), ``windows_sha256``
    (:func:`~logitcache.cache.array_sha256` of the windows as given, dtype included) and
    ``vocab_size`` (the tokenizer's, added tokens included), so that readers can check that they
    pair the cache with the same windows. :meth:`from_prepared` gives a prepared split with the
    values its manifest recorded (identical to what :meth:`of` computes from the same arrays).
    """

    windows: np.ndarray  # (N, T) integer token ids
    tokenizer_path: Path
    vocab_size: int
    tokenizer_sha256: str
    windows_sha256: str

    @property
    def seq_len(self) -> int:
        return int(self.windows.shape[1])

    @classmethod
    def from_prepared(cls, data: PreparedData, split: str = "train") -> TokenWindows:
        return cls(
            windows=data.windows(split),
            tokenizer_path=data.tokenizer_path,
            vocab_size=data.vocab_size,
            tokenizer_sha256=str(data.manifest["tokenizer_sha256"]),
            windows_sha256=data.windows_sha256(split),
        )

    @classmethod
    def of(cls, windows: Any, tokenizer: str | Path) -> TokenWindows:
        """Windows (N, T) of ids from ``tokenizer`` (a ``tokenizer.json`` or a folder holding one).

        Refused (:class:`DataError`): a tokenizer file that is missing, windows that are not a
        2-D integer array with ``T >= 2``, ids outside ``[0, vocab_size)``.
        """
        from tokenizers import Tokenizer

        path = Path(tokenizer)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(
                f"Expected a tokenizer.json at {path}. Found none; pass the tokenizer the windows were made with."
            )
        array = np.asarray(windows)
        if array.ndim != 2 or array.shape[1] < 2 or array.shape[0] < 1 or array.dtype.kind not in "iu":
            raise DataError(
                f"Expected windows of shape (N, T) with N >= 1, T >= 2 and an integer dtype. "
                f"Got shape {array.shape}, dtype {array.dtype}."
            )
        vocab_size = Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= vocab_size:
            raise DataError(
                f"Expected token ids in [0, {vocab_size}) (the vocabulary of {path}). Got ids in [{low}, {high}]."
            )
        return cls(array, path, vocab_size, file_sha256(path), array_sha256(array))
