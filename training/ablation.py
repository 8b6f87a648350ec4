"""The ablation: what each curation policy does to the CLIP trained on what it keeps.

    curate the embedded dataset (download -> ocr -> parrot -> clip_score -> filter -> reshard)
    -> train the unfiltered model (policy ``all``) for ``steps`` steps
    -> re-score CLIP with that model, so the CLIP-score policies rank by a trained model rather than
       a random init (the offline stand-in for the pretrained scorer a real curation would use)
    -> train one model per remaining policy for the same ``steps`` (equal compute), once per
       training seed in ``seeds``, and the unfiltered policy again with image patches masked
       (``masking``: FLIP's random masking, CLIP-PGS) at the same ratio and steps
    -> evaluate every model on the held-out sets: zero-shot, typographic attack, the class words
       alone (does it read?), spurious backgrounds, retrieval
    -> ``<output>/ablation/``: ``ablation.md`` (mean +- sd over the seeds, and which of the papers'
       claims held), ``ablation.csv`` (means and sds), ``ablation_seeds.csv`` (one row per model),
       ``per_class.csv``, PNG plots, and a section of the run's HTML report.

The embedded dataset is drawn with the proportions in ``[ablation]`` (text images, class words,
caption kinds, class-word size); docs/ablation.md says which ones make the unfiltered model read.

Every step resumes: curation skips finished shards, training continues from its last checkpoint,
and a finished model is evaluated again (seconds) rather than retrained.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import ConfigError
from manifests.store import SIZES_FILE, RunLayout
from pipeline.training_config import AblationConfig  # the [ablation] section, declared below pipeline/config.py
from sources.embedded import DEFAULT_SETTINGS
from training.train import LATEST  # the link to the newest checkpoint: one name across reruns

if TYPE_CHECKING:  # pragma: no cover - the run's whole config, composed by pipeline/config.py
    from pipeline.config import Config

SCORER_POLICY = "all"  # its model (first seed, no masking) re-scores CLIP for the score-based policies
MASKED_POLICY = "all"  # the policy trained again with masked patches (CLIP-PGS vs FLIP)
SECTION = "section.html"  # the report's ablation section, picked up by pipeline/report.py
GENERATOR_FILE = "generator.json"  # the dataset proportions a run's output was curated with
FILTERED = ("no-text", "no-parrot", "tmars")  # the filters the papers say remove the attack

# Columns of the ablation table: (metric key, header, what it is)
COLUMNS: tuple[tuple[str, str], ...] = (
    ("clean_top1", "zero-shot top-1"),
    ("typographic_top1", "typographic top-1"),
    ("typographic_drop", "typographic drop"),
    ("attack_success_rate", "attack success"),
    ("text_only_top1", "text-only top-1"),
    ("common_top1", "common-bg top-1"),
    ("counter_top1", "counter-bg top-1"),
    ("spurious_drop", "spurious drop"),
    ("i2t_r1", "i2t R@1"),
    ("i2t_r5", "i2t R@5"),
    ("t2i_r1", "t2i R@1"),
    ("t2i_r5", "t2i R@5"),
)


@dataclass
class AblationRow:
    """One trained model: a policy (with its masking, if any) at one seed."""

    policy: str  # the variant's name: the policy, or "<policy> +<masking>" for a masked one
    kept: int
    steps: int
    samples_seen: int
    final_loss: float | None
    train_seconds: float
    metrics: dict[str, float]
    per_class: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: str = ""
    seed: int = 0


@dataclass
class AblationResult:
    root: Path
    rows: list[AblationRow]  # one per variant and seed, variants in order
    untrained: dict[str, float]  # the seeded random init of [train] model, evaluated
    seconds: float
    files: list[Path]
    starts: dict[str, dict[str, float]] = field(default_factory=dict)  # "(reading start ...)" rows: before any contrastive step
    reading: list[str] = field(default_factory=list)  # one line per reading start: how well its tower reads

    def variants(self) -> list[str]:
        """The variants in training order, each once."""
        return list(dict.fromkeys(row.policy for row in self.rows))

    def of(self, variant: str) -> list[AblationRow]:
        return [row for row in self.rows if row.policy == variant]


@dataclass(frozen=True)
class Variant:
    """What one line of the table trains: a policy's shards, with or without patch masking, on
    ``model`` ("" = ``[train] model``; the masked lines may name a ViT: ``[ablation] masking_model``)."""

    policy: str
    masking: str = "none"
    model: str = ""

    @property
    def name(self) -> str:
        name = self.policy if self.masking == "none" else f"{self.policy} +{self.masking}"
        return f"{name} ({self.model})" if self.model else name


def _curate(config: Config, ablation: AblationConfig, root: Path, policies: tuple[str, ...], progress: bool) -> None:
    from pipeline.curate import curate
    from pipeline.dag import STEPS
    from pipeline.summary import run_summary
    from sources import open_source

    dataset = dataclasses.replace(config.dataset("embedded"), samples=ablation.samples)
    dataset.validate()
    download = config.download
    source = open_source(dataset, url_list="", slow_seconds=download.timeout_s + 2.0)
    settings = ablation.generator()
    if settings != DEFAULT_SETTINGS:  # _check_generator keeps an output from mixing samples drawn two ways
        source = dataclasses.replace(source, generator=settings)
    # training from the selections needs no curated copy: every step but reshard
    stages = (tuple(s.name for s in STEPS if s.name != "reshard" and s.enabled(config))
              if config.train.source == "selection" else None)
    result = curate(source, RunLayout(root), config, download, policies, progress=progress, stages=stages)
    print(run_summary(result))
    if not result.ok:
        raise RuntimeError(f"curation of {root} did not finish every shard; rerun `make ablation` to resume")


def _check_generator(layout: RunLayout, ablation: AblationConfig) -> None:
    """Record the dataset proportions of an output; a rerun with others would mix two datasets."""
    path = layout.local_dir / GENERATOR_FILE
    want = dataclasses.asdict(ablation.generator()) | {"samples": ablation.samples}
    want["class_word_cap"] = list(want["class_word_cap"])
    if path.is_file():
        have = json.loads(path.read_text())
        if have != want:
            changed = ", ".join(sorted(k for k in want if have.get(k) != want[k]))
            raise ConfigError(f"{layout.root} was curated with other [ablation] dataset settings ({changed}): "
                              "use another --output, or the settings it was made with")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(want, indent=1) + "\n")


def _scorer_config(config: Config, checkpoint: Path) -> Config:
    """The same config with CLIP scoring done by the trained unfiltered model."""
    clip = dataclasses.replace(config.clip, model=config.train.model, pretrained=str(checkpoint))
    return dataclasses.replace(config, clip=clip)


def _rescore_clip(layout: RunLayout, scorer: Config, progress: bool) -> bool:
    """Drop the CLIP-score parts made by another model, so the runner recomputes only them.

    Returns whether anything was recomputed. OCR and parrot parts stay: the runner joins them in.
    """
    import pyarrow.parquet as pq

    from manifests.catalog import build_catalog
    from models.clip import file_sha256
    from pipeline.dag import SAMPLE_STEPS, STAGE_ORDER
    from pipeline.ray_runtime import ray_session
    from pipeline.sample_runner import run_per_sample

    folder = layout.stage_dir("clip_score")
    weights = scorer.clip.pretrained
    want = f"{scorer.clip.model} {weights} sha256:{file_sha256(weights)[:8]}"  # models.clip's description
    parts = sorted(folder.glob("part-*.parquet"))
    stale = [p for p in parts if set(pq.read_table(p, columns=["clip_model"]).column(0).to_pylist()) - {want, None}]
    if parts and not stale:
        return False
    for part in stale:
        part.unlink()
    with ray_session(None):
        run_per_sample(layout, scorer, SAMPLE_STEPS, progress=progress)
    build_catalog(layout, STAGE_ORDER)
    return True


def model_dir(layout: RunLayout, policy: str) -> Path:
    """Where the model trained on a policy's curated shards lives (``python -m pipeline train``).

    Local, also for an object-store run: checkpoints are written and hard-linked as they train.
    """
    return layout.local_dir / "models" / policy


def variant_dir(layout: RunLayout, variant: Variant, seed: int, starts: dict[str, Any] | None = None) -> Path:
    """Where the ablation keeps one variant's model of one seed (apart from ``train``'s models);
    models from a reading start live under the start's own folder name, so a rerun from another
    start never takes them for its own."""
    masked = "" if variant.masking == "none" else f"+{variant.masking}"
    model = f"@{variant.model}" if variant.model else ""
    root = layout.local_dir / "models" / "ablation"
    if starts:
        root = root / Path(starts[variant.model or SCORER_MODEL].folder).name
    return root / f"{variant.policy}{masked}{model}" / f"seed-{seed}"


SCORER_MODEL = ""  # key of ``[train] model`` in the reading starts (a variant's ``model`` when it has none)


def _variant_config(config: Config, variant: Variant, seed: int, starts: dict[str, Any] | None = None) -> Any:
    """``[train]`` for one variant and seed: the seed, masking, model and start changed, nothing
    else (equal steps)."""
    masking = config.train.masking if variant.masking == "none" else variant.masking
    model = variant.model or config.train.model
    pretrained = starts[variant.model or SCORER_MODEL].checkpoint if starts else config.train.pretrained
    return dataclasses.replace(config.train, seed=seed, masking=masking, model=model, pretrained=pretrained)


def _train(config: Config, layout: RunLayout, variant: Variant, seed: int, progress: bool,
           starts: dict[str, Any] | None = None) -> Any:
    train_config = _variant_config(config, variant, seed, starts)
    start = "the reading start" if starts else (train_config.pretrained or "a seeded random init")
    print(f"== train {variant.name} seed {seed}: {train_config.model} from {start}, {train_config.steps} steps x "
          f"{train_config.batch_size}, masking {train_config.masking}", file=sys.stderr)
    out_dir = variant_dir(layout, variant, seed, starts)
    result = train_on_policy(dataclasses.replace(config, train=train_config), layout, variant.policy, progress, out_dir)
    if result.step != train_config.steps:  # e.g. trained further by hand: the compute would differ
        raise ConfigError(
            f"{out_dir} is at step {result.step}, not [train].steps = {train_config.steps}: "
            "the ablation compares equal steps; move that folder away or set the same steps"
        )
    return result


def train_on_policy(config: Config, layout: RunLayout, policy: str, progress: bool, out_dir: Path | None = None) -> Any:
    """Train on a policy's finished curated folder (its ``sizes.json`` lists the non-empty tars), or
    with ``[train] source = "selection"`` on its kept samples read from the download shards through
    its selection (no resharded copy; a remote run is read in place), into ``out_dir`` (default:
    ``model_dir``)."""
    from training.train import shard_urls, train

    out_dir = out_dir or model_dir(layout, policy)
    if config.train.source == "selection":
        from training.selection_data import SelectedSamples, plan_selection

        try:
            source = SelectedSamples(plan_selection(layout, policy))
        except (FileNotFoundError, ValueError) as err:  # no selection yet; kept nothing; from another run
            raise ConfigError(f"cannot train on policy {policy!r} from its selection: {err}") from None
        return train(source, out_dir, config.train, progress=progress)
    folder = layout.curated_dir(policy)
    if not (folder / SIZES_FILE).is_file():
        raise ConfigError(f"no finished curated shards in {folder}: run `make curate` (with policy {policy!r}) first")
    if layout.remote:
        folder = _local_copy(folder, layout.local_dir / "curated" / policy)
    try:
        shards = shard_urls(folder)
    except ValueError as err:  # e.g. the policy kept nothing
        raise ConfigError(f"cannot train on policy {policy!r}: {err}") from None
    return train(shards, out_dir, config.train, progress=progress)


def _local_copy(remote: Any, local: Path) -> Path:
    """Copy a finished curated folder from the object store, unless the copy is already that one."""
    from manifests.store import read_bytes, write_bytes_atomic

    marker = read_bytes(remote / SIZES_FILE)
    if (local / SIZES_FILE).is_file() and (local / SIZES_FILE).read_bytes() == marker:
        return local
    local.mkdir(parents=True, exist_ok=True)
    (local / SIZES_FILE).unlink(missing_ok=True)
    for entry in remote.iterdir():
        if entry.name != SIZES_FILE:
            write_bytes_atomic(read_bytes(entry), local / entry.name)
    write_bytes_atomic(marker, local / SIZES_FILE)  # last: the copy's completion marker
    return local


def evaluate_checkpoint(config: Config, checkpoint: str, sets: Any, model: str | None = None) -> Any:
    """Load ``checkpoint`` (a file, an open_clip tag, or "" for the seeded random init) and evaluate it."""
    import torch

    from core.devices import resolve_device
    from models.clip import load_clip
    from training.evaluate import evaluate

    device = resolve_device(config.train.device, torch.cuda.is_available(), "train.device")
    clip = load_clip(model or config.train.model, checkpoint, device=device, precision="fp32",
                     seed=config.train.seed, batch_size=128)
    return evaluate(clip, sets)


def variants(ablation: AblationConfig, policies: tuple[str, ...], train_model: str = "") -> list[Variant]:
    """The table's lines: every policy, then the masked unfiltered models (on ``masking_model``
    when it is another model than ``train_model``: then also that model unmasked, their baseline)."""
    model = ablation.masking_model if ablation.masking_model not in ("", train_model) else ""
    masked = [Variant(MASKED_POLICY, m, model) for m in ablation.masking]
    if masked and model:
        masked.insert(0, Variant(MASKED_POLICY, "none", model))
    return [Variant(p) for p in policies] + masked


def reading_starts(config: Config, ablation: AblationConfig, progress: bool) -> dict[str, Any]:
    """With ``[ablation] start = "reading"``: the reading start of each model the variants train,
    keyed ``SCORER_MODEL`` for ``[train] model`` and by name for the masking model; else empty."""
    if ablation.start != "reading":
        return {}
    from training.reading import reading_start

    starts = {SCORER_MODEL: reading_start(config.train.model, config.reading, progress)}
    for variant in variants(ablation, (), config.train.model):
        if variant.model and variant.model not in starts:
            starts[variant.model] = reading_start(variant.model, config.reading, progress)
    for start in starts.values():
        print(start.summary(), file=sys.stderr)
    return starts


def decontaminated(config: Config) -> Config:
    """The config with every policy also dropping copies of evaluation images (``eval_match``, the
    decontaminate step's), so no model of the ablation trains on what it is evaluated on."""
    from stages.decontaminate import EVAL_RULE

    name, sql = EVAL_RULE
    policies = {p: dataclasses.replace(policy, rules={**policy.rules, name: sql}) for p, policy in config.policies.items()}
    return dataclasses.replace(config, policies=policies)


def run_ablation(config: Config, ablation: AblationConfig, root: Path, progress: bool = True) -> AblationResult:
    """Curate, train one model per policy and seed at equal steps, evaluate all; write tables and plots."""
    import pyarrow.parquet as pq

    from pipeline.report import write_report
    from sources.eval_sets import build_eval_sets

    started = time.monotonic()
    config = decontaminated(config)  # its builtin eval sets are the ones evaluate_checkpoint uses below
    policies = ablation.policies
    if SCORER_POLICY not in policies:
        policies = (SCORER_POLICY, *policies)
    for name in policies:
        config.policy(name)
    layout = RunLayout(root)
    _check_generator(layout, ablation)

    starts = reading_starts(config, ablation, progress)  # before curation: a failure here costs no OCR time
    _curate(config, ablation, root, (SCORER_POLICY,), progress)
    first = _train(config, layout, Variant(SCORER_POLICY), ablation.seeds[0], progress, starts)
    scorer = _scorer_config(config, Path(first.checkpoint).with_name(LATEST))
    _rescore_clip(layout, scorer, progress)
    _curate(scorer, ablation, root, policies, progress)  # selections and reshards with the new scores

    sets = build_eval_sets(seed=ablation.eval_seed, per_class=ablation.eval_per_class)
    from models.clip import RandomWeightsWarning

    with warnings.catch_warnings():  # the "(untrained)" row is the seeded random init on purpose: no warning for it
        warnings.simplefilter("ignore", RandomWeightsWarning)
        untrained = evaluate_checkpoint(config, "", sets).metrics
    start_rows, reading = {}, []
    if starts:
        from training.reading import probe

        for key, start in starts.items():
            start_rows[f"(reading start {start.model})"] = evaluate_checkpoint(config, start.checkpoint, sets, start.model).metrics
            read = probe(start, sets)
            reading.append(
                f"{start.model}: held-out top-1 {start.held_out_top1:.3f} on {config.reading.held_out} unseen renders of "
                f"{start.words} words after {start.steps} supervised steps ({start.seconds:.0f} s to build); through its "
                f"word head, the class words alone read {read['text_only_top1_words']:.3f} among all words, "
                f"{read['text_only_top1_classes']:.3f} among the classes; the attack's written word "
                f"{read['typographic_read_classes']:.3f} among the classes")
    rows = []
    for variant in variants(ablation, policies, config.train.model):
        kept = sum(pq.read_table(layout.selection_path(variant.policy), columns=["kept"]).column(0).to_pylist())
        for seed in ablation.seeds:
            if variant == Variant(SCORER_POLICY) and seed == ablation.seeds[0]:
                result = first  # the scorer model trained above: the same folder (not announced twice)
            else:
                result = _train(config, layout, variant, seed, progress, starts)
            evaluation = evaluate_checkpoint(config, result.checkpoint, sets, variant.model or None)
            rows.append(
                AblationRow(
                    policy=variant.name,
                    kept=kept,
                    steps=result.step,
                    samples_seen=result.step * config.train.batch_size,
                    final_loss=result.final_loss,
                    train_seconds=result.seconds,
                    metrics=evaluation.metrics,
                    per_class=evaluation.per_class,
                    checkpoint=result.checkpoint,
                    seed=seed,
                )
            )
    out = AblationResult(root=root, rows=rows, untrained=untrained, seconds=0.0, files=[], starts=start_rows,
                         reading=reading)
    out.files = write_outputs(out, config, ablation, layout)
    write_report(layout)
    out.seconds = time.monotonic() - started
    return out


# -- outputs -------------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value): the spread over seeds."""
    import numpy as np

    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def summarise(result: AblationResult) -> dict[str, dict[str, tuple[float, float]]]:
    """Per variant and metric (and ``final_loss``): (mean, sd) over its seeds."""
    out = {}
    for variant in result.variants():
        rows = result.of(variant)
        keys = list(rows[0].metrics) + ["final_loss"]
        out[variant] = {
            key: mean_sd([row.final_loss if key == "final_loss" else row.metrics[key] for row in rows])
            for key in keys if all((row.final_loss if key == "final_loss" else row.metrics.get(key)) is not None
                                   for row in rows)
        }
    return out


def table_rows(result: AblationResult) -> list[dict[str, Any]]:
    """One row per variant: the means over seeds, ``<metric>_sd`` beside each, and ``seeds``."""
    rows = [{"policy": "(untrained)", "kept": "", "steps": 0, "seeds": "", "final_loss": None, **result.untrained}]
    rows += [{"policy": name, "kept": "", "steps": 0, "seeds": "", "final_loss": None, **metrics}
             for name, metrics in result.starts.items()]
    stats = summarise(result)
    for variant in result.variants():
        first = result.of(variant)[0]
        row: dict[str, Any] = {"policy": variant, "kept": first.kept, "steps": first.steps,
                               "seeds": len(result.of(variant))}
        for key, (mean, sd) in stats[variant].items():
            row[key], row[f"{key}_sd"] = mean, sd
        rows.append(row)
    return rows


def _cell(row: dict[str, Any], key: str) -> str:
    if row.get(key) is None:
        return ""
    sd = row.get(f"{key}_sd")
    return _f(row[key]) if sd is None or row.get("seeds") == 1 else f"{row[key]:.3f} ± {sd:.3f}"


def _headers() -> list[str]:
    return ["policy", "kept", "steps", "seeds", "final loss"] + [h for _, h in COLUMNS]


def _cells(row: dict[str, Any]) -> list[str]:
    return [str(row["policy"]), str(row["kept"]), str(row["steps"]), str(row["seeds"]),
            _cell(row, "final_loss")] + [_cell(row, key) for key, _ in COLUMNS]


def markdown_table(result: AblationResult) -> str:
    headers = _headers()
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in table_rows(result)]
    return "\n".join(lines)


@dataclass(frozen=True)
class Claim:
    """One of the papers' claims, checked on the means over seeds: held, not held, or not measured."""

    claim: str
    held: bool | None  # None: a variant it needs was not trained
    evidence: str


def _fooled_share(metrics: dict[str, float], chance: float) -> str:
    """How many of the attacked images a model gets wrong go to the written class, against a wrong
    guess at random (1 in classes - 1): how far its errors are the attack's, whatever their number."""
    wrong = 1.0 - metrics["typographic_top1"]
    if wrong <= 0 or chance <= 0:
        return ""
    return (f"; {metrics['attack_success_rate'] / wrong:.2f} of its errors under the attack name the written class "
            f"(at random: {chance / (1 - chance):.2f})")


def claims(result: AblationResult) -> list[Claim]:
    """The issue-17 targets, each stated as the paper's claim and checked on this run's means."""
    stats = summarise(result)
    mean = {v: {k: m for k, (m, _) in metrics.items()} for v, metrics in stats.items()}
    out = []
    base = mean.get(SCORER_POLICY)
    if base is None:
        return out
    chance = base["chance"]
    out.append(Claim("the unfiltered CLIP learns to read (text-only top-1 >= 0.5)", base["text_only_top1"] >= 0.5,
                     f"{SCORER_POLICY}: text-only top-1 {base['text_only_top1']:.3f} (chance {chance:.3f})"))
    out.append(Claim(
        "it falls for the typographic attack (top-1 >= 0.15 below clean; written class predicted >= 2x chance)",
        base["typographic_drop"] >= 0.15 and base["attack_success_rate"] >= 2 * chance,
        f"{SCORER_POLICY}: clean {base['clean_top1']:.3f} -> typographic {base['typographic_top1']:.3f} "
        f"(drop {base['typographic_drop']:.3f}); attack success {base['attack_success_rate']:.3f} "
        f"({base['attack_success_rate'] / chance:.2f}x chance){_fooled_share(base, chance)}"))
    base_drop = base["typographic_drop"]
    attacked = out[-1].held  # a filter can only remove an attack the unfiltered model falls for
    for policy in FILTERED + ("no-parrot-tmars",):
        if policy not in mean:
            out.append(Claim(f"{policy} removes the attack", None, f"{policy} not trained"))
            continue
        m = mean[policy]
        held = m["typographic_drop"] <= base_drop / 3 if attacked else None
        out.append(Claim(f"{policy} drops at most a third as much under the attack", held,
                         ("" if attacked else "not measurable, the unfiltered model does not fall for the attack: ")
                         + f"drop {m['typographic_drop']:.3f} vs {base_drop:.3f} unfiltered; attack success "
                         f"{m['attack_success_rate']:.3f}; text-only {m['text_only_top1']:.3f}"))
        out.append(Claim(f"{policy} keeps clean zero-shot (within 0.05 of unfiltered, or better)",
                         m["clean_top1"] >= base["clean_top1"] - 0.05,
                         f"clean {m['clean_top1']:.3f} vs {base['clean_top1']:.3f}"))
    shown = [v for v in mean if mean[v]["spurious_drop"] > 0]
    out.append(Claim("every model leans on the background (CounterAnimal: common-bg top-1 > counter-bg top-1)",
                     len(shown) == len(mean),
                     "; ".join(f"{v} {mean[v]['spurious_drop']:.3f}" for v in mean)))
    random_name, pgs_name = (next((v for v in mean if v.startswith(Variant(MASKED_POLICY, m).name)), "")
                             for m in ("random", "pgs"))
    if random_name in mean and pgs_name in mean:
        r, g = mean[random_name], mean[pgs_name]
        better = [what for what, ok in (("clean", g["clean_top1"] > r["clean_top1"]),
                                         ("typographic drop", g["typographic_drop"] < r["typographic_drop"]),
                                         ("background drop", g["spurious_drop"] < r["spurious_drop"])) if ok]
        sd = stats[pgs_name]["clean_top1"][1] + stats[random_name]["clean_top1"][1]
        out.append(Claim(
            "CLIP-PGS masking beats random (FLIP) masking at equal ratio and steps (clean top-1 higher by more than "
            "the two sds)", g["clean_top1"] - r["clean_top1"] > sd,
            f"clean {g['clean_top1']:.3f} vs {r['clean_top1']:.3f} (sds summed {sd:.3f}); typographic drop "
            f"{g['typographic_drop']:.3f} vs {r['typographic_drop']:.3f}; background drop {g['spurious_drop']:.3f} vs "
            f"{r['spurious_drop']:.3f}; PGS better on: {', '.join(better) or 'none'}"))
    return out


def claims_markdown(result: AblationResult) -> str:
    mark = {True: "held", False: "NOT held", None: "not measured"}
    lines = ["| claim | at this scale | evidence (means over seeds) |", "|---|---|---|"]
    lines += [f"| {c.claim} | {mark[c.held]} | {c.evidence} |" for c in claims(result)]
    return "\n".join(lines)


def _plots(result: AblationResult, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = result.variants()
    stats = summarise(result)
    x = np.arange(len(names))
    paths = []

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    pairs = (
        ("typographic attack", ("clean_top1", "typographic_top1", "attack_success_rate", "text_only_top1"),
         ("clean", "with a wrong label written", "predicted the written label", "class word alone")),
        ("spurious backgrounds", ("common_top1", "counter_top1"), ("common background", "counter background")),
        ("retrieval", ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"), ("i2t R@1", "i2t R@5", "t2i R@1", "t2i R@5")),
    )
    seeds = max(len(result.of(v)) for v in names)
    for ax, (title, keys, labels) in zip(axes, pairs):
        width = 0.8 / len(keys)
        for k, (key, label) in enumerate(zip(keys, labels)):
            means = [stats[v][key][0] for v in names]
            sds = [stats[v][key][1] for v in names] if seeds > 1 else None
            ax.bar(x + (k - (len(keys) - 1) / 2) * width, means, width, yerr=sds, capsize=2, label=label)
        if title != "retrieval":
            ax.axhline(result.rows[0].metrics["chance"], color="grey", lw=1, ls="--", label="chance")
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title(title + (f" (mean ± sd, {seeds} seeds)" if seeds > 1 else ""))
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(folder / "ablation.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for k, variant in enumerate(names):
        for j, row in enumerate(result.of(variant)):
            log = Path(row.checkpoint).parent.parent / "train_log.jsonl"
            points = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
            if points:
                ax.plot([p["step"] for p in points], [p["loss"] for p in points], color=f"C{k}", lw=1,
                        alpha=1.0 if j == 0 else 0.35, label=variant if j == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.set_title("training loss (equal steps per policy; faint: other seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(folder / "loss.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _write_csv(path: Path, rows: list[dict[str, Any]], keys: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_outputs(result: AblationResult, config: Config, ablation: AblationConfig, layout: RunLayout) -> list[Path]:
    import base64

    folder = layout.root / "ablation"
    folder.mkdir(parents=True, exist_ok=True)
    rows = table_rows(result)
    files = [folder / "ablation.csv", folder / "ablation_seeds.csv", folder / "per_class.csv", folder / "ablation.md"]
    metric_keys = [k for k, _ in COLUMNS] + ["chance"]
    _write_csv(files[0], rows, ["policy", "kept", "steps", "seeds", "final_loss", "final_loss_sd"]
               + [name for k in metric_keys for name in (k, f"{k}_sd")])
    per_seed = [{"policy": r.policy, "seed": r.seed, "kept": r.kept, "steps": r.steps, "final_loss": r.final_loss,
                 "train_seconds": round(r.train_seconds, 1), **r.metrics} for r in result.rows]
    _write_csv(files[1], per_seed, ["policy", "seed", "kept", "steps", "final_loss", "train_seconds"] + metric_keys)
    per_class = [{"policy": r.policy, "seed": r.seed, **c} for r in result.rows for c in r.per_class]
    _write_csv(files[2], per_class, list(per_class[0]) if per_class else ["policy"])
    masking = f"; masked variants at ratio {config.train.mask_ratio}: {', '.join(ablation.masking)}" if ablation.masking else ""
    settings = ablation.generator()
    setup = (
        f"{ablation.samples} embedded samples curated (text images {settings.text_fraction:.2f}, of which "
        f"{settings.class_word_fraction:.2f} name another class at cap height {settings.class_word_cap[0]:.2f}-"
        f"{settings.class_word_cap[1]:.2f} of the shorter side; captions of text images: parrot "
        f"{settings.parrot_fraction:.2f}, mixed {settings.mixed_fraction:.2f}); model `{config.train.model}` trained "
        f"{config.train.steps} steps x batch {config.train.batch_size} per policy and seed "
        f"(seeds {', '.join(map(str, ablation.seeds))}; masking: {config.train.masking}{masking}); "
        f"held-out sets: seed {ablation.eval_seed}, {ablation.eval_per_class} images per class per set. "
        f"CLIP-score policies ranked by the trained `{SCORER_POLICY}` model (seed {ablation.seeds[0]}). "
        "Cells are mean ± sd over the seeds."
    )
    if result.reading:
        masked_model = (ablation.masking_model if ablation.masking and ablation.masking_model not in ("", config.train.model)
                        else "")
        setup += (" Every variant starts from the reading start of its model (its image tower taught, supervised, "
                  "to name 1,000 written words; its text tower at the seeded init)"
                  + (f"; the masked variants train `{masked_model}`" if masked_model else "") + ". "
                  + " ".join(f"Reading start {line}." for line in result.reading))
    files[3].write_text(f"# Ablation\n\n{setup}\n\n{markdown_table(result)}\n\n"
                        f"## The papers' claims at this scale\n\n{claims_markdown(result)}\n")
    plots = _plots(result, folder)
    files += plots
    images = "".join(
        f"<p><img alt='{p.stem}' src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}' "
        "style='max-width:100%'></p>"
        for p in plots
    )
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(r)) + "</tr>" for r in rows)
    mark = {True: "held", False: "NOT held", None: "not measured"}
    claim_rows = "".join(f"<tr><td>{html.escape(c.claim)}</td><td>{mark[c.held]}</td><td>{html.escape(c.evidence)}</td></tr>"
                         for c in claims(result))
    section = (
        f"<p>{html.escape(setup)}</p><table><tr>{''.join(f'<th>{html.escape(h)}</th>' for h in _headers())}</tr>"
        f"{body}</table><h3>The papers' claims at this scale</h3><table><tr><th>claim</th><th>at this scale</th>"
        f"<th>evidence</th></tr>{claim_rows}</table>{images}"
    )
    (folder / SECTION).write_text(section, encoding="utf-8")
    files.append(folder / SECTION)
    return files


def format_result(result: AblationResult) -> str:
    lines = [f"== ablation: {result.root}  ({result.seconds:.0f} s)", *(f"reading start {r}" for r in result.reading),
             markdown_table(result), "", claims_markdown(result)]
    lines += [f"   {p}" for p in result.files]
    return "\n".join(lines)
