"""Configs: the shipped files load, overrides apply, bad keys and types are named."""

from __future__ import annotations

from pathlib import Path
from typing import get_args, get_type_hints

import pytest

from logitcache.pipeline.config import (
    STUDENT_MODES,
    Config,
    EvalConfig,
    StudentConfig,
    cache_fingerprint,
    data_fingerprint,
    digest,
    eval_fingerprint,
    load_config,
    run_students,
    student_fingerprint,
    teacher_fingerprint,
    with_student,
)
from logitcache.pipeline.errors import ConfigError

from .conftest import REPO

SHIPPED = sorted((REPO / "configs").glob("*.toml"))


def test_shipped_configs_exist():
    assert {p.name for p in SHIPPED} >= {"demo.toml", "babyllama2-10m.toml", "babyllama1-10m.toml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path):
    config = load_config(path)
    assert isinstance(config, Config)
    assert len(config.teachers) >= 2
    assert Path(config.data.corpus).is_dir(), "paths in a config resolve relative to the config file"


def test_babyllama2_numbers():
    config = load_config(REPO / "configs" / "babyllama2-10m.toml")
    assert config.data.vocab_size == 16000 and config.data.seq_len == 128
    for model in [t.model for t in config.teachers.values()] + [config.student.model]:
        assert (model.family, model.hidden_size, model.num_layers) == ("llama", 960, 32)
        assert (model.num_heads, model.num_kv_heads, model.intermediate_size) == (15, 5, 2560)
    train = config.student.train
    assert (train.lr, train.weight_decay, train.batch_size, train.epochs) == (7e-4, 5.0, 128, 8)
    assert (train.warmup_steps, train.schedule) == (600, "cosine")
    assert (config.student.distill.alpha, config.student.distill.temperature) == (0.5, 1.0)
    assert len(config.teachers) == 2 and config.cache.ensemble == "mean_logits"


def test_babyllama1_numbers():
    config = load_config(REPO / "configs" / "babyllama1-10m.toml")
    families = sorted(
        (t.model.family, t.model.hidden_size, t.model.num_layers) for t in config.teachers.values()
    )
    assert families == [("gpt2", 1536, 24), ("llama", 1024, 24)]
    student = config.student.model
    assert (student.hidden_size, student.num_layers, student.num_heads, student.intermediate_size) == (
        512,
        16,
        8,
        1024,
    )
    assert (config.student.train.lr, config.student.train.epochs, config.student.train.weight_decay) == (
        2.5e-4,
        6,
        0.1,
    )


def test_overrides_and_run_dir(tmp_path: Path):
    demo = REPO / "configs" / "demo.toml"
    config = load_config(
        demo,
        [
            "data.seq_len=64",
            "teachers.llama.train.lr=1e-3",
            "cache.weights=[0.25, 0.75]",
            "run.dir=somewhere",
        ],
    )
    assert config.data.seq_len == 64
    assert config.teachers["llama"].train.lr == 1e-3
    assert config.cache.weights == [0.25, 0.75]
    assert config.run_dir == Path("somewhere").resolve()  # command-line paths: relative to the cwd
    assert load_config(demo, run_dir=tmp_path / "r").run_dir == tmp_path / "r"


def test_int_accepted_for_float_but_not_reverse():
    demo = REPO / "configs" / "demo.toml"
    assert load_config(demo, ["student.distill.temperature=2"]).student.distill.temperature == 2.0
    with pytest.raises(ConfigError, match=r"'data.seq_len' to be an integer"):
        load_config(demo, ["data.seq_len=1.5"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.seq_lne=3", r"Unknown config key 'data.seq_lne'. Did you mean 'seq_len'\?"),
        ("dta.seq_len=3", r"Unknown config key 'dta'. Did you mean 'data'\?"),
        (
            "teachers.llama.model.hiden_size=3",
            r"'teachers.llama.model.hiden_size'. Did you mean 'hidden_size'\?",
        ),
        ("data.seq_len=abc", r"Expected 'data.seq_len' to be an integer. Got 'abc'"),
        ("cache.mode=dense", r"Expected 'cache.mode' to be one of 'topk', 'sampled', 'hybrid'. Got 'dense'"),
        ("student.distill.alpha=1.5", r"alpha in \[0, 1\]"),
        ("data.seq_len", r"Expected --set section.key=value"),
        ("teachers.llama.train.batch_size=10", r"multiple of grad_accum_steps|batch_size"),
    ],
)
def test_bad_overrides_are_named(override: str, message: str):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs" / "demo.toml", [override, "teachers.llama.train.grad_accum_steps=4"])


def test_hybrid_cache_settings_are_checked_at_load():
    demo = REPO / "configs" / "demo.toml"
    hybrid = ["cache.mode=hybrid", "cache.k=32", "cache.tail_samples=24"]
    assert load_config(demo, hybrid).cache.width == 56
    assert load_config(demo, ["cache.mode=sampled", "cache.samples=40"]).cache.width == 40
    # tail_samples counts for the hybrid cache's fingerprint only: topk and sampled runs made before
    # the key existed keep theirs (the fingerprint is the section without it)
    topk = load_config(demo, ["cache.mode=topk"])
    assert cache_fingerprint(topk) == cache_fingerprint(
        load_config(demo, ["cache.mode=topk", "cache.tail_samples=7"])
    )
    # k is unused by a sampled cache: its fingerprint ignores it (a topk one's does not)
    sampled = ["cache.mode=sampled", "cache.samples=40"]
    assert cache_fingerprint(load_config(demo, sampled)) == cache_fingerprint(
        load_config(demo, [*sampled, "cache.k=3"])
    )
    assert cache_fingerprint(topk) != cache_fingerprint(load_config(demo, ["cache.mode=topk", "cache.k=3"]))
    assert cache_fingerprint(load_config(demo, hybrid)) != cache_fingerprint(
        load_config(demo, [*hybrid, "cache.tail_samples=7"])
    )
    for override, message in [
        ("cache.value_code=ratio_q8", r"Expected cache.value_code one of \['ratio_q10'.*in hybrid mode"),
        ("cache.id_code=rank", r"Expected cache.id_code 'sorted_gaps' in hybrid mode"),
        ("cache.tail_samples=0", r"Expected cache.tail_samples in \[1, 65535\]"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(demo, [*hybrid, override])


def test_divergence_settings_are_checked_at_load():
    demo = REPO / "configs" / "demo.toml"
    topk = "cache.mode=topk"  # the demo's hybrid cache takes forward_kl only (checked below)
    distill = load_config(
        demo, [topk, "student.distill.divergence=jsd", "student.distill.jsd_beta=0.1"]
    ).student.distill
    assert (distill.divergence, distill.jsd_beta) == ("jsd", 0.1)
    assert load_config(demo).student.distill.divergence == "forward_kl"
    for overrides, message in [
        (
            ["student.distill.divergence=kl"],
            r"'student.distill.divergence' to be one of 'forward_kl', 'reverse_kl'",
        ),
        (["student.distill.jsd_beta=1.0"], r"Expected student.distill.jsd_beta in \(0, 1\)"),
        (["student.distill.jsd_beta=0"], r"Expected student.distill.jsd_beta in \(0, 1\)"),
        (
            ["student.distill.divergence=tv", "cache.mode=sampled"],
            r"divergence = 'forward_kl' with cache.mode = 'sampled'. Got 'tv': .* biased\. Use forward_kl",
        ),
        (["student.distill.divergence=jsd", "cache.mode=hybrid"], r"cache.mode = 'hybrid'"),
    ]:
        with pytest.raises(ConfigError, match=message) as info:
            load_config(demo, overrides)
        assert "\n" not in str(info.value)
    # students trained before the keys existed keep their fingerprint; jsd_beta counts for JSD only
    fingerprint = student_fingerprint(load_config(demo, [topk]))
    assert fingerprint == student_fingerprint(load_config(demo, [topk, "student.distill.jsd_beta=0.2"]))
    jsd = student_fingerprint(load_config(demo, [topk, "student.distill.divergence=jsd"]))
    assert len({fingerprint, jsd}) == 2
    assert jsd != student_fingerprint(
        load_config(demo, [topk, "student.distill.divergence=jsd", "student.distill.jsd_beta=0.2"])
    )
    # an online-only run does not read the cache: any divergence goes with any cache mode
    online = ["student.mode=online", 'run.students=["online"]', "cache.mode=sampled"]
    assert load_config(demo, [*online, "student.distill.divergence=tv"]).student.distill.divergence == "tv"


def test_unknown_key_in_file(tmp_path: Path):
    path = tmp_path / "bad.toml"
    path.write_text('[data]\ncorpus = "x"\nvocab = 100\n')
    with pytest.raises(ConfigError, match=r"Unknown config key 'data.vocab'. Did you mean 'vocab_size'\?"):
        load_config(path)


def test_invalid_toml_and_missing_file(tmp_path: Path):
    path = tmp_path / "bad.toml"
    path.write_text("[data\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_relative_paths_resolve_against_config_file(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "c.toml"
    path.write_text('[run]\ndir = "../out"\n[data]\ncorpus = "texts"\n')
    config = load_config(path)
    assert config.run_dir == tmp_path / "out"
    assert Path(config.data.corpus) == tmp_path / "sub" / "texts"


def test_hf_model_paths_resolve_like_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """data.tokenizer, teachers.NAME.path, teachers.NAME.model.path, student.model.path: relative to
    the config file when written there, to the working directory when given with --set."""
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "c.toml"
    path.write_text(
        '[data]\ntokenizer = "hf/tok"\n[teachers.a]\npath = "hf/a"\n[teachers.b.model]\npath = "hf/b"\n'
        '[student.model]\npath = "hf/s"\ninit = "pretrained"\n'
    )
    config = load_config(path)
    hf = tmp_path / "sub" / "hf"
    assert Path(config.data.tokenizer) == hf / "tok" and Path(config.teachers["a"].path) == hf / "a"
    assert Path(config.teachers["b"].model.path) == hf / "b" and Path(config.student.model.path) == hf / "s"
    assert config.student.model.init == "pretrained" and config.teachers["a"].dtype == "auto"
    monkeypatch.chdir(tmp_path)
    overridden = load_config(path, ["student.model.path=here", "teachers.a.path=there", "data.tokenizer=t"])
    assert Path(overridden.student.model.path) == tmp_path / "here"
    assert Path(overridden.teachers["a"].path) == tmp_path / "there"
    assert Path(overridden.data.tokenizer) == tmp_path / "t"
    with pytest.raises(ConfigError, match="'teachers.a.dtype' to be one of 'auto', 'bfloat16'"):
        load_config(path, ["teachers.a.dtype=fp8"])


def test_default_run_dir_from_config_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "exp7.toml"
    path.write_text('[data]\ncorpus = "texts"\n')
    monkeypatch.chdir(tmp_path)
    assert load_config(path).run_dir == Path("runs/exp7")


def test_fingerprint_tracks_sections():
    demo = REPO / "configs" / "demo.toml"
    a = load_config(demo)
    b = load_config(demo, ["teachers.llama.train.lr=1e-2"])
    assert a.fingerprint("data") == b.fingerprint("data")
    assert a.fingerprint("teachers") != b.fingerprint("teachers")
    assert a.fingerprint("data") == load_config(demo, ["run.dir=/elsewhere"]).fingerprint("data")


def test_stage_fingerprints_follow_what_each_stage_depends_on():
    """The fingerprints of pipeline/config.py: each changes with what its stage depends on, only."""
    demo = REPO / "configs" / "demo.toml"
    base = load_config(demo)

    def fingerprints(*overrides: str) -> dict[str, str]:
        c = load_config(demo, list(overrides))
        return {
            "data": data_fingerprint(c),
            "teacher": teacher_fingerprint(c, "llama"),
            "cache": cache_fingerprint(c),
            "student": student_fingerprint(c),
            "eval": eval_fingerprint(c),
        }

    def changed(*overrides: str) -> set[str]:
        a, b = fingerprints(), fingerprints(*overrides)
        return {stage for stage in a if a[stage] != b[stage]}

    assert changed("run.dir=/elsewhere", "student.name=other", "student.loader.workers=0") == set()
    assert changed("data.seq_len=32") == {"data", "teacher", "cache", "student", "eval"}
    assert changed("teachers.llama.train.lr=1e-2") == {"teacher", "cache", "student", "eval"}
    assert changed("cache.k=8") == {"cache", "student", "eval"}
    assert changed("student.train.lr=1e-2") == {"student", "eval"}
    assert changed("evaluate.batch_size=8") == {"eval"}
    # Without a teacher (mode "ce") neither the teachers nor the distillation settings matter.
    ce = load_config(demo, ["student.mode=ce"])
    assert student_fingerprint(ce) == student_fingerprint(
        load_config(demo, ["student.mode=ce", "student.distill.alpha=0.9", "teachers.llama.train.lr=1e-2"])
    )
    assert student_fingerprint(ce) != student_fingerprint(base)
    # Live teachers (mode "online") read no cache: how it stores the ensemble does not matter, the
    # ensemble rule and temperature do; with default storage settings the fingerprint is the one it
    # had before this rule (the whole section, as computed by hand here)
    online = ["student.mode=online"]
    assert student_fingerprint(load_config(demo, online)) == student_fingerprint(
        load_config(demo, [*online, "cache.mode=sampled", "cache.k=3", "cache.value_code=logp_fp16"])
    )
    assert student_fingerprint(load_config(demo, online)) != student_fingerprint(
        load_config(demo, [*online, "cache.temperature=2.0"])
    )
    plain = load_config(demo, [*online, "cache.mode=topk", "cache.k=64"])
    whole_section = {
        "data": data_fingerprint(plain),
        "student": {**{k: v for k, v in plain.fingerprint_dict()["student"].items() if k != "name"}},
        "seed": plain.run.seed,
        "teachers": {name: teacher_fingerprint(plain, name) for name in plain.teachers},
        "cache": {k: v for k, v in plain.fingerprint_dict()["cache"].items() if k != "store"},
    }
    whole_section["student"]["loader"] = {
        k: v for k, v in whole_section["student"]["loader"].items() if k.startswith("shuffle")
    }
    assert student_fingerprint(load_config(demo, online)) == digest(whole_section)
    assert [c.student.mode for c in run_students(base)] == base.run.students
    assert (
        data_fingerprint(base)
        == base.fingerprint("data")
        == digest({"data": base.fingerprint_dict()["data"]})
    )
    # The HF-model keys change what they decide, and nothing else.
    assert changed("data.tokenizer=/hf/tok") == {"data", "teacher", "cache", "student", "eval"}
    assert changed("teachers.llama.dtype=bfloat16") == {"teacher", "cache", "student", "eval"}
    assert changed("student.model.path=/hf/model") == {"student", "eval"}
    assert changed("student.model.path=/hf/model", "student.model.init=pretrained") == {"student", "eval"}


def test_keys_added_later_leave_old_fingerprints_alone():
    """At their defaults, the keys of HF teachers/students are left out of every fingerprint: runs made
    before they existed keep their fingerprints (computed here as the code before those keys did,
    with the corpus by absolute path: the legacy fingerprint; the current one names it as written)."""
    config = load_config(REPO / "configs" / "demo.toml")
    data = config.to_dict()
    del data["data"]["tokenizer"]
    for table in [data["student"], *data["teachers"].values()]:
        table.pop("dtype", None)
        del table["model"]["path"], table["model"]["init"]
    assert data_fingerprint(config).legacy == digest({"data": data["data"]})
    assert teacher_fingerprint(config, "llama").legacy == digest(
        {
            "data": data_fingerprint(config).legacy,
            "teacher": data["teachers"]["llama"],
            "seed": config.run.seed,
        }
    )
    data["data"]["corpus"] = "../corpus"  # as configs/demo.toml writes it
    assert data_fingerprint(config) == digest({"data": data["data"]})
    assert teacher_fingerprint(config, "llama") == digest(
        {"data": data_fingerprint(config), "teacher": data["teachers"]["llama"], "seed": config.run.seed}
    )
    changed = load_config(REPO / "configs" / "demo.toml", ["data.tokenizer=/hf/tok"])
    assert data_fingerprint(changed) != data_fingerprint(config)


def test_modes_and_eval_defaults_are_defined_once():
    """The student modes and evaluation defaults of the CLI come from the config's types and defaults."""
    from logitcache.pipeline.cli import cli
    from logitcache.pipeline.evaluation.evaluate import EvalOptions

    assert STUDENT_MODES == ("cache", "online", "ce")
    assert get_args(get_type_hints(StudentConfig)["mode"]) == STUDENT_MODES
    params = {p.name: p for p in cli.commands["evaluate"].params}
    defaults = EvalConfig()
    assert (params["split"].default, params["batch_size"].default, params["ece_bins"].default) == (
        defaults.split,
        defaults.batch_size,
        defaults.ece_bins,
    )
    options = EvalOptions()
    assert (options.split, options.batch_size, options.ece_bins) == (
        defaults.split,
        defaults.batch_size,
        defaults.ece_bins,
    )
    mode = next(p for p in cli.commands["train-student"].params if p.name == "mode")
    assert tuple(mode.type.choices) == STUDENT_MODES


def test_with_student_replaces_mode_and_name():
    """`pipe train-student --mode/--name`: a replaced dataclass, no TOML templating (any name works)."""
    base = load_config(REPO / "configs" / "demo.toml")
    assert with_student(base) == base
    other = with_student(base, mode="online", name='odd "name"')
    assert (other.student.mode, other.student.name) == ("online", 'odd "name"')
    assert other.student.model == base.student.model and other.cache == base.cache
    with pytest.raises(ConfigError, match="Expected student.mode in 'cache', 'online', 'ce'. Got 'teacher'."):
        with_student(base, mode="teacher")


# One case per range rule (issue 17): each refused at load time with one line naming the key,
# before any command can touch anything. Valid edge values (0 = unset/auto) load.
RANGE_RULES = [
    ("run.seed=-1", "run.seed >= 0"),
    ("data.max_chars_per_file=-1", "data.max_chars_per_file >= 0"),
    ("data.document_words=0", "data.document_words >= 1"),
    ("data.min_frequency=-2", "data.min_frequency >= 0"),
    ("student.model.num_heads=0", "student.model.num_heads >= 1"),
    ("student.model.hidden_size=0", "student.model.hidden_size >= 1"),
    ("student.model.num_layers=0", "student.model.num_layers >= 1"),
    ("student.model.intermediate_size=0", "student.model.intermediate_size >= 1"),
    ("student.model.num_kv_heads=-1", "student.model.num_kv_heads >= 0"),
    ("teachers.gpt2.model.num_heads=5", r"hidden_size \(192\) divisible by num_heads \(5\)"),
    ("teachers.llama.model.num_kv_heads=3", r"num_heads \(4\) divisible by num_kv_heads \(3\)"),
    ("teachers.gpt2.model.num_kv_heads=2", "GPT-2 has no grouped-query attention"),
    ("teachers.llama.model.hidden_size=12", r"head size\) to be even"),
    (
        "student.model.max_position_embeddings=8",
        r"max_position_embeddings 0 \(= data.seq_len\) or >= data.seq_len",
    ),
    ("student.model.rope_theta=0", "rope_theta > 0"),
    ("student.model.dropout=1.0", r"dropout in \[0, 1\)"),
    ("student.train.lr=0", "student.train.lr > 0"),
    ("student.train.min_lr_ratio=2", r"min_lr_ratio in \[0, 1\]"),
    ("student.train.weight_decay=-0.1", "weight_decay >= 0"),
    ("student.train.adam_beta1=1", r"adam_beta1 in \[0, 1\)"),
    ("student.train.adam_beta2=-0.5", r"adam_beta2 in \[0, 1\)"),
    ("student.train.adam_eps=0", "adam_eps > 0"),
    ("student.train.epochs=-1", "student.train.epochs >= 0"),
    ("student.train.max_steps=-5", r"student.train.max_steps >= 0 \(0 = the epochs decide\)"),
    ("student.train.batch_size=0", "positive multiple of grad_accum_steps"),
    ("student.train.warmup_steps=-1", "warmup_steps >= 0"),
    ("student.train.max_grad_norm=0", "max_grad_norm > 0"),
    ("student.train.eval_batch_size=0", "eval_batch_size >= 1"),
    ("student.train.checkpoint_every=0", "student.train.checkpoint_every >= 1"),
    ("teachers.llama.train.log_every=0", "teachers.llama.train.log_every >= 1"),
    ("student.train.keep_checkpoints=0", "keep_checkpoints >= 1"),
    ("cache.k=0", "cache.k >= 1"),
    ("cache.samples=70000", r"cache.samples in \[1, 65535\]"),
    ("cache.temperature=0", "cache.temperature > 0"),
    ("cache.batch_size=0", "cache.batch_size >= 1"),
    ("cache.windows_per_shard=-4", "cache.windows_per_shard >= 0"),
    ("cache.weights=[1.0, -1.0]", r"cache.weights\[1\] > 0"),
    ("student.seed=-3", "student.seed >= 0"),
    ("student.distill.temperature=0", "student.distill.temperature > 0"),
    ("student.loader.workers=-1", "student.loader.workers >= 0"),
    ("student.loader.prefetch_factor=0", "prefetch_factor >= 1"),
    ("student.loader.shuffle_block=-1", "shuffle_block >= 0"),
    ("student.loader.shuffle_buffer_blocks=0", "shuffle_buffer_blocks >= 1"),
    ("evaluate.batch_size=0", "evaluate.batch_size >= 1"),
    ("evaluate.ece_bins=0", "evaluate.ece_bins >= 1"),
]


def test_loader_workers_take_an_integer_or_auto():
    demo = REPO / "configs" / "demo.toml"
    assert load_config(demo).student.loader.workers == "auto"  # the default
    assert load_config(demo, ["student.loader.workers=3"]).student.loader.workers == 3
    assert load_config(demo, ['student.loader.workers="auto"']).student.loader.workers == "auto"
    for bad in ['"four"', "1.5", "true"]:
        with pytest.raises(ConfigError, match="student.loader.workers' to be an integer or 'auto'") as info:
            load_config(demo, [f"student.loader.workers={bad}"])
        assert "\n" not in str(info.value)


@pytest.mark.parametrize(("override", "message"), RANGE_RULES, ids=[case[0] for case in RANGE_RULES])
def test_range_rules_refuse_with_one_line(override: str, message: str):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(REPO / "configs" / "demo.toml", [override])
    assert "\n" not in str(info.value)


def test_epochs_zero_needs_max_steps():
    with pytest.raises(ConfigError, match="epochs >= 1 or max_steps >= 1"):
        load_config(REPO / "configs" / "demo.toml", ["student.train.epochs=0"])
    config = load_config(
        REPO / "configs" / "demo.toml", ["student.train.epochs=0", "student.train.max_steps=5"]
    )
    assert config.student.train.max_steps == 5


def test_zero_means_unset_where_documented():
    config = load_config(
        REPO / "configs" / "demo.toml",
        [
            "student.train.max_steps=0",
            "cache.windows_per_shard=0",
            "student.model.max_position_embeddings=0",
            "student.loader.workers=0",
            "student.seed=0",
            "data.max_chars_per_file=0",
        ],
    )
    assert config.student.train.max_steps == 0


def test_bad_cache_option_with_overwrite_is_refused_by_the_cli_touching_nothing(tmp_path: Path):
    """`pipe cache-logits --overwrite --set cache.batch_size=0` (issue 17): one line, exit 2, no
    traceback, and the run directory unchanged (the config is refused before the command runs)."""
    import subprocess
    import sys

    run = tmp_path / "run"
    (run / "cache").mkdir(parents=True)
    (run / "cache" / "COMPLETE.json").write_text('{"fingerprint": "x", "summary": {}}')
    before = sorted((p.relative_to(run), p.read_bytes()) for p in run.rglob("*") if p.is_file())
    args = [
        sys.executable,
        "-m",
        "logitcache.pipeline.cli",
        "cache-logits",
        str(REPO / "configs" / "demo.toml"),
    ]
    args += ["--run-dir", str(run), "--overwrite", "--set", "cache.batch_size=0"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "cache.batch_size >= 1" in done.stderr
    assert "Traceback" not in done.stderr
    assert sorted((p.relative_to(run), p.read_bytes()) for p in run.rglob("*") if p.is_file()) == before
