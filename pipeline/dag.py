"""The curation DAG, declared in one place: every step of a ``curate`` run, in order.

    step         kind    runs as                                       writes
    download     shard   one Ray task per shard (img2dataset)          shards/, manifests/download/
    ocr          sample  \\                                            manifests/ocr/
    parrot       sample   | one streaming Ray Data pipeline: each      manifests/parrot/
    caption      sample   | image read and decoded once, an actor      manifests/caption/
    clip_score   sample   | pool per stage (parrot and caption read    manifests/clip_score/
    dedup        sample   | text only; faces only with [faces]         manifests/dedup/
    faces        sample  /  enabled = true)                            manifests/faces/
    dup_group    pool    DuckDB + Ray tasks over the whole pool        manifests/dup_group/
    decontaminate pool   on the driver, the pool streamed past the     manifests/decontaminate/
                         evaluation images ([decontaminate] eval_sets)
    filter       policy  one DuckDB query per policy                   selections/<policy>.parquet
    reshard      policy  one Ray task per output shard                 curated/<policy>/
    report       run     HTML statistics and sample grids              report/index.html

What each step reads and writes is declared by its stage class (``stages/base.py``) and checked
before any work (:func:`check_reads`): a step that reads a column no earlier step writes stops
the run at start, naming both. ``done`` says how a rerun knows a step's work is on disk; a step
with nothing missing is skipped, and Ray starts only when some step has work.

Adding a stage is one file in ``stages/`` and one line here (plus its schema in
``manifests/schemas.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from core.errors import ConfigError
from stages.base import IMAGE, Stage
from stages.caption import CaptionStage
from stages.clip_score import ClipScoreStage
from stages.dedup import DedupStage, DupGroupStage
from stages.decontaminate import Builtin, DecontaminateStage
from stages.download import DownloadStage
from stages.faces import FaceStage
from stages.filter import FilterStage
from stages.ocr import OcrStage
from stages.parrot import ParrotStage
from stages.reshard import ReshardStage

SHARD, SAMPLE, POOL, POLICY, RUN = "shard", "sample", "pool", "policy", "run"
INPUT_COLUMNS = ("uid", "url", "caption")  # what a URL list gives every sample (manifests.schemas.INPUT)


@dataclass(frozen=True)
class Step:
    """One step of a run: its stage, how the stage is built from the run's config, and how a
    rerun knows the step is done."""

    name: str
    kind: str  # SHARD | SAMPLE | POOL | POLICY | RUN
    stage: type[Stage] | None  # declares reads / output_schema; None for the report
    make: Callable[[Any, str | None], Stage] | None  # (config, policy) -> stage; policy for POLICY steps
    done: str
    also_writes: tuple[str, ...] = ()  # beyond the schema: download makes the pixels available
    enabled: Callable[[Any], bool] = lambda config: True  # an optional step: part of a run only when its config says so

    def reads(self, config: Any, policy: str | None = None) -> tuple[str, ...]:
        if self.stage is None:
            return ()
        if self.stage is FilterStage and policy is not None:  # a policy reads what its SQL names
            return FilterStage(config.policy(policy)).policy_reads()
        if self.stage is ReshardStage and config.reshard.blur_faces:  # blurs the faces step's boxes
            return (*self.stage.reads, "face_bboxes")
        return self.stage.reads

    def writes(self) -> tuple[str, ...]:
        return (self.stage.writes() if self.stage is not None else ()) + self.also_writes


STEPS: tuple[Step, ...] = (
    Step("download", SHARD, DownloadStage, lambda c, _: DownloadStage(c.download),
         done="manifests/download/part-<shard>.parquet exists for every planned shard", also_writes=(IMAGE,)),
    Step("ocr", SAMPLE, OcrStage, lambda c, _: OcrStage(c.ocr),
         done="manifests/ocr/part-<shard>.parquet exists for every downloaded shard"),
    Step("parrot", SAMPLE, ParrotStage, lambda c, _: ParrotStage(c.parrot),
         done="manifests/parrot/part-<shard>.parquet exists for every downloaded shard"),
    Step("caption", SAMPLE, CaptionStage, lambda c, _: CaptionStage(c.caption),
         done="manifests/caption/part-<shard>.parquet exists for every downloaded shard"),
    Step("clip_score", SAMPLE, ClipScoreStage, lambda c, _: ClipScoreStage(c.clip),
         done="manifests/clip_score/part-<shard>.parquet exists for every downloaded shard"),
    Step("dedup", SAMPLE, DedupStage, lambda c, _: DedupStage(c.dedup),
         done="manifests/dedup/part-<shard>.parquet exists for every downloaded shard"),
    Step("faces", SAMPLE, FaceStage, lambda c, _: FaceStage(c.faces),
         done="manifests/faces/part-<shard>.parquet exists for every downloaded shard (a step only with [faces] enabled)",
         enabled=lambda c: c.faces.enabled),
    Step("dup_group", POOL, DupGroupStage, lambda c, _: DupGroupStage(c.dedup),
         done="part-pool.parquet's footer records the digest of its inputs (every per-shard part, [dedup]); recomputed when it differs"),
    Step("decontaminate", POOL, DecontaminateStage,
         lambda c, _: DecontaminateStage(c.decontaminate, c.clip, builtin_eval_sets(c)),
         done="part-pool.parquet's footer records the digest of its inputs (parts, config, eval sets' contents); recomputed when it differs",
         enabled=lambda c: bool(c.decontaminate.eval_sets)),
    Step("filter", POLICY, FilterStage, lambda c, p: FilterStage(c.policy(p)),
         done="recomputed on every run (cheap SQL); selections/<policy>.parquet rewritten only when it changed"),
    Step("reshard", POLICY, ReshardStage, lambda c, p: ReshardStage(p, c.reshard.samples_per_shard, c.reshard.blur_faces),
         done="curated/<policy>/sizes.json exists and records the current selection's sha256"),
    Step("report", RUN, None, None, done="rewritten at the end of every run"),
)

def builtin_eval_sets(config: Any) -> Builtin:
    """The decontaminate step's "builtin" sets: the ones the ablation evaluates on ([ablation] eval_seed, eval_per_class)."""
    from sources.eval_sets import image_files

    return Builtin(config.ablation.eval_seed, config.ablation.eval_per_class, image_files)


SAMPLE_STEPS: tuple[Step, ...] = tuple(s for s in STEPS if s.kind == SAMPLE)
STAGE_ORDER: tuple[str, ...] = tuple(s.name for s in STEPS if s.kind in (SHARD, SAMPLE, POOL))  # catalog joins


def step(name: str) -> Step:
    for s in STEPS:
        if s.name == name:
            return s
    raise KeyError(name)


def check_reads(config: Any, policies: tuple[str, ...], steps: tuple[Step, ...] = STEPS,
                source_columns: Collection[str] = ()) -> None:
    """Walk the steps in order; every column a step reads must be written by an earlier one (or
    come with the URL list: ``source_columns``, e.g. LAION's ``similarity``).

    Runs before any work: a policy rule that names a misspelt column, or a stage put before the
    stage it depends on, stops the run here with one message naming the column and the step.
    """
    available = set(INPUT_COLUMNS) | set(source_columns)
    for s in steps:
        if not s.enabled(config):  # an optional step switched off writes nothing a later step may read
            continue
        for policy in (policies if s.kind == POLICY else (None,)):
            missing = sorted(set(s.reads(config, policy)) - available)
            if missing:
                who = f"step {s.name!r}" + (f" (policy {policy!r})" if policy else "")
                raise ConfigError(
                    f"{who} reads {', '.join(repr(m) for m in missing)}, which no earlier step writes; "
                    f"written before it: {', '.join(sorted(available))}"
                )
        available |= set(s.writes())


def select_steps(names: str | None) -> tuple[str, ...]:
    """The steps a ``curate --stages a,b,c`` run does, in DAG order (all of them when ``names`` is
    empty). An unknown name is a ConfigError listing the steps there are."""
    if not names or not names.strip():
        return tuple(s.name for s in STEPS)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = [s.name for s in STEPS]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ConfigError(f"--stages names {', '.join(repr(n) for n in unknown)}, which is not a step; "
                          f"steps: {', '.join(known)}")
    return tuple(n for n in known if n in wanted)


def active_steps(names: tuple[str, ...] | None, config: Any) -> tuple[str, ...]:
    """The steps a run does: ``names`` (``--stages``; None: every step) less the optional steps
    its config switches off. Naming a switched-off step is a ConfigError saying how to switch it on."""
    off = [s.name for s in STEPS if not s.enabled(config)]
    named_off = [n for n in (names or ()) if n in off]
    if named_off:
        raise ConfigError(f"--stages names {', '.join(repr(n) for n in named_off)}, which is switched off; "
                          f"set [{named_off[0]}] enabled = true in the config")
    return tuple(n for n in (names or tuple(s.name for s in STEPS)) if n not in off)


def depends_on(target: Step, config: Any, policies: tuple[str, ...]) -> tuple[str, ...]:
    """The earlier steps whose output ``target`` reads (for a policy step, any policy's), in DAG
    order: what must be done on disk, or run in the same run, before ``target`` can run."""
    wanted = {c for p in (policies if target.kind == POLICY else (None,)) for c in target.reads(config, p)}
    found = []
    for s in STEPS:
        if s is target:
            break
        if wanted & set(s.writes()):
            found.append(s.name)
    return tuple(dict.fromkeys(found))


def describe() -> str:
    """The DAG as a table, for ``--help`` and the README."""
    rows = [("step", "kind", "reads", "writes", "done when")]
    for s in STEPS:
        reads = ", ".join(s.stage.reads) if s.stage is not None else "every manifest"
        if s.stage is FilterStage:
            reads += " + the columns its rules name"
        written = s.writes()
        writes = ", ".join(written[:4]) + (", ..." if len(written) > 4 else "") if s.stage is not None else "report/index.html"
        rows.append((s.name, s.kind, reads, writes, s.done))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows)
