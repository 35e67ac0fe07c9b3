"""Regenerate docs/results.md: the distillation experiments of issue 8 at one scale, with seeds.

    python scripts/reproduce_results.py [--config configs/demo.toml] [--run-dir runs/results-demo]
        [--seeds 1,2] [--ks 8,64] [--temps 1,2] [--alphas 0.5,1.0] [--set KEY=VALUE ...]
        [--out docs/results.md]

1. ``pipe run CONFIG`` in RUN (data, teachers, cache, verify, students ``cache`` and ``ce``,
   evaluation with BLiMP as configured, report): the table of teachers vs students.
2. For every seed (``student.seed``: initialisation and data order), students that differ in one
   thing each, all evaluated on the held-out test split:
   ``ce`` (no teacher), ``online`` (live teachers, full distribution), ``cache`` (the config's cache:
   the distilled student of ``pipe run``), ``topk`` (top --topk-k cache, ghost tail; every other cache
   mode is compared with it at about equal storage), ``topk-renormalize``, ``sampled`` (Sparse Logit
   Sampling at about the top-k cache's
   storage: the draw count among --sampled-candidates whose cache size is closest), the same
   sampled cache with alpha = 1 (no CE term; compared with the sweep's top-k cell at alpha = 1),
   ``hybrid`` (exact top-k head + importance-weighted tail draws, docs/cache-format.md) for each
   head size in --hybrid-heads (default: half the config's k), with the tail draw count among
   --hybrid-tail-candidates whose cache size is closest to the top-k cache's, at the config's
   alpha and at alpha = 1, ``online-a1`` (online at alpha = 1, what hybrid at alpha 1 is compared
   with), and the sweep k x T x alpha (cache and distillation at temperature T; alpha = KL weight,
   CE weight 1 - alpha). With --storage-ks, the same comparison of the cache modes at alpha = 1 at
   smaller (or larger) storage: at the size of a top-K cache, the top-K cache, the sampled cache
   and the hybrid caches (head K/2, or the head sizes given as K:H1/H2) closest to it in bytes
   per position. The candidates' sizes come from caches built one after another until one is at
   least the target's size; with --estimate-sizes, from the dry run's estimate instead (``pipe
   cache-logits --dry-run``: a few batches encoded and compressed as stored, seconds each), so that
   only the chosen caches are built.
3. RUN/experiments/experiments.json holds every number; the markdown goes to --out.

Everything lives under RUN/experiments/CACHE/ (data and teachers linked from RUN); a finished
cache or student is reused, so an interrupted run continues where it stopped. Works with any
config (e.g. your own corpus): pass --config and --set as for ``pipe run``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime as dt
import json
import multiprocessing
import os
import platform
import re
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from logitcache.pipeline.cache_logits import DryRunEstimate, cache_logits, dry_run
from logitcache.pipeline.config import CacheConfig, Config, load_config
from logitcache.pipeline.evaluation.compare import (
    PairedDifference,
    SeedSpread,
    combined_verdict,
    compare,
    headline_lines,
    one_factor_pairs,
    paired,
    relative_difference,
)
from logitcache.pipeline.evaluation.evaluate import EvalOptions, evaluate_models, read_results
from logitcache.pipeline.prepare import PreparedData
from logitcache.pipeline.rundir import PROVENANCE_FILE, RunLayout, git_commit, package_versions, read_marker
from logitcache.pipeline.runner import format_seconds, read_stage_log, run_pipeline
from logitcache.pipeline.student import train_student

REPO = Path(__file__).resolve().parent.parent
BASE_STUDENTS = 'run.students=["cache", "ce"]'
ALPHA_1 = ("student.distill.alpha=1.0",)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One kind of student: the cache it reads (config overrides) and its own settings."""

    name: str
    cache: tuple[str, ...] | None  # cache overrides; None = no cache (ce, online)
    student: tuple[str, ...]
    same_as: str = ""  # another variant with the same settings: its students are reused

    def cache_key(self) -> str:
        if self.cache is None:
            return "no-cache"
        if not self.cache:
            return "cache-default"
        return "cache-" + "-".join(o.split(".", 1)[1].replace("=", "") for o in self.cache)


def train_and_evaluate(config: Config) -> dict[str, Any]:
    """Train one student (or reuse it when complete) and evaluate it on the held-out split."""
    model_dir = train_student(config, progress=False)
    run = config.run_dir
    result = evaluate_models([model_dir], options=EvalOptions(data_dir=RunLayout(run).data), progress=False)
    held = result["models"][0]["held_out"]
    return {
        "perplexity": held["perplexity"],
        "loss": held["loss"],
        "ece": held["ece"],
        "tokens": held["tokens"],
        "model_dir": str(model_dir),
        # the code that trained it (a student reused from an earlier invocation keeps its own)
        "trained_at": json.loads((model_dir / PROVENANCE_FILE).read_text()).get("git_commit", "")[:7],
    }


def _link_base(base: Path, run: Path) -> None:
    run.mkdir(parents=True, exist_ok=True)
    for name in ("data", "teachers"):
        if (base / name).exists() and not (run / name).exists():
            (run / name).symlink_to((base / name).resolve())


class Experiment:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.base = Path(args.run_dir)
        self.root = self.base / "experiments"
        self.rows: list[dict[str, Any]] = []
        self.cache_summaries: dict[str, dict[str, Any]] = {}

    def config(self, run: Path, overrides: tuple[str, ...] | list[str]) -> Config:
        return load_config(self.args.config, [*self.args.set, *overrides], run_dir=run)

    def ensure_cache(self, variant: Variant) -> Path:
        run = self.root / variant.cache_key()
        _link_base(self.base, run)
        if variant.cache is not None:
            out = cache_logits(self.config(run, variant.cache))
            self.cache_summaries[variant.cache_key()] = (read_marker(out) or {}).get("summary", {})
        return run

    def student_job(self, variant: Variant, seed: int) -> tuple[Config, str]:
        """What ``train_and_evaluate`` needs for one student: its config, and its cache's key."""
        run = self.ensure_cache(variant)
        overrides = [
            *(variant.cache or ()),
            *variant.student,
            f"student.seed={seed}",
            f"student.name={variant.name}-s{seed}",
        ]
        return self.config(run, overrides), variant.cache_key()

    def train_all(self, tasks: list[tuple[Variant, int]], jobs: int) -> None:
        """Train and evaluate every (variant, seed), ``jobs`` at a time; rows in the order of ``tasks``.

        Caches are built first, one after another (each uses all cores); then the students run in
        ``jobs`` worker processes with ``cores / jobs`` threads each (small models use two single-
        threaded processes on two cores better than one two-threaded one).
        """
        own = [(v, s) for v, s in tasks if not v.same_as]
        configs = [self.student_job(v, s) for v, s in own]
        if jobs <= 1:
            results = [train_and_evaluate(config) for config, _ in configs]
        else:
            threads = max(1, (os.cpu_count() or 1) // jobs)
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(
                jobs, mp_context=context, initializer=torch.set_num_threads, initargs=(threads,)
            ) as pool:
                results = list(pool.map(train_and_evaluate, [config for config, _ in configs]))
        done = {}
        for (variant, seed), (_, key), result in zip(own, configs, results, strict=True):
            row = {
                "variant": variant.name,
                "seed": seed,
                "cache": key,
                "bytes_per_position": self.cache_summaries.get(key, {}).get("bytes_per_position"),
                **result,
            }
            done[(variant.name, seed)] = row
        for variant, seed in tasks:
            row = done[(variant.same_as or variant.name, seed)]
            self.rows.append(row | {"variant": variant.name})
            print(
                f"{variant.name} seed {seed}: perplexity {row['perplexity']:.2f}, ECE {row['ece']:.4f}",
                flush=True,
            )

    def cache_size(self, variant: Variant) -> float:
        """Bytes per position of ``variant``'s cache: built and measured, or with --estimate-sizes
        the dry run's estimate (the compression measured on a few batches; nothing is written)."""
        if not self.args.estimate_sizes:
            self.ensure_cache(variant)
            return self.cache_summaries[variant.cache_key()]["bytes_per_position"]
        # in the base run (its data and teachers): a dry run writes nothing
        return self.estimate(self.config(self.base, variant.cache)).bytes_per_position

    @staticmethod
    def estimate(config: Config) -> DryRunEstimate:
        return dry_run(config, batches=4)

    def closest_in_size(self, target_bytes: float, variants: list[Variant]) -> Variant:
        """Of ``variants`` (caches in ascending order of size), the one whose bytes per position are
        closest to ``target_bytes``: sizes are taken in order (:meth:`cache_size`) until one is at
        least as large as the target; of it and the one before, the closer one. Only the chosen
        cache has to be built (without --estimate-sizes, every size taken was a cache built)."""
        sizes: list[tuple[float, Variant]] = []
        for variant in variants:
            sizes.append((self.cache_size(variant), variant))
            if sizes[-1][0] >= target_bytes:
                break
        return min(sizes[-2:], key=lambda pair: abs(pair[0] - target_bytes))[1]

    def sampled_variant(self, target_bytes: float) -> Variant:
        """The sampled cache (draw count among --sampled-candidates) closest in size to the target."""
        return self.closest_in_size(
            target_bytes,
            [
                Variant(f"sampled-n{n}", ("cache.mode=sampled", f"cache.samples={n}"), ())
                for n in _ints(self.args.sampled_candidates)
            ],
        )

    def hybrid_variant(self, target_bytes: float, head: int) -> Variant:
        """The hybrid cache with a top-``head`` head (tail draw count among --hybrid-tail-candidates)
        closest in size to the target."""
        return self.closest_in_size(
            target_bytes,
            [
                Variant(
                    f"hybrid-k{head}-m{m}",
                    ("cache.mode=hybrid", f"cache.k={head}", f"cache.tail_samples={m}"),
                    (),
                )
                for m in _ints(self.args.hybrid_tail_candidates)
            ],
        )

    def storage_levels(
        self, spec: str, taken: set[str] | frozenset[str] = frozenset()
    ) -> tuple[list[dict], list[Variant]]:
        """The levels of ``--storage-ks`` (``16,32`` or ``16:2/4/8,32:16``) and their variants, less
        those named in ``taken`` (trained anyway)."""
        levels, variants = [], []
        for item in filter(None, spec.split(",")):
            k, _, heads = item.partition(":")
            level, level_variants = self.storage_level(int(k), [int(h) for h in heads.split("/") if h])
            levels.append(level)
            variants += [v for v in level_variants if v.name not in taken | {u.name for u in variants}]
        return levels, variants

    def storage_level(self, k: int, heads: list[int]) -> tuple[dict[str, Any], list[Variant]]:
        """The three cache modes at the storage of a top-``k`` cache, each at alpha = 1 (no CE term:
        what the cache alone teaches): top-k, the sampled cache and, for each head size in
        ``heads`` (default k // 2), the hybrid cache closest in size."""
        topk = Variant(f"topk-k{k}", ("cache.mode=topk", f"cache.k={k}"), ())
        self.ensure_cache(topk)
        target = self.cache_summaries[topk.cache_key()]["bytes_per_position"]
        chosen = {
            "topk": [topk],
            "sampled": [self.sampled_variant(target)],
            "hybrid": [self.hybrid_variant(target, head) for head in heads or [max(1, k // 2)]],
        }
        variants = {
            mode: [dataclasses.replace(v, name=f"{v.name}-a1", student=ALPHA_1) for v in group]
            for mode, group in chosen.items()
        }
        level = {"k": k, "bytes_per_position": target} | {m: [v.name for v in g] for m, g in variants.items()}
        return level, [v for group in variants.values() for v in group]


def _ints(text: str) -> list[int]:
    """Comma-separated integers: "16,32" -> [16, 32]; "" -> []."""
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.toml"))
    parser.add_argument("--run-dir", default="runs/results-demo")
    parser.add_argument("--set", action="append", default=[], help="config override, as for pipe run")
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument(
        "--topk-k", type=int, default=64, help="k of the top-k cache the other modes are compared with"
    )
    parser.add_argument("--ks", default="8,64")
    parser.add_argument("--temps", default="1,2")
    parser.add_argument("--alphas", default="0.5,1.0")
    parser.add_argument(
        "--sampled-candidates",
        default="8,16,24,32,48,64,96,128,192,256",
        help="draw counts to try, ascending",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="students trained at once, in processes of cores/jobs threads each",
    )
    parser.add_argument(
        "--hybrid-heads", default="", help="head sizes k of the hybrid caches (default: half the config's k)"
    )
    parser.add_argument(
        "--hybrid-tail-candidates",
        default="2,4,8,16,32,48,64,96,128",
        help="tail draw counts to try, ascending",
    )
    parser.add_argument(
        "--storage-ks",
        default="",
        help="more storage levels (the size of a top-K cache, e.g. 16,32) at which top-k, sampled and "
        "hybrid caches are compared at alpha = 1; K:H1/H2 sets the hybrids' head sizes (default K/2), "
        "e.g. 16:2/4/8,32:16",
    )
    parser.add_argument(
        "--estimate-sizes",
        action="store_true",
        help="choose the sampled and hybrid draw counts by the dry run's size estimate (`pipe "
        "cache-logits --dry-run`: seconds per candidate) and build only the chosen caches, instead of "
        "building every candidate up to the target (for configs whose caches take minutes each)",
    )
    parser.add_argument(
        "--settings-note",
        default="",
        help="a doc (path relative to docs/) recording how the student's settings were chosen, linked from --out",
    )
    parser.add_argument("--out", default=str(REPO / "docs" / "results.md"))
    parser.add_argument(
        "--one-run",
        metavar="NAME",
        default="",
        help="only `pipe run CONFIG` (no seed experiments), written as section NAME of --out",
    )
    parser.add_argument(
        "--levels-only",
        metavar="NAME",
        default="",
        help="only the --storage-ks students (after `pipe run CONFIG`), written as section NAME of --out",
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="rewrite --out from RUN/experiments/experiments.json; train nothing",
    )
    args = parser.parse_args()
    if args.render_only:
        recorded = Path(args.run_dir) / "experiments" / "experiments.json"
        if not recorded.is_file():
            sys.exit(f"error: {recorded} does not exist; run without --render-only first.")
        document = json.loads(recorded.read_text())
        meta = document["meta"]
        if args.settings_note:
            meta["settings_note"] = args.settings_note
        config = load_config(meta["config"], [*meta["overrides"], BASE_STUDENTS], run_dir=meta["run_dir"])
        write_markdown(document, config, Path(args.out))
        return
    started = time.perf_counter()
    commit = git_commit()[:7]  # the code that runs, read before anything else can change it
    if args.one_run:
        one_run(args, commit)
        return
    if args.levels_only:
        levels_only(args, commit, started)
        return
    seeds = _ints(args.seeds)

    base_config = load_config(args.config, [*args.set, BASE_STUDENTS], run_dir=args.run_dir)
    run_pipeline(base_config, log=lambda line: print(line, flush=True))
    exp = Experiment(args)

    topk_k = args.topk_k
    topk = Variant("topk", ("cache.mode=topk", f"cache.k={topk_k}"), ())
    main_variants = [
        Variant("ce", None, ("student.mode=ce",)),
        Variant("online", None, ("student.mode=online",)),
        topk,
        dataclasses.replace(topk, name="topk-renormalize", student=("student.distill.tail=renormalize",)),
    ]
    exp.ensure_cache(topk)
    topk_bytes = exp.cache_summaries[topk.cache_key()]["bytes_per_position"]
    sampled = exp.sampled_variant(topk_bytes)
    # alpha = 1 (no CE term) isolates what the cache teaches: top-k at alpha 1 is in the sweep
    main_variants += [sampled, dataclasses.replace(sampled, name=f"{sampled.name}-a1", student=ALPHA_1)]
    heads = (
        [int(x) for x in args.hybrid_heads.split(",")]
        if args.hybrid_heads
        else [max(1, base_config.cache.k // 2)]
    )
    for head in heads:
        hybrid = exp.hybrid_variant(topk_bytes, head)
        main_variants += [hybrid, dataclasses.replace(hybrid, name=f"{hybrid.name}-a1", student=ALPHA_1)]
    main_variants.append(Variant("online-a1", None, ("student.mode=online", *ALPHA_1)))
    levels, level_variants = exp.storage_levels(args.storage_ks, taken={v.name for v in main_variants})
    # the config's own cache: the distilled student of `pipe run`, reused from the variant with the
    # same cache and settings when there is one
    twin = next(
        (
            v.name
            for v in main_variants
            if v.cache is not None
            and not v.student
            and exp.config(exp.base, v.cache).cache == base_config.cache
        ),
        "",
    )
    main_variants.insert(2, Variant("cache", (), (), same_as=twin))
    sweep = []
    cache, distill = base_config.cache, base_config.student.distill
    for k in [int(x) for x in args.ks.split(",")]:
        for temp in [float(x) for x in args.temps.split(",")]:
            for alpha in [float(x) for x in args.alphas.split(",")]:
                is_default = (k, temp, temp, alpha) == (
                    topk_k,
                    cache.temperature,
                    distill.temperature,
                    distill.alpha,
                )
                sweep.append(
                    Variant(
                        f"sweep-k{k}-T{temp:g}-a{alpha:g}",
                        ("cache.mode=topk", f"cache.k={k}", f"cache.temperature={temp}"),
                        (f"student.distill.temperature={temp}", f"student.distill.alpha={alpha}"),
                        same_as="topk" if is_default else "",
                    )
                )
    exp.train_all(
        [(variant, seed) for seed in seeds for variant in [*main_variants, *level_variants, *sweep]],
        args.jobs,
    )

    meta = {
        **_invocation(args, commit),
        "versions": package_versions(),
        "wall_minutes": (time.perf_counter() - started) / 60,
        "seeds": seeds,
        "topk_k": topk_k,
        "overrides": args.set,
        "run_dir": str(args.run_dir),
        "settings_note": args.settings_note,
    }
    document = {
        "meta": meta,
        "base_config": base_config.to_dict(),
        "cache_summaries": exp.cache_summaries,
        "rows": exp.rows,
        "variants": {
            "main": [v.name for v in main_variants],
            "sweep": [dataclasses.asdict(v) for v in sweep],
            "levels": levels,
        },
    }
    (exp.root / "experiments.json").write_text(json.dumps(document, indent=2) + "\n")
    write_markdown(document, base_config, Path(args.out))


def write_markdown(document: dict, config: Config, out: Path) -> None:
    """Write the seed experiments to ``out``, keeping the one-run sections already there (--one-run)."""
    run = Path(document["meta"]["run_dir"])
    layout = RunLayout(run)
    text = render(document, read_results(layout.eval_results), config, PreparedData.open(layout.data))
    kept = _sections(out.read_text()) if out.is_file() else {}
    out.write_text(text.rstrip("\n") + "\n" + "".join(f"\n{block}\n" for block in kept.values()))
    print(f"wrote {out} from {run / 'experiments' / 'experiments.json'}")


def _section_marks(name: str, option: str) -> tuple[str, str]:
    return f"<!-- section {name}: begin (scripts/reproduce_results.py {option} {name}) -->", (
        f"<!-- section {name}: end -->"
    )


def _sections(text: str) -> dict[str, str]:
    """The sections of a results file (--one-run, --levels-only) by name, each with its marks."""
    found = {}
    for match in re.finditer(r"<!-- section (\S+): begin .*?-->.*?<!-- section \1: end -->", text, re.DOTALL):
        found[match.group(1)] = match.group(0)
    return found


def write_section(name: str, block: str, out: Path, option: str) -> None:
    """Put one section (written by ``option NAME``: --one-run, --levels-only) into ``out``: in place
    of the section of that name, else at the end."""
    begin, end = _section_marks(name, option)
    block = f"{begin}\n{block.strip()}\n{end}"
    text = out.read_text() if out.is_file() else "# Results\n"
    old = _sections(text).get(name)
    text = text.replace(old, block) if old else text.rstrip("\n") + f"\n\n{block}\n"
    out.write_text(text)
    print(f"wrote section {name!r} of {out}")


def _invocation(args: argparse.Namespace, commit: str) -> dict[str, str]:
    """What every results document records of the run that wrote it: command, date, commit,
    device and config."""
    return {
        "command": "python scripts/reproduce_results.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
        "commit": commit,
        "device": _device(),
        "config": str(args.config),
    }


def levels_only(args: argparse.Namespace, commit: str, started: float) -> None:
    """``pipe run CONFIG``, then only the students of ``--storage-ks`` over ``--seeds``: their
    table and verdicts as section ``--levels-only NAME`` of --out (RUN/experiments/levels-NAME.json
    holds the numbers). For a config too large for the whole seed experiment."""
    if not args.storage_ks:
        sys.exit("error: --levels-only needs --storage-ks (e.g. --storage-ks 16,32).")
    seeds = _ints(args.seeds)
    base_config = load_config(args.config, args.set, run_dir=args.run_dir)
    run_pipeline(base_config, log=lambda line: print(line, flush=True))
    exp = Experiment(args)
    levels, variants = exp.storage_levels(args.storage_ks)
    exp.train_all([(variant, seed) for seed in seeds for variant in variants], args.jobs)
    document = {
        "meta": {
            **_invocation(args, commit),
            "wall_minutes": (time.perf_counter() - started) / 60,
            "seeds": seeds,
            "overrides": args.set,
        },
        "cache_summaries": exp.cache_summaries,
        "rows": exp.rows,
        "levels": levels,
    }
    (exp.root / f"levels-{args.levels_only}.json").write_text(json.dumps(document, indent=2) + "\n")
    write_section(
        args.levels_only, render_levels_only(document, base_config), Path(args.out), "--levels-only"
    )


def render_levels_only(document: dict, config: Config) -> str:
    """The section of ``--levels-only``: what ran, the alpha = 1 table and its verdicts."""
    meta, rows = document["meta"], document["rows"]
    trained = {r["variant"] for r in rows}
    levels = [
        level | {mode: [n for n in level[mode] if n in trained] for mode in _MODES}
        for level in document["levels"]
    ]
    table = _levels_table(levels, rows)
    lines = [
        f"## `{Path(meta['config']).name}`: cache modes at equal storage, alpha = 1, seeds "
        + ", ".join(map(str, meta["seeds"])),
        "",
        f"- Command: `{meta['command']}`.",
        f"- Device: {meta['device']}; date {meta['date']}; commit {meta['commit']}; "
        f"{meta['wall_minutes']:.0f} min wall for this invocation (models already trained in RUN are reused).",
        f"- Teachers: {', '.join(config.teachers)}; student {config.student.model.family} hidden "
        f"{config.student.model.hidden_size} x {config.student.model.num_layers} layers.",
        "",
        *table[2:],  # the table without its heading
        *_levels_verdicts(levels, rows),
    ]
    return "\n".join(lines)


def one_run(args: argparse.Namespace, commit: str) -> None:
    """``pipe run CONFIG`` as configured, then its section of --out: stage times, models, targets."""
    config = load_config(args.config, args.set, run_dir=args.run_dir)
    run_pipeline(config, log=lambda line: print(line, flush=True))
    layout = RunLayout.of(config)
    meta = _invocation(args, commit)
    block = render_one_run(
        meta,
        config,
        read_results(layout.eval_results),
        read_stage_log(layout),
        PreparedData.open(layout.data),
    )
    write_section(args.one_run, block, Path(args.out), "--one-run")


def render_one_run(meta: dict, config: Config, results: dict, stages: list[dict], data: PreparedData) -> str:
    """The section of one ``pipe run``: what ran where, each stage's time, every model, the targets."""
    lines: list[str] = []
    add = lines.append
    name = Path(meta["config"]).name
    add(f"## `{name}`: one `pipe run` (run seed {config.run.seed})")
    add("")
    add(
        f"- Command: `{meta['command']}` (runs `pipe run {_shown_path(meta['config'])}`, then writes this section)."
    )
    add(f"- Device: {meta['device']}; date {meta['date']}; commit {meta['commit']}.")
    add(
        f"- Data: corpus `{_shown_path(config.data.corpus)}`, at most {config.data.max_chars_per_file:,} characters "
        f"per source (0 = all), {_data_sizes(data)}."
    )
    student = config.student
    add(
        f"- Teachers: {', '.join(config.teachers)}; student {student.model.family} hidden {student.model.hidden_size} x "
        f"{student.model.num_layers} layers; {_cache_description(config.cache)}; alpha {student.distill.alpha:g}, "
        f"T {student.distill.temperature:g}."
    )
    add("")
    latest = {entry["stage"]: entry for entry in stages}  # the last time each stage ran
    if latest:
        total = sum(entry["seconds"] for entry in latest.values())
        add(f"Time of each stage (`RUN/stages.jsonl`, the last run of each; {len(latest)} stages):")
        add("")
        add("| stage | wall time | commit |")
        add("|---|---:|---|")
        for entry in latest.values():
            add(f"| {entry['stage']} | {format_seconds(entry['seconds'])} | {entry['git_commit'][:7]} |")
        add(f"| **total** | **{format_seconds(total)}** | |")
        add("")
    models = results["models"]
    twins = {n: t for t in results.get("random_twins", []) for n in t.get("twin_of", [])}
    fields = sorted({f for m in models if m.get("blimp") for f in m["blimp"]["fields"]})
    add(
        "| model | parameters | test perplexity | ECE | BLiMP | vs random-init twin | "
        + " | ".join(fields)
        + " |"
    )
    add("|---" * (6 + len(fields)) + "|")

    def row(label: str, entry: dict, above: str) -> None:
        h, b = entry.get("held_out") or {}, entry.get("blimp")
        params = f"{entry['parameters']:,}" if "parameters" in entry else "-"
        blimp = (
            [
                f"{100 * b['overall']:.1f}",
                above,
                *(f"{100 * b['fields'].get(f, float('nan')):.1f}" for f in fields),
            ]
            if b
            else ["-", "-", *("-" for _ in fields)]
        )
        add(
            f"| {label} | {params} | {h.get('perplexity', float('nan')):.1f} | {h.get('ece', float('nan')):.4f} | "
            + " | ".join(blimp)
            + " |"
        )

    gains = {}
    for m in models:
        twin = twins.get(m["name"])
        if m.get("blimp") and twin and twin.get("blimp"):
            gains[m["name"]] = 100 * (m["blimp"]["overall"] - twin["blimp"]["overall"])
        row(m["name"], m, f"{gains[m['name']]:+.1f}" if m["name"] in gains else "-")
    for twin in results.get("random_twins", []):
        row(f"{twin['name']} (untrained)", twin, "")
    for ref in results.get("references", []):
        row(f"{ref['name']} (reference)", ref, "")
    add("")
    per_paradigm = results["settings"].get("blimp_pairs_per_paradigm", "all")
    add(f"BLiMP in % ({per_paradigm} pairs per paradigm; a pair is right when the good sentence scores")
    add('strictly higher); "vs random-init twin" = points above the same architecture untrained (seed 0).')
    add("")
    add("What the run shows (one seed; these sentences are computed from the table):")
    add("")
    for line in headline_lines(results):
        add(f"- {line}")
    add("")
    checked = [n for n in gains if n.startswith("teachers/") or n == "students/cache"]
    if checked:
        met = all(gains[n] >= 5.0 for n in checked)
        add(
            "- Target: every teacher and the distilled student at least 5 BLiMP points above its random-init "
            f"twin: **{'met' if met else 'not met'}** ("
            + ", ".join(f"{n} {gains[n]:+.1f}" for n in checked)
            + ")."
        )
    by_name = {m["name"]: m for m in models}
    cache, ce = by_name.get("students/cache"), by_name.get("students/ce")
    if cache and ce and cache.get("blimp") and ce.get("blimp"):
        ppl_ok = cache["held_out"]["perplexity"] <= ce["held_out"]["perplexity"]
        blimp_ok = cache["blimp"]["overall"] >= ce["blimp"]["overall"]
        add(
            "- Target: the distilled student at least as good as its CE twin on both perplexity and BLiMP: "
            f"**{'met' if ppl_ok and blimp_ok else 'not met'}** (perplexity {cache['held_out']['perplexity']:.1f} vs "
            f"{ce['held_out']['perplexity']:.1f}, BLiMP {100 * cache['blimp']['overall']:.1f} vs "
            f"{100 * ce['blimp']['overall']:.1f}; one seed, so a BLiMP difference under a point is within noise)."
        )
    if latest:
        add(
            f"- Target: the whole `pipe run` in at most 90 minutes on the 2-core CPU: {format_seconds(total)} "
            f"on {meta['device']}, **{'met' if total <= 90 * 60 else 'not met'}**."
        )
    seconds = [m["seconds"] for m in [*models, *results.get("random_twins", [])] if m.get("seconds")]
    if seconds:
        add(
            f"- `pipe evaluate`: {statistics.median(seconds):.0f} s per model (median of {len(seconds)}, "
            f"{min(seconds):.0f}-{max(seconds):.0f} s): the test split and BLiMP ({per_paradigm} pairs per paradigm)."
        )
    return "\n".join(lines)


def _shown_path(path: str | Path) -> str:
    """A path relative to the repository when inside it (so the docs do not name this machine's paths)."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _device() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.machine()}, {torch.get_num_threads()} threads"


# ---------------------------------------------------------------------------------------------
# Rendering: tables and verdicts computed from the numbers (see logitcache.pipeline.evaluation.compare)


def _spreads(rows: list[dict], variant: str, metric: str) -> SeedSpread:
    return SeedSpread.of([r[metric] for r in rows if r["variant"] == variant])


def _paired(rows: list[dict], a: str, b: str, metric: str) -> PairedDifference:
    values = {name: {r["seed"]: r[metric] for r in rows if r["variant"] == name} for name in (a, b)}
    return paired(values[a], values[b])


def _pair_text(pair: PairedDifference) -> str:
    return (
        f"paired by seed: lower in {pair.lower} of {len(pair.seeds)}, higher in {pair.higher} "
        f"(sign test p = {pair.sign_test_p:.2f})"
    )


def _verdict_sentence(
    label_a: str,
    a: SeedSpread,
    label_b: str,
    b: SeedSpread,
    metric: str,
    digits: int,
    pair: PairedDifference | None = None,
) -> str:
    usable = pair if pair is not None and len(pair.seeds) > 1 else None
    verdict, by_pairs = combined_verdict(a, b, usable)
    diff = 100 * relative_difference(a, b)
    words = {"better": "lower (better)", "worse": "higher (worse)", "within seed noise": "within seed noise"}[
        verdict
    ]
    if by_pairs:
        words += " by the paired comparison (the seed ranges overlap)"
    caveat = " (single runs: their seed noise is unknown)" if len(a.values) == len(b.values) == 1 else ""
    paired_text = f"; {_pair_text(usable)}" if usable is not None else ""
    return (
        f"{label_a} vs {label_b}: {metric} {a.format(digits)} vs {b.format(digits)} "
        f"({diff:+.1f} %): **{words}**{caveat}{paired_text}"
    )


def _variants_sentence(
    rows: list[dict], label_a: str, a: str, label_b: str, b: str, metric: str, digits: int
) -> str:
    """:func:`_verdict_sentence` for two trained variants: spreads and per-seed pairs from ``rows``."""
    return _verdict_sentence(
        label_a,
        _spreads(rows, a, metric),
        label_b,
        _spreads(rows, b, metric),
        {"ece": "ECE"}.get(metric, metric),
        digits,
        _paired(rows, a, b, metric),
    )


def _sweep_cell(variant: dict) -> tuple[float, float, float]:
    """(k, T, alpha) of a sweep variant, read from its overrides."""
    values = dict(o.split("=", 1) for o in (*variant["cache"], *variant["student"]))
    return (
        float(values["cache.k"]),
        float(values["cache.temperature"]),
        float(values["student.distill.alpha"]),
    )


def _sampled_label(name: str) -> str:
    """``sampled-n128`` / ``sampled-n128-a1``: the table's description."""
    draws, _, alpha = name.removeprefix("sampled-n").partition("-a")
    return f"sampled cache, {draws} draws per position" + (f", alpha {alpha} (no CE term)" if alpha else "")


def _hybrid_label(name: str) -> str:
    """``hybrid-k32-m48`` / ``hybrid-k32-m48-a1``: the table's description."""
    head, _, rest = name.removeprefix("hybrid-k").partition("-m")
    draws, _, alpha = rest.partition("-a")
    return f"hybrid cache, top-{head} head + {draws} tail draws" + (
        f", alpha {alpha} (no CE term)" if alpha else ""
    )


def _cache_label(name: str) -> str:
    """A level variant's cache in words: ``topk-k16-a1`` -> "top-16", ``sampled-n24-a1`` -> "sampled,
    24 draws", ``hybrid-k8-m4-a1`` -> "hybrid, top-8 head + 4 tail draws"; the sweep's top-k cell
    (``sweep-k64-T1-a1``) -> "top-64"."""
    if match := re.fullmatch(r"(?:topk-k|sweep-k)(\d+)\b.*", name):
        return f"top-{match.group(1)}"
    if name.startswith("sampled"):
        return "sampled, " + _sampled_label(name.removesuffix("-a1")).removeprefix("sampled cache, ").replace(
            " per position", ""
        )
    return "hybrid, " + _hybrid_label(name.removesuffix("-a1")).removeprefix("hybrid cache, ")


_MODES = ("topk", "sampled", "hybrid")


def _levels_table(levels: list[dict[str, Any]], rows: list[dict]) -> list[str]:
    """The alpha = 1 table of the cache modes at each storage level (markdown lines)."""
    out = [
        "## Cache modes at equal storage, alpha = 1",
        "",
        "No CE term: what each cache alone teaches. At each storage level (the size of a top-K cache),",
        "the sampled and hybrid caches are those closest to it in bytes per position.",
        "",
        "| storage level | cache | bytes/position | test perplexity | ECE |",
        "|---|---|---:|---:|---:|",
    ]
    for level in levels:
        for mode in _MODES:
            for name in level[mode]:
                size = next(r["bytes_per_position"] for r in rows if r["variant"] == name)
                out.append(
                    f"| top-{level['k']} ({level['bytes_per_position']:.1f} B) | {_cache_label(name)} | "
                    f"{size:.1f} | {_spreads(rows, name, 'perplexity').format(1)} | "
                    f"{_spreads(rows, name, 'ece').format(4)} |"
                )
    return [*out, ""]


def _levels_verdicts(levels: list[dict[str, Any]], rows: list[dict]) -> list[str]:
    """Each hybrid of a storage level against that level's top-k and sampled caches (markdown items)."""
    out = []
    for level in levels:
        if not (level["topk"] and level["sampled"]):
            continue
        (topk_name,), (sampled_name,) = level["topk"], level["sampled"]
        for hybrid_name in level["hybrid"]:
            out.append(
                f"- At the storage of a top-{level['k']} cache ({level['bytes_per_position']:.1f} bytes/position), "
                f"alpha = 1, {_cache_label(hybrid_name)}: "
                + _variants_sentence(
                    rows, "hybrid", hybrid_name, f"top-{level['k']}", topk_name, "perplexity", 1
                )
                + "; "
                + _variants_sentence(rows, "hybrid", hybrid_name, "sampled", sampled_name, "perplexity", 1)
                + f" ({_cache_label(sampled_name)})."
            )
    return out


def _storage_levels(document: dict, config: Config) -> list[dict[str, Any]]:
    """The storage levels of the alpha = 1 comparison: the main one (top --topk-k: its sweep cell,
    the sampled and every hybrid cache at alpha 1, where trained) then each of --storage-ks. Each
    level: ``k``, ``bytes_per_position`` and the variant names per mode (lists)."""
    meta, rows = document["meta"], document["rows"]
    trained = {r["variant"] for r in rows}
    topk_k = meta.get("topk_k", config.cache.k)
    main_names = document["variants"]["main"]
    topk_a1 = [
        v["name"]
        for v in document["variants"]["sweep"]
        if _sweep_cell(v) == (topk_k, config.cache.temperature, 1.0)
        and config.student.distill.temperature == config.cache.temperature
    ]
    main = {
        "k": topk_k,
        "bytes_per_position": next(
            (r["bytes_per_position"] for r in rows if r["variant"] == "topk"), float("nan")
        ),
        "topk": topk_a1,
        "sampled": [n for n in main_names if n.startswith("sampled") and n.endswith("-a1")],
        "hybrid": [n for n in main_names if n.startswith("hybrid") and n.endswith("-a1")],
    }
    return [
        level | {mode: [n for n in level[mode] if n in trained] for mode in _MODES}
        for level in [main, *document["variants"].get("levels", [])]
    ]


def _sweep_verdicts(sweep: list[dict], rows: list[dict]) -> list[str]:
    """For each factor (k, T, alpha): every pair of sweep cells that differ in it alone."""
    cells = {_sweep_cell(v): v["name"] for v in sweep}
    names = ("k", "T", "alpha")
    out = []
    for axis, pairs in one_factor_pairs(cells):
        values = sorted({key[axis] for key in cells})
        parts = []
        for high, low, key in pairs:
            a, b = _spreads(rows, high, "perplexity"), _spreads(rows, low, "perplexity")
            fixed = ", ".join(f"{names[i]} {key[i]:g}" for i in range(3) if i != axis)
            pair = _paired(rows, high, low, "perplexity")
            parts.append(
                f"{fixed}: {compare(a, b)} ({100 * relative_difference(a, b):+.1f} %, "
                f"lower in {pair.lower} of {len(pair.seeds)} seeds)"
            )
        out.append(f"{names[axis]} = {values[-1]:g} vs {values[0]:g}: " + "; ".join(parts))
    return out


def render(document: dict, base_results: dict, config: Config, data: PreparedData) -> str:
    meta, rows = document["meta"], document["rows"]
    caches = document["cache_summaries"]
    seeds = meta["seeds"]
    lines: list[str] = []
    add = lines.append
    add("# Results")
    add("")
    add("Generated by `scripts/reproduce_results.py` (do not edit by hand: rerun it). Only what was")
    add("measured, with the command, device, date and commit.")
    add("")
    add(f"- Command: `{meta['command']}`")
    add(
        f"- Device: {meta['device']}; date {meta['date']}; commit {meta['commit']}; "
        f"{meta['wall_minutes']:.0f} min wall for this invocation (models already trained in RUN are reused)"
        + (
            f"; this file rendered at commit {now} (`--render-only`)."
            if (now := git_commit()[:7]) != meta["commit"]
            else "."
        )
    )
    trained = collections.Counter(r.get("trained_at") or "unknown" for r in rows)
    add(
        "- Students of the seed experiments trained at commit "
        + ", ".join(f"{c} ({n} models)" for c, n in sorted(trained.items()))
        + "."
    )
    versions = meta["versions"]
    add(
        f"- Software: Python {versions.get('python')}, torch {versions.get('torch')}, "
        f"transformers {versions.get('transformers')}."
    )
    add(
        f"- Data: corpus `{_shown_path(config.data.corpus)}` as configured in `{_shown_path(meta['config'])}` "
        f"({_data_sizes(data)}); BLiMP: `{_shown_path(config.evaluate.blimp_dir) if config.evaluate.blimp_dir else '-'}`."
    )
    cache = config.cache
    topk_k = meta.get("topk_k", cache.k)
    cache_row = next(r for r in rows if r["variant"] == "cache")
    default_summary = caches.get(cache_row["cache"], {})
    topk_summary = caches.get(next(r["cache"] for r in rows if r["variant"] == "topk"), {})
    add(
        f"- Distillation defaults: ensemble {cache.ensemble} of {len(config.teachers)} teachers, "
        f"{_cache_description(cache)} (T = {cache.temperature:g}), "
        f"{default_summary.get('bytes_per_position', float('nan')):.1f} bytes per position "
        f"(mean teacher entropy {default_summary.get('mean_teacher_entropy', float('nan')):.2f} nats; a top-{topk_k} "
        f"cache captures on average {100 * topk_summary.get('mean_captured_mass', float('nan')):.0f} % of the "
        "ensemble's probability mass); "
        f"student loss (1 - alpha) CE + alpha T² KL with alpha = {config.student.distill.alpha:g}, "
        f"T = {config.student.distill.temperature:g}, tail `{config.student.distill.tail}`."
    )
    if meta.get("settings_note"):
        add(
            "- Student training settings (lr, weight decay, epochs, dropout): the CE twin's best on the dev split; "
            f"every setting tried, with its dev loss per seed: [{meta['settings_note']}]({meta['settings_note']}). "
            "The distilled students use the same settings and only add the teacher term."
        )
    add("")

    # Table 1: the `pipe run` models, one seed
    add(f"## Teachers and students of one `pipe run` (run seed {config.run.seed})")
    add("")
    models = base_results["models"]
    fields = sorted({f for m in models if m.get("blimp") for f in m["blimp"]["fields"]})
    add(
        "| model | parameters | test perplexity | test loss | ECE | BLiMP overall | "
        + " | ".join(fields)
        + " |"
    )
    add("|---" * (6 + len(fields)) + "|")
    for m in models:
        h, b = m["held_out"], m.get("blimp")
        blimp = (
            [f"{100 * b['overall']:.1f}"] + [f"{100 * b['fields'].get(f, float('nan')):.1f}" for f in fields]
            if b
            else ["-"] * (1 + len(fields))
        )
        add(
            f"| {m['name']} | {m['parameters']:,} | {h['perplexity']:.1f} | {h['loss']:.4f} | {h['ece']:.4f} | "
            + " | ".join(blimp)
            + " |"
        )
    add("")
    add("BLiMP overall is the unweighted mean over paradigms; a pair counts as right only when the good")
    add("sentence scores strictly higher (docs/evaluation.md).")
    add("")

    # Table 2: one change at a time, over seeds
    add(f"## One change at a time, seeds {', '.join(map(str, seeds))}")
    add("")
    add("Same student architecture and training; `student.seed` sets initialisation and data order.")
    add("Mean (min-max) over seeds on the test split.")
    add("")
    add("| student | cache bytes/position | test perplexity | ECE |")
    add("|---|---:|---:|---:|")
    descriptions = {
        "ce": "ce (no teacher)",
        "online": "online (live teachers, full vocabulary)",
        "cache": f"the config's cache: {_cache_description(cache)} (`pipe run`'s distilled student)",
        "topk": f"top-{topk_k} cache, ghost tail",
        "topk-renormalize": f"top-{topk_k} cache, renormalised",
        "online-a1": "online, alpha 1 (no CE term)",
    }
    for name in document["variants"]["main"]:
        group = [r for r in rows if r["variant"] == name]
        label = descriptions.get(
            name,
            _sampled_label(name)
            if name.startswith("sampled")
            else _hybrid_label(name)
            if name.startswith("hybrid")
            else name,
        )
        size = group[0]["bytes_per_position"]
        add(
            f"| {label} | {'-' if size is None else f'{size:.1f}'} | {_spreads(rows, name, 'perplexity').format(1)} | "
            f"{_spreads(rows, name, 'ece').format(4)} |"
        )
    add("")

    # Table 3: the sweep
    add("## Sweep: k x T x alpha")
    add("")
    add("Cache and distillation at temperature T; alpha = KL weight (alpha = 1: no CE term).")
    add("")
    add("| k | T | alpha | cache bytes/position | test perplexity | ECE |")
    add("|---:|---:|---:|---:|---:|---:|")
    for v in document["variants"]["sweep"]:
        name = v["name"]
        k, temp, alpha = _sweep_cell(v)
        size = next(r["bytes_per_position"] for r in rows if r["variant"] == name)
        add(
            f"| {k:g} | {temp:g} | {alpha:g} | {size:.1f} | {_spreads(rows, name, 'perplexity').format(1)} | "
            f"{_spreads(rows, name, 'ece').format(4)} |"
        )
    add("")

    levels = _storage_levels(document, config)
    if len(levels) > 1:
        lines.extend(_levels_table(levels, rows))

    # Verdicts
    add("## What the numbers support")
    add("")
    add("Rule: a difference counts when the seed ranges (min-max) do not overlap, or, where they")
    add("overlap and both sides have the same seeds, when the per-seed comparison is one-sided enough")
    add("(same seed = same initialisation and data order, so much of the noise cancels): an exact sign")
    add("test at p < 0.05, which needs at least 6 seeds that all agree. A teacher is one training run,")
    add("so its own seed noise is unknown. These sentences are computed from the tables above.")
    add("")
    ppl = {name: _spreads(rows, name, "perplexity") for name in document["variants"]["main"]}
    add(
        "- "
        + _variants_sentence(
            rows, "distilled student (the config's cache)", "cache", "CE twin", "ce", "perplexity", 1
        )
        + "."
    )
    add(
        "- "
        + _variants_sentence(rows, "online distillation", "online", "CE twin", "ce", "perplexity", 1)
        + "."
    )
    teachers = [m for m in models if m["name"].startswith("teachers/")]
    for t in teachers:
        tp = SeedSpread.of([t["held_out"]["perplexity"]])
        add("- " + _verdict_sentence("distilled student", ppl["cache"], t["name"], tp, "perplexity", 1) + ".")
    for name, what in (
        ("cache", f"the config's cache ({_cache_description(cache)})"),
        ("topk", f"a top-{topk_k} cache"),
    ):
        fidelity = 100 * relative_difference(ppl[name], ppl["online"])
        met = "met" if abs(fidelity) <= 1.0 else "not met"
        add(
            f"- Cache fidelity (target ≤ 1 % perplexity difference from online distillation), {what}: "
            f"{fidelity:+.1f} % on the means, **{met}**; by the seed-range rule: {compare(ppl[name], ppl['online'])}; "
            f"{_pair_text(_paired(rows, name, 'online', 'perplexity'))}."
        )
    sampled = next(n for n in document["variants"]["main"] if n.startswith("sampled"))
    sampled_a1 = f"{sampled}-a1" if f"{sampled}-a1" in ppl else None
    topk_a1 = next(iter(levels[0]["topk"]), None)  # the sweep's top-k cell at alpha 1
    sampled_bytes = next(r["bytes_per_position"] for r in rows if r["variant"] == sampled)
    topk_bytes = topk_summary.get("bytes_per_position", float("nan"))
    add(
        f"- Sampled ({sampled.split('-n')[-1]} draws) vs top-{topk_k} cache, storage {sampled_bytes:.1f} vs "
        f"{topk_bytes:.1f} bytes/position ({sampled_bytes / topk_bytes:.2f}x): "
        + _variants_sentence(rows, "sampled", sampled, "top-k", "topk", "perplexity", 1)
        + "; "
        + _variants_sentence(rows, "sampled", sampled, "top-k", "topk", "ece", 4)
        + "."
    )
    if sampled_a1 and topk_a1:
        add(
            "- Without the CE term (alpha = 1), what the cache alone teaches: "
            + _variants_sentence(rows, "sampled", sampled_a1, f"top-{topk_k}", topk_a1, "perplexity", 1)
            + "; "
            + _variants_sentence(rows, "sampled", sampled_a1, f"top-{topk_k}", topk_a1, "ece", 4)
            + "."
        )
        if compare(ppl[sampled_a1], _spreads(rows, topk_a1, "perplexity")) == "better":
            uncovered = 100 * (1 - topk_summary.get("mean_captured_mass", float("nan")))
            add(
                f"  A top-k cache with the ghost tail constrains the k stored probabilities and the tail's total "
                f"mass, not how the student spreads that mass over the other tokens, which hold {uncovered:.0f} % "
                "of the ensemble's probability here; without a CE term nothing else does. Sampled entries are an "
                "unbiased estimate of the whole distribution (Anshumann et al., ACL 2025)."
            )
    lines.extend(_hybrid_verdicts(document, rows, ppl, sampled, sampled_a1, topk_a1, topk_k))
    lines.extend(_levels_verdicts(levels[1:], rows))
    add(
        "- "
        + _variants_sentence(rows, "renormalised top-k", "topk-renormalize", "ghost tail", "topk", "ece", 4)
        + "."
    )
    sweep_lines = _sweep_verdicts(document["variants"]["sweep"], rows)
    if sweep_lines:
        add("- Sweep, one factor at a time (perplexity; same other settings):")
        lines.extend(f"  - {line}" for line in sweep_lines)
    ce_pair = _paired(rows, "cache", "ce", "perplexity")
    claim_ce, ce_by_pairs = combined_verdict(ppl["cache"], ppl["ce"], ce_pair)
    claim_teachers = {
        t["name"]: compare(ppl["cache"], SeedSpread.of([t["held_out"]["perplexity"]])) for t in teachers
    }
    ce_words = {
        "better": "supported",
        "worse": "contradicted",
        "within seed noise": "not supported (within seed noise)",
    }
    if all(c == "better" for c in claim_teachers.values()):
        teacher_words = "supported"
    elif all(c == "worse" for c in claim_teachers.values()):
        teacher_words = "contradicted"
    else:
        teacher_words = "not supported"
    per_teacher = ", ".join(f"{name}: {c}" for name, c in claim_teachers.items())
    add("")
    add(f"The paper's claims (Tastet & Timiryasov, 2024), at this scale and with {len(seeds)} seed(s):")
    add("")
    ce_basis = f" ({_pair_text(ce_pair)}; the seed ranges overlap)" if ce_by_pairs else ""
    add(
        f"- *The distilled student beats the same student trained with CE only*: {ce_words[claim_ce]}{ce_basis}."
    )
    add(f"- *The distilled student beats its teachers*: {teacher_words} (student vs {per_teacher}).")
    blimp = [100 * m["blimp"]["overall"] for m in models if m.get("blimp")]
    if blimp:
        add(
            f"- BLiMP (one seed, table above): every model scores {min(blimp):.1f}-{max(blimp):.1f} % overall; "
            "chance is 50 %."
        )
    add("")
    add("Scale: the paper distils 10M words into 345M-parameter students on GPUs. The numbers here are")
    add(
        f"those of `{Path(meta['config']).name}` on {meta['device']}; a larger scale has not been run for this"
    )
    add("file (pass a larger config to the same command on a GPU machine).")
    add("")
    return "\n".join(lines)


def _data_sizes(data: PreparedData) -> str:
    """ "vocabulary 4096, 64-token windows, 74,176 training tokens, test split 686 windows" """
    train, test = data.windows("train"), data.windows("test")
    return (
        f"vocabulary {data.vocab_size}, {data.seq_len}-token windows, {train.size:,} training tokens, "
        f"test split {test.shape[0]} windows"
    )


def _cache_description(cache: CacheConfig) -> str:
    """What a cache stores, in words: "top-64 cache", "hybrid cache: top-16 head + 48 tail draws", ..."""
    if cache.mode == "hybrid":
        return f"hybrid cache: top-{cache.k} head + {cache.tail_samples} tail draws"
    if cache.mode == "sampled":
        return f"sampled cache: {cache.samples} draws"
    return f"top-{cache.k} cache"


def _fidelity_text(rows: list[dict], ppl: dict[str, SeedSpread], name: str, online: str, where: str) -> str:
    """ "; vs online <where> (target within 1 %): +x % on the means, **met**; paired ..." ("" without
    an online student)."""
    if online not in ppl:
        return ""
    gap = 100 * relative_difference(ppl[name], ppl[online])
    met = "met" if abs(gap) <= 1.0 else "not met"
    return f"; vs online {where} (target within 1 %): {gap:+.1f} % on the means, **{met}**; " + _pair_text(
        _paired(rows, name, online, "perplexity")
    )


def _hybrid_verdicts(
    document: dict,
    rows: list[dict],
    ppl: dict[str, SeedSpread],
    sampled: str,
    sampled_a1: str | None,
    topk_a1: str | None,
    k: int,
) -> list[str]:
    """Each hybrid cache against top-k and sampled at about equal storage (the config's alpha and
    alpha = 1), and at alpha = 1 against online distillation (the <= 1 % target of issue 15)."""
    out = []
    sizes = {r["variant"]: r["bytes_per_position"] for r in rows}
    hybrids = [n for n in document["variants"]["main"] if n.startswith("hybrid") and not n.endswith("-a1")]
    for name in hybrids:
        label = _hybrid_label(name).removeprefix("hybrid cache, ")
        size = sizes[name]
        out.append(
            f"- Hybrid ({label}, {size:.1f} bytes/position) at the config's alpha: "
            + _variants_sentence(rows, "hybrid", name, f"top-{k}", "topk", "perplexity", 1)
            + "; "
            + _variants_sentence(rows, "hybrid", name, "sampled", sampled, "perplexity", 1)
            + _fidelity_text(rows, ppl, name, "online", "at the config's alpha")
            + "."
        )
        name_a1 = f"{name}-a1"
        if name_a1 not in ppl:
            continue
        parts = []
        if topk_a1:
            parts.append(_variants_sentence(rows, "hybrid", name_a1, f"top-{k}", topk_a1, "perplexity", 1))
        if sampled_a1:
            parts.append(_variants_sentence(rows, "hybrid", name_a1, "sampled", sampled_a1, "perplexity", 1))
        if "online-a1" in ppl:
            parts.append(_fidelity_text(rows, ppl, name_a1, "online-a1", "at alpha 1").removeprefix("; "))
        if parts:
            out.append(f"- Hybrid ({label}) at alpha = 1 (no CE term): " + "; ".join(parts) + ".")
    return out


if __name__ == "__main__":
    main()
