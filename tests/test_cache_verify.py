"""verify_cache finds and names every kind of damage: flipped bytes, truncation, deletion, bad values."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore

from logitcache.cache import SAMPLED_ENCODING, Encoding, open_cache, verify_cache
from logitcache.cache.faults import sweep_store
from logitcache.cache.layout import DIGESTS_ARRAY, shard_key
from logitcache.cache.writer import CacheWriter, read_attrs, shard_digests
from logitcache.pipeline.errors import CacheError
from tests.test_cache_format import SHA_A, SHA_B, make_metadata, write_all


@pytest.fixture(scope="module")
def good_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("verify") / "good"
    write_all(root, make_metadata())
    return root


@pytest.fixture
def cache_copy(good_cache: Path, tmp_path: Path) -> Path:
    target = tmp_path / "c"
    shutil.copytree(good_cache, target)
    return target


def _shard_file(root: Path, name: str, shard: int) -> Path:
    return root / shard_key(name, shard, 3 if name != "tail" else 2)


def test_good_cache_verifies(good_cache: Path) -> None:
    report = verify_cache(good_cache, dataset_sha256=SHA_B, tokenizer_sha256=SHA_A)
    assert report.ok, report.to_dict()
    assert [s.shard for s in report.shards] == [0, 1, 2]
    data = json.loads(json.dumps(report.to_dict()))  # JSON-serialisable for --json
    assert data["ok"] is True and data["bad_shards"] == []


def test_sampled_and_other_codes_verify(tmp_path: Path) -> None:
    for i, md in enumerate(
        [
            make_metadata(mode="sampled", num_samples=8, encoding=SAMPLED_ENCODING),
            make_metadata(encoding=Encoding(value_code="logp_q12")),
            make_metadata(encoding=Encoding(id_code="rank", value_code="logp_bf16")),
        ]
    ):
        write_all(tmp_path / str(i), md)
        report = verify_cache(tmp_path / str(i))
        assert report.ok, report.to_dict()


def test_hash_mismatch_reported(good_cache: Path) -> None:
    report = verify_cache(good_cache, dataset_sha256=SHA_A)
    assert not report.ok
    assert any("dataset_sha256 mismatch" in p for p in report.problems)


@pytest.mark.parametrize("name", ["ids", "values", "tail"])
def test_random_byte_flips_are_found_and_named(cache_copy: Path, name: str) -> None:
    """Every single-byte flip anywhere in a shard file is detected (crc32c in chunks and in the index)."""
    rng = np.random.default_rng(hash(name) % 2**32)
    shard = 1
    path = _shard_file(cache_copy, name, shard)
    original = path.read_bytes()
    for offset in rng.choice(len(original), size=6, replace=False):
        damaged = bytearray(original)
        damaged[offset] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(damaged))
        report = verify_cache(cache_copy)
        assert report.bad_shards == [shard], (offset, report.to_dict())
        assert any(f"array '{name}'" in p for p in report.shards[shard].problems)
    path.write_bytes(original)
    assert verify_cache(cache_copy).ok


@pytest.mark.parametrize("name", ["ids", "values", "tail"])
def test_truncated_and_deleted_shards_are_found(cache_copy: Path, name: str) -> None:
    path = _shard_file(cache_copy, name, 0)
    original = path.read_bytes()
    for size in (0, 1, len(original) // 2, len(original) - 1):
        path.write_bytes(original[:size])
        report = verify_cache(cache_copy)
        assert report.bad_shards == [0], (size, report.to_dict())
        assert "unreadable" in report.shards[0].problems[0]
    path.unlink()
    report = verify_cache(cache_copy)
    assert report.bad_shards == [0]
    assert report.shards[0].problems == [
        f"array '{name}', file {shard_key(name, 0, 3 if name != 'tail' else 2)}, windows 0..3: missing"
    ]
    with pytest.raises(CacheError, match="missing"):
        open_cache(cache_copy)  # a missing shard would read back as zeros: the reader refuses


def test_done_flag_zero_is_found(cache_copy: Path) -> None:
    (cache_copy / "done" / "c" / "2").unlink()  # missing done chunk reads as 0
    report = verify_cache(cache_copy)
    assert report.bad_shards == [2]
    assert "not done" in report.shards[2].problems[0]
    with pytest.raises(CacheError, match=r"shards \[2\] not done"):
        open_cache(cache_copy)


def test_corrupt_done_flag_is_found(cache_copy: Path) -> None:
    path = cache_copy / "done" / "c" / "1"
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))
    report = verify_cache(cache_copy)
    assert report.bad_shards == [1]
    assert report.shards[1].problems[0].startswith("array 'done', file done/c/1, windows 4..7: unreadable")


def rewrite_consistently(root: Path, name: str, rows: slice, update) -> dict:  # noqa: ANN001
    """Rewrite data through zarr, re-record the shard digests and re-finalize: valid checksums,
    digests and summary, wrong numbers (a logic bug in a writer, not bit rot). Only the semantic
    checks and --recompute can see it. Returns the new summary."""
    array = zarr.open_array(root / name, mode="r+")
    data = np.asarray(array[rows])
    array[rows] = update(data)
    store = LocalStore(root)
    group = zarr.open_group(store, mode="r+")
    metadata, layout, _ = read_attrs(group)
    digests = zarr.open_array(store, path=DIGESTS_ARRAY, mode="r+")
    for shard in range(layout.num_shards):
        digests[shard] = shard_digests(store, metadata, shard)
    return CacheWriter(store, group, metadata, layout).finalize()


_rewrite = rewrite_consistently


def test_semantic_damage_is_found(cache_copy: Path) -> None:
    def repeat_id(d: np.ndarray) -> np.ndarray:
        d[0, 0, 3] = 0  # gap 0 in topk: the same id twice
        return d

    def out_of_range(d: np.ndarray) -> np.ndarray:
        d[1, 2, 0] = 400  # first id >= vocab 300
        return d

    def bad_values(d: np.ndarray) -> np.ndarray:
        d[0, 0, :] = 5000  # above 1023 for the default ratio_q10
        return d

    def bad_tail(d: np.ndarray) -> np.ndarray:
        d[0, 1] = 1.5
        return d

    _rewrite(cache_copy, "ids", slice(0, 4), repeat_id)
    _rewrite(cache_copy, "ids", slice(4, 8), out_of_range)
    _rewrite(cache_copy, "values", slice(8, 11), bad_values)
    report = verify_cache(cache_copy)
    assert report.bad_shards == [0, 1, 2]
    assert "repeated ids" in report.shards[0].problems[0]
    assert "ids >= vocab_size" in report.shards[1].problems[0]
    assert "above the code's maximum" in report.shards[2].problems[0]
    _rewrite(cache_copy, "tail", slice(4, 8), bad_tail)
    assert any("tail mass outside" in p for p in verify_cache(cache_copy).shards[1].problems)


def test_tail_inconsistent_with_entries_is_found(tmp_path: Path) -> None:
    md = make_metadata(encoding=Encoding(value_code="logp_q16"))
    write_all(tmp_path / "c", md)
    _rewrite(tmp_path / "c", "tail", slice(0, 4), lambda d: np.clip(d + 0.05, 0, 1))
    report = verify_cache(tmp_path / "c")
    assert report.bad_shards == [0]
    assert "differ from 1" in report.shards[0].problems[0]


def test_not_a_cache_and_unfinished(tmp_path: Path) -> None:
    report = verify_cache(tmp_path / "nothing")
    assert not report.ok and report.problems
    write_all(tmp_path / "c", make_metadata(), finalize=False)
    report = verify_cache(tmp_path / "c")
    assert not report.ok
    assert any("not finalized" in p for p in report.problems)
    group = zarr.open_group(tmp_path / "c", mode="r+")
    group.update_attributes({"logitcache": {**dict(group.attrs)["logitcache"], "format_version": 7}})
    report = verify_cache(tmp_path / "c")
    assert any("format_version" in p for p in report.problems)
    (tmp_path / "f").write_text("x")
    with pytest.raises(CacheError, match="existing file"):
        verify_cache(tmp_path / "f")


# ------------------------------------------------------------------- every byte of every file


@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_every_file_deleted_truncated_or_flipped_is_reported(tmp_path: Path, mode: str) -> None:
    """The done-when of issue 17: for EVERY file of the store, deleting it, truncating it or flipping
    one bit in it is reported (metadata documents included), and the report names that file."""
    md = (
        make_metadata()
        if mode == "topk"
        else make_metadata(mode="sampled", num_samples=8, encoding=SAMPLED_ENCODING)
    )
    root = tmp_path / "c"
    write_all(root, md)
    assert verify_cache(root).ok
    files = sorted(p for p in root.rglob("*") if p.is_file())
    assert len(files) == 1 + (6 if mode == "topk" else 5) * 4  # root; per array its zarr.json, 3 chunk files

    def check() -> tuple[bool, list[str]]:
        report = verify_cache(root)
        return report.ok, report.problems + [p for s in report.shards for p in s.problems]

    outcomes = sweep_store(root, check)
    assert {o.file for o in outcomes} == {p.relative_to(root).as_posix() for p in files}
    missed = [f"{o.file} {o.damage}: {list(o.lines)}" for o in outcomes if not (o.reported and o.named)]
    assert not missed, "\n".join(missed)
    assert verify_cache(root).ok


def test_swapped_shard_files_with_valid_checksums_are_found(cache_copy: Path) -> None:
    """Files with valid checksums in the wrong place: caught by the shard digests, no --recompute needed."""
    a, b = _shard_file(cache_copy, "values", 0), _shard_file(cache_copy, "values", 1)
    blob_a, blob_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(blob_b)
    b.write_bytes(blob_a)
    report = verify_cache(cache_copy)
    assert report.bad_shards == [0, 1]
    assert "digest" in report.shards[0].problems[0] and "windows 0..3" in report.shards[0].problems[0]
    a.write_bytes(blob_a)
    b.write_bytes(blob_b)
    stats = cache_copy / "shard_stats" / "c"
    (stats / "0" / "0").rename(cache_copy / "moved")
    (stats / "1" / "0").rename(stats / "0" / "0")
    (cache_copy / "moved").rename(stats / "1" / "0")
    assert verify_cache(cache_copy).bad_shards == [0, 1]


def test_extra_file_is_found(cache_copy: Path) -> None:
    (cache_copy / "ids" / "c" / "7").mkdir()
    (cache_copy / "ids" / "c" / "7" / "stray").write_bytes(b"x")
    report = verify_cache(cache_copy)
    assert not report.ok
    assert any("not part of the cache: ids/c/7/stray" in p for p in report.problems)


def test_quick_pass_reads_metadata_sizes_and_indexes_only(cache_copy: Path) -> None:
    assert verify_cache(cache_copy, quick=True).ok
    path = _shard_file(cache_copy, "ids", 2)
    original = path.read_bytes()
    path.write_bytes(original[:-1])  # truncation: the index no longer ends the file
    assert verify_cache(cache_copy, quick=True).bad_shards == [2]
    damaged = bytearray(original)
    damaged[3] ^= 1  # inside the data: only the full pass reads it
    path.write_bytes(bytes(damaged))
    assert verify_cache(cache_copy, quick=True).ok
    assert verify_cache(cache_copy).bad_shards == [2]
    path.write_bytes(original)
    doc = cache_copy / "values" / "zarr.json"
    doc.write_bytes(doc.read_bytes().replace(b'"fill_value": 0', b'"fill_value": 1'))
    report = verify_cache(cache_copy, quick=True)
    assert any("values/zarr.json" in p and "digest" in p for p in report.problems)


@pytest.mark.parametrize("name", ["topk", "sampled"])
def test_v1_fixture_without_integrity_records_verifies_with_a_note(name: str) -> None:
    from tests.test_cache_format import FIXTURES

    report = verify_cache(FIXTURES / name)
    assert report.ok, report.to_dict()
    assert any("before integrity records" in note for note in report.notes)


def test_unfinished_cache_of_an_older_writer_resumes_and_gets_digests(tmp_path: Path) -> None:
    """An unfinished cache written before shard digests existed (no shard_digests array): resuming
    it creates the array, finalize records the digests of the shards already done, and it verifies."""
    md = make_metadata()
    write_all(tmp_path / "c", md, finalize=False)
    shutil.rmtree(tmp_path / "c" / DIGESTS_ARRAY)
    writer = write_all(tmp_path / "c", md, finalize=False)  # create_cache resumes: nothing pending
    assert writer.pending_shards() == []
    writer.finalize()
    report = verify_cache(tmp_path / "c")
    assert report.ok and not report.notes, report.to_dict()
