"""The ablation: what each curation policy does to the CLIP trained on what it keeps.

    curate the embedded dataset (download -> ocr -> parrot -> clip_score -> filter -> reshard)
    -> train the unfiltered model (policy ``all``) for ``steps`` steps
    -> re-score CLIP with that model, so the CLIP-score policies rank by a trained model rather than
       a random init (the offline stand-in for the pretrained scorer a real curation would use)
    -> train one model per remaining policy for the same ``steps`` (equal compute)
    -> evaluate every model on the held-out sets: zero-shot, typographic attack, spurious
       backgrounds, retrieval
    -> ``<output>/ablation/``: ``ablation.md``, ``ablation.csv``, ``per_class.csv``, PNG plots, and
       a section of the run's HTML report.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import ConfigError
from core.settings import config_section, require
from manifests.store import SIZES_FILE, RunLayout
from training.train import LATEST  # the link to the newest checkpoint: one name across reruns

if TYPE_CHECKING:  # pragma: no cover - the run's whole config, composed by pipeline/config.py
    from pipeline.config import Config


@config_section
class AblationConfig:
    """`make ablation`: one model per policy, trained on the embedded dataset at equal steps."""

    samples: int = 640  # embedded samples to curate (OCR sets the pace on a CPU: ~1 image/s)
    policies: tuple[str, ...] = ("all", "no-text", "no-parrot", "clip-score-top", "tmars", "no-parrot-tmars")
    eval_seed: int = 10_000  # held-out sets: a seed stream apart from the training data's
    eval_per_class: int = 40  # images per class in each labelled eval set

    def problems(self) -> list[str]:
        """What types cannot say: ranges and choices, as readable messages (empty when fine)."""
        problems = require(
            (self.samples >= 16, "ablation.samples must be >= 16"),
            (bool(self.policies), "ablation.policies must name at least one policy"),
            (self.eval_per_class >= 1, "ablation.eval_per_class must be >= 1"),
        )
        return problems

SCORER_POLICY = "all"  # its model re-scores CLIP for the score-based policies
SECTION = "section.html"  # the report's ablation section, picked up by pipeline/report.py

# Columns of the ablation table: (metric key, header, what it is)
COLUMNS: tuple[tuple[str, str], ...] = (
    ("clean_top1", "zero-shot top-1"),
    ("typographic_top1", "typographic top-1"),
    ("typographic_drop", "typographic drop"),
    ("attack_success_rate", "attack success"),
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
    policy: str
    kept: int
    steps: int
    samples_seen: int
    final_loss: float | None
    train_seconds: float
    metrics: dict[str, float]
    per_class: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: str = ""


@dataclass
class AblationResult:
    root: Path
    rows: list[AblationRow]
    untrained: dict[str, float]
    seconds: float
    files: list[Path]


def _curate(config: Config, ablation: AblationConfig, root: Path, policies: tuple[str, ...], progress: bool) -> None:
    from pipeline.curate import curate
    from pipeline.summary import run_summary
    from sources import open_source

    dataset = dataclasses.replace(config.dataset("embedded"), samples=ablation.samples)
    dataset.validate()
    download = config.download
    source = open_source(dataset, url_list="", slow_seconds=download.timeout_s + 2.0)
    result = curate(source, RunLayout(root), config, download, policies, progress=progress)
    print(run_summary(result))
    if not result.ok:
        raise RuntimeError(f"curation of {root} did not finish every shard; rerun `make ablation` to resume")


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
    """Where the model trained on a policy's curated shards lives (``python -m pipeline train`` too).

    Local, also for an object-store run: checkpoints are written and hard-linked as they train.
    """
    return layout.local_dir / "models" / policy


def _train(config: Config, layout: RunLayout, policy: str, progress: bool) -> Any:
    print(f"== train {policy}: {config.train.model}, {config.train.steps} steps x {config.train.batch_size}",
          file=sys.stderr)
    result = train_on_policy(config, layout, policy, progress)
    if result.step != config.train.steps:  # e.g. trained further by hand: the compute would differ
        raise ConfigError(
            f"{model_dir(layout, policy)} is at step {result.step}, not [train].steps = {config.train.steps}: "
            "the ablation compares equal steps; move that folder away or set the same steps"
        )
    return result


def train_on_policy(config: Config, layout: RunLayout, policy: str, progress: bool) -> Any:
    """Train on a policy's finished curated folder (its ``sizes.json`` lists the non-empty tars)."""
    from training.train import shard_urls, train

    folder = layout.curated_dir(policy)
    if not (folder / SIZES_FILE).is_file():
        raise ConfigError(f"no finished curated shards in {folder}: run `make curate` (with policy {policy!r}) first")
    if layout.remote:
        folder = _local_copy(folder, layout.local_dir / "curated" / policy)
    try:
        shards = shard_urls(folder)
    except ValueError as err:  # e.g. the policy kept nothing
        raise ConfigError(f"cannot train on policy {policy!r}: {err}") from None
    return train(shards, model_dir(layout, policy), config.train, progress=progress)


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


def run_ablation(config: Config, ablation: AblationConfig, root: Path, progress: bool = True) -> AblationResult:
    """Curate, train one model per policy at equal steps, evaluate all; write tables and plots."""
    import pyarrow.parquet as pq

    from pipeline.report import write_report
    from sources.eval_sets import build_eval_sets

    started = time.monotonic()
    policies = ablation.policies
    if SCORER_POLICY not in policies:
        policies = (SCORER_POLICY, *policies)
    for name in policies:
        config.policy(name)
    layout = RunLayout(root)

    _curate(config, ablation, root, (SCORER_POLICY,), progress)
    first = _train(config, layout, SCORER_POLICY, progress)
    scorer = _scorer_config(config, Path(first.checkpoint).with_name(LATEST))
    _rescore_clip(layout, scorer, progress)
    _curate(scorer, ablation, root, policies, progress)  # selections and reshards with the new scores

    sets = build_eval_sets(seed=ablation.eval_seed, per_class=ablation.eval_per_class)
    untrained = evaluate_checkpoint(config, "", sets).metrics
    rows = []
    for policy in policies:
        result = first if policy == SCORER_POLICY else _train(config, layout, policy, progress)
        evaluation = evaluate_checkpoint(config, result.checkpoint, sets)
        kept = pq.read_table(layout.selection_path(policy), columns=["kept"]).column(0).to_pylist()
        rows.append(
            AblationRow(
                policy=policy,
                kept=sum(kept),
                steps=result.step,
                samples_seen=result.step * config.train.batch_size,
                final_loss=result.final_loss,
                train_seconds=result.seconds,
                metrics=evaluation.metrics,
                per_class=evaluation.per_class,
                checkpoint=result.checkpoint,
            )
        )
    out = AblationResult(root=root, rows=rows, untrained=untrained, seconds=0.0, files=[])
    out.files = write_outputs(out, config, ablation, layout)
    write_report(layout)
    out.seconds = time.monotonic() - started
    return out


# -- outputs -------------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def table_rows(result: AblationResult) -> list[dict[str, Any]]:
    rows = [{"policy": "(untrained)", "kept": "", "steps": 0, "final_loss": None, **result.untrained}]
    for row in result.rows:
        rows.append({"policy": row.policy, "kept": row.kept, "steps": row.steps, "final_loss": row.final_loss,
                     **row.metrics})
    return rows


def markdown_table(result: AblationResult) -> str:
    headers = ["policy", "kept", "steps", "final loss"] + [h for _, h in COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in table_rows(result):
        cells = [str(row["policy"]), str(row["kept"]), str(row["steps"]), _f(row["final_loss"])]
        cells += [_f(row.get(key)) for key, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plots(result: AblationResult, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [r.policy for r in result.rows]
    x = np.arange(len(names))
    paths = []

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    pairs = (
        ("typographic attack", ("clean_top1", "typographic_top1", "attack_success_rate"),
         ("clean", "with a wrong label written", "predicted the written label")),
        ("spurious backgrounds", ("common_top1", "counter_top1"), ("common background", "counter background")),
        ("retrieval", ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"), ("i2t R@1", "i2t R@5", "t2i R@1", "t2i R@5")),
    )
    for ax, (title, keys, labels) in zip(axes, pairs):
        width = 0.8 / len(keys)
        for k, (key, label) in enumerate(zip(keys, labels)):
            ax.bar(x + (k - (len(keys) - 1) / 2) * width, [r.metrics[key] for r in result.rows], width, label=label)
        if title != "retrieval":
            ax.axhline(result.rows[0].metrics["chance"], color="grey", lw=1, ls="--", label="chance")
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(folder / "ablation.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in result.rows:
        log = Path(row.checkpoint).parent.parent / "train_log.jsonl"
        points = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
        if points:
            ax.plot([p["step"] for p in points], [p["loss"] for p in points], label=row.policy, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.set_title("training loss (equal steps per policy)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(folder / "loss.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_outputs(result: AblationResult, config: Config, ablation: AblationConfig, layout: RunLayout) -> list[Path]:
    import base64

    folder = layout.root / "ablation"
    folder.mkdir(parents=True, exist_ok=True)
    rows = table_rows(result)
    files = [folder / "ablation.csv", folder / "per_class.csv", folder / "ablation.md"]
    keys = ["policy", "kept", "steps", "final_loss"] + [k for k, _ in COLUMNS] + ["chance"]
    with open(files[0], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with open(files[1], "w", newline="") as f:
        per_class = [{"policy": r.policy, **c} for r in result.rows for c in r.per_class]
        writer = csv.DictWriter(f, fieldnames=list(per_class[0]) if per_class else ["policy"])
        writer.writeheader()
        writer.writerows(per_class)
    setup = (
        f"{ablation.samples} embedded samples curated; model `{config.train.model}` trained "
        f"{config.train.steps} steps x batch {config.train.batch_size} per policy "
        f"(masking: {config.train.masking}); held-out sets: seed {ablation.eval_seed}, "
        f"{ablation.eval_per_class} images per class per set. CLIP-score policies ranked by the "
        f"trained `{SCORER_POLICY}` model."
    )
    markdown = f"# Ablation\n\n{setup}\n\n{markdown_table(result)}\n"
    files[2].write_text(markdown)
    plots = _plots(result, folder)
    files += plots
    images = "".join(
        f"<p><img alt='{p.stem}' src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}' "
        "style='max-width:100%'></p>"
        for p in plots
    )
    headers = ["policy", "kept", "steps", "final loss"] + [h for _, h in COLUMNS]
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in
                         [str(r["policy"]), str(r["kept"]), str(r["steps"]), _f(r["final_loss"])]
                         + [_f(r.get(k)) for k, _ in COLUMNS]) + "</tr>"
        for r in rows
    )
    section = (
        f"<p>{html.escape(setup)}</p><table><tr>{''.join(f'<th>{html.escape(h)}</th>' for h in headers)}</tr>"
        f"{body}</table>{images}"
    )
    (folder / SECTION).write_text(section, encoding="utf-8")
    files.append(folder / SECTION)
    return files


def format_result(result: AblationResult) -> str:
    lines = [f"== ablation: {result.root}  ({result.seconds:.0f} s)", markdown_table(result)]
    lines += [f"   {p}" for p in result.files]
    return "\n".join(lines)
