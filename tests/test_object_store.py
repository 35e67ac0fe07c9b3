"""Caches in object stores: `cache-logits` writes, `verify-cache` and `train-student` read through
zarr's FsspecStore, against a real S3-compatible server (moto's server mode) started here.

The server listens on a free local port; the AWS SDK finds it through the standard
``AWS_ENDPOINT_URL_S3`` and dummy credentials in the environment, as a user's would be set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("s3fs", reason="the s3 extra (fsspec, s3fs) is not installed")
pytest.importorskip("moto.server", reason="moto[server] (dev extra) is not installed")

import boto3  # noqa: E402 - after the skips: installed with moto
from moto.server import ThreadedMotoServer  # noqa: E402

from logitcache.cache import create_cache, open_cache, storage, verify_cache  # noqa: E402
from logitcache.pipeline.cache_logits import cache_logits, verify, verify_stage  # noqa: E402
from logitcache.pipeline.cli import main  # noqa: E402
from logitcache.pipeline.config import cache_fingerprint, load_config  # noqa: E402
from logitcache.pipeline.errors import CacheError, ConfigError, StageError  # noqa: E402
from logitcache.pipeline.prepare import prepare_data  # noqa: E402
from logitcache.pipeline.student import train_student  # noqa: E402
from logitcache.pipeline.teachers import train_teacher  # noqa: E402

from .conftest import TINY_LLAMA, kill_when  # noqa: E402
from .test_cache_format import (  # noqa: E402
    NUM_WINDOWS,
    PER_CHUNK,
    PER_SHARD,
    SEQ,
    make_metadata,
    selection_for,
    write_all,
)

PIPE = [sys.executable, "-m", "logitcache.pipeline.cli"]
BUCKET = "logitcache-test"
# Many small shards, so that a kill lands between two of them.
SETTINGS = ["cache.k=8", "cache.batch_size=32", "cache.windows_per_shard=32"]
STUDENT = f"""
[student.model]
{TINY_LLAMA}

[student.train]
lr = 3e-3
batch_size = 16
max_steps = 4
warmup_steps = 1
checkpoint_every = 1000
log_every = 1
eval_batch_size = 64

[student.loader]
shuffle_block = 16
shuffle_buffer_blocks = 4
"""


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A moto S3 server on a free port, one bucket, and the environment pointing at it (boto3 client)."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    nowhere = tmp_path_factory.mktemp("aws") / "none"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}",
        "AWS_SHARED_CREDENTIALS_FILE": str(nowhere),  # never the machine's ~/.aws
        "AWS_CONFIG_FILE": str(nowhere),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("AWS_PROFILE", raising=False)
        for key, value in env.items():
            patch.setenv(key, value)  # os.environ: the CLI subprocesses inherit it
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        yield client
        _clear_s3fs_instances()
    server.stop()


def _clear_s3fs_instances() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # cached instances keep the credentials they found


def _objects(client: object, prefix: str) -> dict[str, str]:
    """SHA-256 of every object under ``prefix``, read with boto3 (not through logitcache or zarr)."""
    found = {}
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/")  # type: ignore[attr-defined]
    for page in pages:
        for item in page.get("Contents", []):
            body = client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()  # type: ignore[attr-defined]
            found[item["Key"][len(prefix) + 1 :]] = hashlib.sha256(body).hexdigest()
    return found


def _tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config, run) with prepared data and two briefly trained teachers, made once.

    The tests' configs name these teachers by ``teachers.NAME.path``: every run then records the
    same teacher paths, so caches written from different run folders have the same bytes.
    """
    from .conftest import CORPUS, corpus_slice, write_config

    root = tmp_path_factory.mktemp("object-store")
    corpus = root / "corpus"
    corpus.mkdir()
    for name in sorted(p.name for p in CORPUS.glob("*.txt.gz"))[:4]:
        (corpus / name.removesuffix(".gz")).write_text(corpus_slice(name, 8_000))
    path = write_config(root / "o.toml", corpus, root / "base", extra=STUDENT)
    config = load_config(path, ["teachers.llama.train.max_steps=4", "teachers.gpt.train.max_steps=4"])
    prepare_data(config)
    for name in config.teachers:
        train_teacher(config, name, progress=False)
    return path, root / "base"


def _overrides(base: tuple[Path, Path], *more: str) -> list[str]:
    teachers = [f"teachers.{n}.path={base[1] / 'teachers' / n}" for n in ("llama", "gpt")]
    return [*teachers, *SETTINGS, *more]


def _config(base: tuple[Path, Path], run: Path, *more: str):  # noqa: ANN202
    if not (run / "data").exists():
        shutil.copytree(base[1] / "data", run / "data")
    return load_config(base[0], _overrides(base, *more), run_dir=run)


@pytest.fixture(scope="module")
def local(base: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A run whose cache is local (the reference), and the SHA-256 of each file of its store."""
    run = tmp_path_factory.mktemp("local") / "run"
    cache_logits(_config(base, run), progress=False)
    return run, _tree(run / "cache" / "logits.zarr")


@pytest.fixture(scope="module")
def remote(s3: object, base: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A run whose cache `cache-logits` wrote to s3://BUCKET/run/logits.zarr."""
    run = tmp_path_factory.mktemp("remote") / "run"
    url = f"s3://{BUCKET}/run/logits.zarr"
    assert cache_logits(_config(base, run, f"cache.store={url}"), progress=False) == run / "cache"
    return run, url


def test_cache_written_to_s3_is_the_local_cache_and_verifies(s3, base, local, remote, capsys):
    run, url = remote
    config = _config(base, run, f"cache.store={url}")
    stage = run / "cache"
    assert not (stage / "logits.zarr").exists()  # the store is remote; the stage folder keeps the rest
    marker = json.loads((stage / "COMPLETE.json").read_text())
    assert marker["fingerprint"] == cache_fingerprint(config) and marker["summary"]["store"] == url
    assert (stage / "provenance.json").is_file()
    # Byte for byte what the same config writes to a local folder (read back with boto3).
    assert _objects(s3, "run/logits.zarr") == local[1]
    # A different location is another output (fingerprint), the same settings (no store in metadata).
    assert cache_fingerprint(config) != cache_fingerprint(_config(base, local[0]))

    assert verify_stage(config)["ok"] and json.loads((stage / "verify.json").read_text())["ok"]
    followed = verify(stage)  # the stage folder names its remote store
    assert followed["ok"] and followed["store"] == url and followed["aligned_with"] == str(run / "data")
    main(["verify-cache", url])  # the command line, in this process (a subprocess costs seconds)
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"OK: {url}"
    assert open_cache(url).read_windows([0, 5]).ids.shape == (2, 32, 8)


def test_corrupted_object_fails_verify_and_is_refused_before_training(s3, base, remote, capsys):
    run, url = remote
    key = "run/logits.zarr/ids/c/1/0/0"  # shard 1 of the ids
    original = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    damaged = bytearray(original)
    damaged[len(damaged) // 3] ^= 0x40
    s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(damaged))
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["verify-cache", url, "--json"])
        assert exit_info.value.code == 1  # a failed check, not a user error
        report = json.loads(capsys.readouterr().out)
        assert not report["ok"] and report["bad_shards"] == [1] and report["store"] == url
        assert "ids/c/1/0/0" in report["shards"][1]["problems"][0]
        s3.put_object(Bucket=BUCKET, Key=key, Body=original[:-7])  # truncated: the shard index is cut
        truncated = verify_cache(url, quick=True)
        assert truncated.bad_shards == [1] and "unreadable" in truncated.shards[1].problems[0]
        s3.delete_object(Bucket=BUCKET, Key=key)  # missing: the listing of keys finds it
        missing = verify_cache(url, quick=True)
        assert missing.bad_shards == [1] and missing.shards[1].problems[0].endswith("missing")
        with pytest.raises(CacheError, match="ids/c/1/0/0"):
            train_student(_config(base, run, f"cache.store={url}", "student.name=damaged"), progress=False)
        assert not (run / "students" / "damaged").exists()
    finally:
        s3.put_object(Bucket=BUCKET, Key=key, Body=original)
    assert verify(url)["ok"]


def _losses(metrics: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [(row["step"], row["loss"]) for row in rows if "loss" in row]


def test_student_streams_from_s3_with_the_losses_of_the_local_cache(s3, base, local, remote):
    run, url = remote
    # One loader worker process: it opens its own connection to the store after the fork.
    streamed = train_student(
        _config(base, run, f"cache.store={url}", "student.loader.workers=1", "student.name=s3"),
        progress=False,
    )
    reference = train_student(_config(base, local[0], "student.name=local"), progress=False)
    got, want = _losses(streamed / "metrics.jsonl"), _losses(reference / "metrics.jsonl")
    assert [step for step, _ in want] == [1, 2, 3, 4]
    # Same bytes, same order, same initial model: the same floating-point operations, bit for bit.
    assert got == want


def test_interrupted_s3_write_resumes_to_the_same_bytes(s3, base, local, tmp_path: Path, capsys):
    run = tmp_path / "run"
    url = f"s3://{BUCKET}/resume/logits.zarr"
    _config(base, run, f"cache.store={url}")  # copies the prepared data
    args = [*PIPE, "cache-logits", str(base[0]), "--run-dir", str(run)]
    args += [a for s in _overrides(base, f"cache.store={url}") for a in ("--set", s)]
    shards = len([key for key in local[1] if key.startswith("done/c/")])
    assert shards >= 4

    def done_objects() -> int:
        found = s3.list_objects_v2(Bucket=BUCKET, Prefix="resume/logits.zarr/done/c/")
        return int(found.get("KeyCount", 0))

    kill_when(args, lambda: done_objects() >= 2)
    assert not (run / "cache" / "COMPLETE.json").exists() and 2 <= done_objects() < shards
    main(["cache-logits", *args[len(PIPE) + 1 :]])  # the same command, resumed in this process
    assert f"cache {url}:" in capsys.readouterr().out
    assert _objects(s3, "resume/logits.zarr") == local[1]


def test_store_errors_are_one_line(s3, base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    with pytest.raises(SystemExit) as exit_info:  # anything but a user error would propagate here
        main(["verify-cache", "s3://no-such-bucket/x/logits.zarr"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Expected to reach the store s3://no-such-bucket/")
    assert "bucket does not exist" in lines[0]
    # Nothing there yet: the student is refused (StageError), cache-logits refuses an unreachable store.
    empty = _config(base, tmp_path / "run", f"cache.store=s3://{BUCKET}/empty/logits.zarr")
    with pytest.raises(StageError, match="run `pipe cache-logits CONFIG` first"):
        train_student(empty, progress=False)
    nowhere = _config(base, tmp_path / "run", "cache.store=s3://no-such-bucket/x/logits.zarr")
    with pytest.raises(CacheError, match="Expected to reach the store"):
        cache_logits(nowhere, progress=False)
    assert not (tmp_path / "run" / "cache").exists()  # refused before anything was created
    # No credentials anywhere in the environment: one line naming the problem.
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    _clear_s3fs_instances()
    try:
        with pytest.raises(CacheError, match="NoCredentialsError.*AWS_ACCESS_KEY_ID"):
            verify_cache(f"s3://{BUCKET}/run/logits.zarr")
    finally:
        _clear_s3fs_instances()


def test_cache_store_setting_is_checked_at_load(base, tmp_path: Path):
    run = tmp_path / "run"
    for value, message in [
        ("/some/local/folder", "Expected cache.store to be a URL"),
        ("file:///some/folder", "Expected cache.store to be a URL"),
        ("s3://KEY:SECRET@bucket/prefix", "credentials are read from the environment only"),
        ("nosuchprotocol://bucket/prefix", "protocol fsspec knows"),
    ]:
        with pytest.raises(ConfigError, match=message):
            _config(base, run, f"cache.store={value}")
    if storage.is_url("gs://x") and _missing("gcsfs"):
        with pytest.raises(ConfigError, match="gcsfs"):
            _config(base, run, "cache.store=gs://bucket/prefix")
        with pytest.raises(CacheError, match="gcsfs"):
            open_cache("gs://bucket/prefix")


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def test_memory_store_round_trip_and_resume(tmp_path: Path):
    """A `memory://` store (fsspec's in-process filesystem): the same bytes, checks and resume as a folder."""
    metadata = make_metadata()
    write_all(tmp_path / "local.zarr", metadata)
    url = f"memory://logitcache-test-{os.getpid()}/logits.zarr"
    writer = create_cache(
        url,
        metadata,
        num_windows=NUM_WINDOWS,
        seq_len=SEQ,
        windows_per_chunk=PER_CHUNK,
        windows_per_shard=PER_SHARD,
    )
    writer.write_shard(0, selection_for(metadata, *writer.shard_rows(0)))
    # Reopened like a rerun after a crash: only the shards not marked done are left.
    resumed = create_cache(
        url,
        metadata,
        num_windows=NUM_WINDOWS,
        seq_len=SEQ,
        windows_per_chunk=PER_CHUNK,
        windows_per_shard=PER_SHARD,
    )
    assert resumed.pending_shards() == [1, 2]
    for shard in resumed.pending_shards():
        resumed.write_shard(shard, selection_for(metadata, *resumed.shard_rows(shard)))
    resumed.finalize()
    store = storage.resolve_store(url, read_only=True, must_exist=True)
    assert storage.describe(store) == url
    remote = {
        key: hashlib.sha256(storage.read_bytes(store, key) or b"").hexdigest()
        for key in storage.list_keys(store)
    }
    assert remote == _tree(tmp_path / "local.zarr")
    assert verify_cache(url).ok
    rows = np.array([0, 4, NUM_WINDOWS - 1])
    got, want = open_cache(url).read_windows(rows), open_cache(tmp_path / "local.zarr").read_windows(rows)
    assert np.array_equal(got.ids.numpy(), want.ids.numpy())
    assert np.array_equal(got.weights.numpy(), want.weights.numpy())
    from zarr.core.sync import sync

    sync(storage.resolve_store(url, read_only=False, must_exist=True).delete("values/c/2/0/0"))
    report = verify_cache(url)
    assert report.bad_shards == [2] and report.shards[2].problems[0].endswith("missing")
    with pytest.raises(CacheError, match="values/c/2/0/0 missing \\(shards \\[2\\]"):
        open_cache(url)
