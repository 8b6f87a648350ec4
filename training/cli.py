"""Training's subcommands of ``python -m pipeline``: ``train``, ``evaluate``, ``ablation``.

They live here, not in pipeline/cli.py, because training imports pipeline and pipeline must never
import training (tests/test_structure.py). pyproject.toml registers :func:`add_commands` under the
``clip_curation.commands`` entry point, which pipeline/cli.py loads when it builds its parser, so
``python -m pipeline train ...`` (the Makefile's ``make train`` / ``make ablation``) works as before.
The heavy modules (torch, open_clip) are imported by the handlers, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from pipeline.cli import default_output
from pipeline.config import Config, load_config
from pipeline.training_config import SOURCES


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``train``, ``evaluate`` and ``ablation`` to pipeline's subparsers, each with its handler."""
    train = sub.add_parser(
        "train",
        help="train an open_clip model on a policy's curated shards for a fixed number of steps (resumable)",
        description="Train [train].model on <output>/curated/<policy>/*.tar for [train].steps steps into "
        "<output>/models/<policy>/ (checkpoints in open_clip's format, train_log.jsonl, result.json). A rerun "
        "continues from the last checkpoint; at the requested steps already it does nothing.",
    )
    train.add_argument("--policy", default="all", help="whose curated shards to train on (default: all)")
    train.add_argument("--output", default=default_output("embedded"), help="the run's output folder")
    train.add_argument("--config", default=None, help="TOML file merged over pipeline/default.toml")
    train.add_argument("--steps", type=int, default=None, help="total optimisation steps (default: [train].steps)")
    train.add_argument("--masking", choices=("none", "random", "pgs"), default=None,
                       help="patch masking while training: random (FLIP) or pgs (CLIP-PGS)")
    train.add_argument("--source", choices=SOURCES, default=None,
                       help="curated: the policy's curated shards; selection: its kept samples read from "
                       "<output>/shards/ through <output>/selections/<policy>.parquet, no reshard needed "
                       "(default: [train].source)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")

    evaluate = sub.add_parser(
        "evaluate",
        help="evaluate a CLIP checkpoint: zero-shot, typographic attack, spurious backgrounds, retrieval",
        description="Evaluate an open_clip model (a checkpoint file, an open_clip pretrained tag, or '' for a "
        "random init) on the held-out sets generated from the embedded dataset's classes.",
    )
    evaluate.add_argument("checkpoint", help="checkpoint file (e.g. output/embedded/models/all/checkpoints/latest.pt)")
    evaluate.add_argument("--model", default=None, help="open_clip model name (default: [train].model)")
    evaluate.add_argument("--config", default=None, help="TOML file merged over pipeline/default.toml")

    ablation = sub.add_parser(
        "ablation",
        help="curate, train one model per policy at equal steps, evaluate all, write table and plots",
        description="The whole ablation on the embedded dataset: curate [ablation].samples samples, train the "
        "unfiltered model, re-score CLIP with it, train one model per policy for the same [train].steps, "
        "evaluate every model, and write <output>/ablation/ (ablation.md, ablation.csv, per_class.csv, "
        "PNG plots) and a section of <output>/report/index.html. With [ablation] start = \"reading\" (configs/"
        "ablation-reading.toml, the preset `make ablation` runs) every model starts from a tower taught first to read 1,000 written words ([reading]; "
        "a start carried into training/reading_starts/ for its settings, else built once and cached in "
        "~/.cache/clip-curation/reading/). Resumable at every step.",
    )
    ablation.add_argument("--output", default=default_output("ablation"), help="output folder (default: output/ablation)")
    ablation.add_argument("--config", default=None, help="TOML file merged over pipeline/default.toml")
    ablation.add_argument("--samples", type=int, default=None, help="embedded samples to curate (default: [ablation].samples)")
    ablation.add_argument("--steps", type=int, default=None, help="training steps per model (default: [train].steps)")
    ablation.add_argument("--policies", default=None, help="comma-separated policies (default: [ablation].policies)")
    ablation.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(handler=cmd_train)
    evaluate.set_defaults(handler=cmd_evaluate)
    ablation.set_defaults(handler=cmd_ablation)


def _with_train(config: Config, **changes: object) -> Config:
    """The config with [train] keys replaced by the command line's (None = not given)."""
    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
        return config
    train = dataclasses.replace(config.train, **changes)
    train.validate()
    return dataclasses.replace(config, train=train)


def cmd_train(args: argparse.Namespace) -> int:
    from training.train import sleeping_omp_threads

    sleeping_omp_threads()  # before torch loads: the loader worker gets the cores the model's threads leave
    from manifests.store import RunLayout
    from training.ablation import train_on_policy

    config = _with_train(load_config(args.config), steps=args.steps, masking=args.masking, source=args.source)
    result = train_on_policy(config, RunLayout(args.output), args.policy, progress=not args.no_progress)
    print(result.summary())
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from sources.eval_sets import build_eval_sets
    from training.ablation import evaluate_checkpoint

    config = load_config(args.config)
    ablation = config.ablation
    sets = build_eval_sets(seed=ablation.eval_seed, per_class=ablation.eval_per_class)
    result = evaluate_checkpoint(config, args.checkpoint, sets, model=args.model)
    print(f"== evaluate {result.model}")
    for key, value in result.metrics.items():
        print(f"   {key:22s} {value:.3f}")
    return 0


def cmd_ablation(args: argparse.Namespace) -> int:
    from training.train import sleeping_omp_threads

    sleeping_omp_threads()  # before torch loads (see cmd_train)
    from training.ablation import format_result, run_ablation

    config = _with_train(load_config(args.config), steps=args.steps)
    ablation = config.ablation
    if args.samples is not None or args.policies:
        policies = tuple(p.strip() for p in args.policies.split(",") if p.strip()) if args.policies else ablation.policies
        ablation = dataclasses.replace(ablation, samples=args.samples or ablation.samples, policies=policies)
        ablation.validate()
    for name in ablation.policies:
        config.policy(name)
    result = run_ablation(config, ablation, Path(args.output), progress=not args.no_progress)
    print(format_result(result))
    return 0
