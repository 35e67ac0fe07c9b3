"""The student's training data: prepared windows joined with their cache rows, one micro-batch per read.

:class:`StudentDataset` is the dataset the shared loop iterates (see pipeline/data_order.py for
the order, the sampler and the DataLoader, the same for teachers and students). Its
``__getitems__`` takes the window indices of one micro-batch and reads them together: tokens from
the windows array, teacher entries from the cache by whole chunks (one slice read per run of
consecutive chunks), decoded at once for the whole batch. The student's order,
:func:`~logitcache.pipeline.data_order.block_shuffled_order` with a block of one cache chunk
(:func:`default_block`), keeps the micro-batches of a shuffle buffer within ``buffer_blocks``
chunks; each process keeps the raw chunks of about two buffers in memory, so a chunk is
decompressed once per buffer and process, not once per micro-batch.

Batch dict (CPU, pinned by the loader when training on CUDA; the loop copies it to the device)::

    input_ids        (B, T)         int64
    teacher_ids      (B, T - 1, k)  int32    cache entries of positions 0..T-2: the teacher's
    teacher_weights  (B, T - 1, k)  float32  distribution of tokens 1..T-1 (the targets);
    teacher_tail     (B, T - 1)     float32  the last position's entries are not read
                                             (tail only with weights = "ghost")

Ids are int32 (exact: ids < vocab_size < 2**31) to halve their transfer; the loss takes any
integer dtype. Negative ids (padding of a sampled cache) stay negative.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from logitcache.cache import CacheReader, decode_entries, open_cache
from logitcache.cache.encoding import DecodedEntries
from logitcache.cache.errors import CacheError, LogitcacheError
from logitcache.pipeline.data_order import Batch, WindowsDataset

IGNORE_INDEX = -100  # labels that are no target (the kernels' and transformers' default ignore_index)


class StudentDataset(WindowsDataset):
    """Item ``i`` = window ``i`` and its cached teacher targets; ``__getitems__`` reads a micro-batch.

    ``cache_store`` None: windows only (modes "online" and "ce"). ``weights``: "renormalized" or
    "ghost" (raw top-k probabilities + tail). ``cached_chunks``: raw chunks kept in memory per
    process (see :meth:`_read_cache_rows`). Picklable: each process opens its own cache reader.
    """

    def __init__(
        self,
        windows: np.ndarray,
        cache_store: Path | str | None,  # a path or a store URL (s3://...)
        weights: str = "renormalized",
        *,
        cached_chunks: int = 16,
    ):
        super().__init__(windows)
        self.cache_store = cache_store
        self.weights = weights
        self.cached_chunks = cached_chunks  # raw chunks kept per process (about one shuffle buffer's)
        self._reader: CacheReader | None = None
        self._reader_pid = -1
        if cache_store is not None:  # verified here, by the process that builds the dataset
            self._reader, self._reader_pid = open_cache(cache_store), os.getpid()
        self._recent: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()  # chunk -> raw arrays

    def __getstate__(self) -> dict[str, Any]:
        return {
            **self.__dict__,
            "_reader": None,
            "_reader_pid": -1,
            "_recent": OrderedDict(),
            "_chunk_pid": -1,
        }

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        """The batch of window ``indices`` (B,), as documented in the module docstring."""
        batch = super().__getitems__(indices)
        if self.cache_store is None:
            return batch
        cache = self._read_cache_rows(np.asarray(indices, dtype=np.int64))
        # Ids as int32: exact for any vocabulary, half the bytes of int64 to pin and copy.
        batch["teacher_ids"] = torch.from_numpy(cache.ids.astype(np.int32))  # (B, T-1, k)
        batch["teacher_weights"] = torch.from_numpy(cache.weights)  # (B, T-1, k) float32
        if cache.tail is not None:
            batch["teacher_tail"] = torch.from_numpy(cache.tail)  # (B, T-1) float32
        return batch

    @property
    def windows_per_chunk(self) -> int:
        """Windows per cache chunk (what one read decompresses); 1 without a cache."""
        return self._cache().layout.windows_per_chunk if self.cache_store is not None else 1

    def read(self, indices: torch.Tensor | Sequence[int]) -> Batch:
        """The batch of window ``indices`` (tests and tools; the loader calls ``__getitems__``)."""
        return self.__getitems__(torch.as_tensor(indices).tolist())

    def _cache(self) -> CacheReader:
        if self._reader is None or self._reader_pid != os.getpid():
            # a loader worker: its parent verified the cache when it built this dataset
            self._reader = open_cache(self.cache_store, verify=False)  # type: ignore[arg-type]
            self._reader_pid = os.getpid()
        return self._reader

    def _read_cache_rows(self, rows: np.ndarray) -> DecodedEntries:
        """Decoded cache entries of positions 0..T-2 of ``rows`` (any order), read by whole chunks.

        Same values as ``CacheReader.read_windows(rows)[:, :-1]`` (decoding is per position), but
        zarr reads slices several times faster than integer (orthogonal) selections, and it
        decompresses a whole chunk to read one row: the chunks a batch touches are read as slices
        (one per run of consecutive chunks not read yet) and the last ``cached_chunks`` of them are
        kept, so consecutive micro-batches of one shuffle buffer decompress each chunk once per
        process. Only the wanted rows are decoded.
        """
        reader = self._cache()
        chunk = reader.layout.windows_per_chunk
        chunk_of_row = rows // chunk  # (B,)
        chunks = self._chunks(reader, np.unique(chunk_of_row).tolist())
        first = next(iter(chunks.values()))
        raw = {
            name: np.empty((rows.size, array.shape[1] - 1, *array.shape[2:]), dtype=array.dtype)
            for name, array in first.items()
        }  # (B, T-1, k) ids and values, (B, T-1) tail
        for index, arrays in chunks.items():
            mine = np.flatnonzero(chunk_of_row == index)  # (b,) positions in the batch
            offsets = rows[mine] - index * chunk  # (b,) rows within the chunk
            for name, array in arrays.items():
                raw[name][mine] = array[offsets, :-1]
        return decode_entries(
            raw["ids"], raw["values"], raw.get("tail"), reader.metadata, weights=self.weights
        )

    def _chunks(self, reader: CacheReader, wanted: list[int]) -> dict[int, dict[str, np.ndarray]]:
        """The raw (encoded) arrays of each chunk in ``wanted`` (ascending), from memory or read now."""
        found = {index: self._recent[index] for index in wanted if index in self._recent}
        missing = [index for index in wanted if index not in found]
        chunk = reader.layout.windows_per_chunk
        for run in (
            np.split(np.asarray(missing), np.flatnonzero(np.diff(missing) != 1) + 1) if missing else []
        ):
            start, stop = int(run[0]) * chunk, min((int(run[-1]) + 1) * chunk, reader.num_windows)
            try:
                arrays = reader.read_raw(slice(start, stop))  # one slice read per run of chunks
            except Exception as exc:  # a chunk that fails its checksum or does not decode
                detail = str(exc) if isinstance(exc, LogitcacheError) else f"{type(exc).__name__}: {exc}"
                shards = sorted(
                    {start // reader.layout.windows_per_shard, (stop - 1) // reader.layout.windows_per_shard}
                )
                raise CacheError(
                    f"Cache windows {start}-{stop - 1} (shard {'-'.join(map(str, shards))}) of {self.cache_store} "
                    "could not be read. "
                    f"{detail[:300].rstrip('.')}. The cache is damaged: `pipe verify-cache` names the shard, "
                    "`pipe cache-logits CONFIG --overwrite` rebuilds it."
                ) from None
            for index in run.tolist():
                low = index * chunk - start
                found[index] = {name: array[low : low + chunk] for name, array in arrays.items()}
        for index in wanted:
            self._recent[index] = found[index]
            self._recent.move_to_end(index)
        while len(self._recent) > self.cached_chunks:
            self._recent.popitem(last=False)
        return {index: found[index] for index in wanted}


def chunks_per_two_buffers(*, block: int, buffer_blocks: int, windows_per_chunk: int) -> int:
    """Most cache chunks a micro-batch of the student's block-shuffled order can touch.

    A micro-batch lies within two consecutive buffers of ``buffer_blocks`` blocks each.

    A block starts at a multiple of ``block``, so it spans ``ceil(block / chunk)`` chunks, one
    more when ``block`` is not a multiple of the chunk size.
    """
    span = -(-block // windows_per_chunk) + (1 if block % windows_per_chunk else 0)
    return 2 * buffer_blocks * span


def default_block(num_windows: int, seq_len: int, k: int) -> int:
    """Windows per shuffle block when not configured: the inner chunk size of a default cache layout."""
    from logitcache.cache import default_layout

    return default_layout(num_windows=num_windows, seq_len=seq_len, k=k).windows_per_chunk


def tail_weights(tail: str, cache_mode: str) -> str:
    """How the reader gives a cache's weights for the loss's ``tail`` setting ("ghost" | "renormalize").

    A sampled cache has no tail (count/n already sums to 1): the tail setting applies to topk.
    """
    if tail not in ("ghost", "renormalize"):
        raise CacheError(f"Expected tail 'ghost' or 'renormalize'. Got {tail!r}.")
    return "ghost" if tail == "ghost" and cache_mode == "topk" else "renormalized"


class DistillationDataset(StudentDataset):
    """The public dataset of a cache (:func:`open_dataset`): the student's batches plus ``labels``.

    Item ``i`` (``dataset[i]``) or a micro-batch (``dataset.__getitems__(indices)``, what a
    ``DataLoader`` with a batch size calls)::

        input_ids        (T,)         int64    window i of the cached token windows
        labels           (T,)         int64    input_ids with labels[0] = -100 (never a target)
        teacher_ids      (T - 1, k)   int32    entries of positions 0..T-2: the teachers'
        teacher_weights  (T - 1, k)   float32  distribution of tokens 1..T-1
        teacher_tail     (T - 1,)     float32  mass outside the entries (tail "ghost" only)

    (with a leading batch dimension B for micro-batches). A causal LM's logits ``(T, V)`` of
    ``input_ids`` pair as ``logits[:-1]`` with ``labels[1:]`` and the teacher arrays. Reads keep
    the last ``cached_chunks`` decompressed chunks, so items read in order decompress each cache
    chunk once.
    """

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        batch = super().__getitems__(indices)
        labels = batch["input_ids"].clone()  # (B, T)
        # Position 0 is never predicted; marking it keeps transformers' count of target tokens
        # (num_items_in_batch) equal to the B * (T - 1) predicted positions, shifted or not.
        labels[:, 0] = IGNORE_INDEX
        return {**batch, "labels": labels}


def collate_batches(items: Sequence[Batch] | Batch) -> Batch:
    """A DataLoader's ``collate_fn`` for :class:`DistillationDataset`: items stacked into a batch.

    Given what ``__getitems__`` returns (already a batch dict), it is returned as it is.
    """
    if isinstance(items, dict):
        return items
    if not items:
        raise CacheError("Expected at least one item to collate. Got none.")
    return {name: torch.stack([item[name] for item in items]) for name in items[0]}


def open_dataset(
    cache: str | Path,
    data: str | Path | None = None,
    *,
    windows: np.ndarray | None = None,
    tail: str = "ghost",
    cached_chunks: int = 16,
) -> DistillationDataset:
    """Open a cache for training: a :class:`DistillationDataset` of its windows and entries.

    ``cache``: a cache stage folder (``RUN/cache``) or the store itself. The token windows the
    cache was computed over: ``windows`` (N, T) as given to :func:`build_cache`, else the train
    split of ``data`` (a prepared ``RUN/data`` folder; default: ``data`` beside ``RUN/cache``).
    Refused with one line: a cache that is damaged (quick verification) or made for other
    windows, another tokenizer or vocabulary. ``tail``: "ghost" (raw top-k probabilities plus the
    tail mass) or "renormalize" (top-k weights scaled to sum to 1); a sampled cache has no tail.
    """
    from logitcache.pipeline.prepare import PreparedData
    from logitcache.pipeline.rundir import locate_cache_store
    from logitcache.pipeline.teacher_signal import open_checked_cache

    store = locate_cache_store(cache)
    if windows is not None:
        from logitcache.cache import array_sha256

        windows = np.asarray(windows)
        if windows.ndim != 2:
            raise CacheError(f"Expected windows of shape (N, T). Got shape {windows.shape}.")
        expected = {"tokenizer_sha256": None, "dataset_sha256": array_sha256(windows), "vocab_size": None}
    else:
        prepared = PreparedData.open(data if data is not None else store.parent.parent / "data")
        windows = prepared.windows("train")
        expected = {
            "tokenizer_sha256": prepared.manifest["tokenizer_sha256"],
            "dataset_sha256": prepared.windows_sha256("train"),
            "vocab_size": prepared.vocab_size,
        }
    reader = open_checked_cache(store, num_windows=windows.shape[0], seq_len=windows.shape[1], **expected)
    weights = tail_weights(tail, reader.metadata.mode)
    return DistillationDataset(windows, store, weights, cached_chunks=cached_chunks)
