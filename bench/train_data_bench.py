"""Training samples/s from WebDataset shards vs the same model on in-memory tensors.

    python bench/train_data_bench.py [--quick]

- **from shards**: ``training.train.train`` as ``make train`` runs it (the ``[train]`` config on
  CPU: webdataset pipeline with resampled shards, a shuffle buffer, JPEG decode and open_clip's
  train transform in ``workers`` DataLoader processes, tokenizer, AdamW, checkpoint at the end),
  on two sets of WebDataset shards: embedded images, and real photographs as the download stage
  stores them with real LAION alt-texts (:func:`real_photo_shards`, where ``../shared/realdata`` is
  beside the clone); per-step wall times from its ``train_log.jsonl``;
- **in memory**: the same model, optimiser and loss (built by the stage's own ``_build``), one
  batch of images already decoded and transformed and captions already tokenized, stepped the
  same way: forward, ``ClipLoss``, backward, AdamW, logit-scale clamp.

The measurement runs in a fresh Python process that loads torch as the ``train`` command does
(after :func:`training.train.sleeping_omp_threads`): OpenMP's settings are fixed when torch loads,
and in ``make bench`` other benchmarks have loaded it already in theirs.

The two take turns: ``train`` runs a chunk of steps (resuming from its checkpoint), then the
in-memory loop runs as many. The first ``SKIP`` steps of each chunk are left out on both sides:
a resumed call builds the model, loads the checkpoint and forks a new loader worker, which fills
its shuffle buffer; a training run pays that once, the benchmark once per round (reported apart,
as the call's start). The ratio is samples/s from shards over samples/s from memory (per round,
then the median over rounds), so it measures what feeding the model from shards costs: decoding
and augmenting run in DataLoader worker processes, which compete with the training threads for
the same cores here. The machines this runs on are shared and a round's ratio moves by +-0.1 from
host load alone, so there are enough rounds for the median to settle; their spread is reported.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    BenchResult,
    Context,
    Ratio,
    quiet_warnings,
    standalone_main,
    synthetic_pool,
    user_environment,
)

NAME = "train"
TITLE = "Training samples/s from shards vs the same model on in-memory tensors"
TARGET = 0.9
ROUNDS, CHUNK, SKIP = 6, 12, 2  # rounds of CHUNK steps a side; the first SKIP of each chunk are the call's start


REAL_SHARDS, REAL_PER_SHARD = 4, 64


def real_photo_shards(ctx: Context) -> list[str] | None:
    """Shards of real photographs as the download stage stores them (img2dataset's resizer at its
    settings: largest side 512, JPEG q95; their other sides 200-512 and odd as often as not), with
    real LAION alt-texts: realdata's scene-text photos and scikit-image's (``bench.dedup_quality``'s
    originals), in turn. None, with a log line, where ``../shared/realdata`` is not beside the clone."""
    import random

    import pyarrow.parquet as pq
    import webdataset as wds

    from bench.dedup_quality import real_photos
    from bench.parrot_real_bench import CAPTIONS
    from bench.realdata import as_downloaded
    from stages.reshard import TAR_MODE, TAR_MTIME, TAR_OWNER

    if not CAPTIONS.is_file():
        ctx.log(f"  train: {CAPTIONS} not found: the real-photograph rows are left out")
        return None
    folder = ctx.work_dir / "train-real-photos"
    paths = [folder / f"{k:06d}.tar" for k in range(REAL_SHARDS)]
    if all(p.is_file() for p in paths):
        return [str(p) for p in paths]
    folder.mkdir(parents=True, exist_ok=True)
    photos = [as_downloaded(photo.data) for photo in real_photos()]
    captions = [c for c in pq.read_table(CAPTIONS, columns=["TEXT"]).column("TEXT").to_pylist() if c and c.strip()]
    rng = random.Random(0)
    for k, path in enumerate(paths):
        partial = path.with_suffix(".tmp")
        with wds.TarWriter(str(partial), mtime=TAR_MTIME, user=TAR_OWNER, group=TAR_OWNER, mode=TAR_MODE) as tar:
            for i in range(REAL_PER_SHARD):
                tar.write({"__key__": f"{k:04d}{i:05d}", "jpg": photos[(k * REAL_PER_SHARD + i) % len(photos)],
                           "txt": rng.choice(captions), "json": b"{}"})
        partial.rename(path)
    return [str(p) for p in paths]


def _in_memory_steps(model: Any, optimizer: Any, loss_fn: Any, images: Any, texts: Any, steps: int) -> list[float]:
    import math

    import torch

    times = []
    for _ in range(steps):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(*model(images, texts))
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        times.append(time.perf_counter() - started)
    return times


def loader_rate(urls: list[str], cfg: Any, batches: int) -> float:
    """Samples/s of the stage's data pipeline alone (its workers, no training), after one batch."""
    import open_clip

    from models.clip import register_model_configs
    from models.pixels import Pixels
    from training.train import CuratedShards, _batches

    register_model_configs()
    _, preprocess, _ = open_clip.create_model_and_transforms(cfg.model)  # the train transform, as train() uses
    loader = iter(_batches(CuratedShards(urls), Pixels(preprocess), open_clip.get_tokenizer(cfg.model), cfg, 0, "cpu"))
    next(loader)
    started = time.perf_counter()
    for _ in range(batches):
        next(loader)
    rate = batches * cfg.batch_size / (time.perf_counter() - started)
    del loader
    return rate


def run(ctx: Context) -> BenchResult:
    """The benchmark, measured in a fresh process (see the module's docstring); its log lines stream."""
    out = ctx.work_dir / "train-bench-result.json"
    script = ("import sys; from bench.train_data_bench import _measure_in_this_process as m; "
              "m(sys.argv[1], sys.argv[2], sys.argv[3] == '1', sys.argv[4])")
    done = subprocess.run(
        [sys.executable, "-c", script, str(ctx.work_dir), str(ctx.results_dir), "1" if ctx.quick else "0", str(out)],
        cwd=Path(__file__).resolve().parents[1], env=user_environment(),
    )
    if done.returncode != 0:
        raise RuntimeError(f"the train benchmark's process exited with {done.returncode}")
    record = json.loads(out.read_text())
    return BenchResult(**{**record, "rows": [Ratio(**row) for row in record["rows"]]})


def _measure_in_this_process(work_dir: str, results_dir: str, quick: bool, out: str) -> None:
    """The child's side of :func:`run`: torch loads here as the train command loads it."""
    from training.train import sleeping_omp_threads

    sleeping_omp_threads()
    ctx = Context(quick=quick, work_dir=Path(work_dir), results_dir=Path(results_dir), log=lambda m: print(m, flush=True))
    result = _measure(ctx)
    Path(out).write_text(json.dumps(dataclasses.asdict(result)))


def _measure(ctx: Context) -> BenchResult:
    import io

    import open_clip
    import torch
    from PIL import Image

    from pipeline.config import load_config
    from training.train import LOG, _build, intra_op_threads, shard_urls, train

    result = BenchResult(NAME, TITLE)
    chunk = 4 if ctx.quick else CHUNK
    rounds = 2 if ctx.quick else ROUNDS
    skip = 1 if ctx.quick else SKIP
    pool = synthetic_pool(ctx, 128 if ctx.quick else 256)
    sets = {"embedded": shard_urls([str(pool.tar(s)) for s in pool.shards])}
    real = real_photo_shards(ctx)
    if real:
        sets["real photographs"] = shard_urls(real)
    base = load_config().train
    cfg = dataclasses.replace(base, device="cpu", precision="fp32", log_every=1, checkpoint_every=0, warmup_steps=2)

    # the same model, optimiser and loss for the in-memory side; one fixed batch through the train transform
    with quiet_warnings():
        model, preprocess, optimizer, _ = _build(cfg, "cpu", "fp32", None)
    model.train()
    loss_fn = open_clip.ClipLoss()
    from sources.embedded import generate

    samples = generate(cfg.batch_size, seed=11)
    images = torch.stack([preprocess(Image.open(io.BytesIO(s.image)).convert("RGB")) for s in samples])
    texts = open_clip.get_tokenizer(cfg.model)([s.caption for s in samples])

    def memory_chunk() -> list[float]:
        with intra_op_threads(cfg.threads):  # the threads train() gives itself
            return _in_memory_steps(model, optimizer, loss_fn, images, texts, chunk)[skip:]

    # Each round: embedded shards, in memory, real photographs; each set's chunk paired with the
    # in-memory chunk next to it, so that load drifting between rounds falls on both sides of a ratio.
    shard_steps: dict[str, list[float]] = {name: [] for name in sets}
    per_round: dict[str, list[float]] = {name: [] for name in sets}
    call_start: dict[str, list[float]] = {name: [] for name in sets}  # the first `skip` steps of each resumed call
    memory_steps: list[float] = []
    with quiet_warnings():
        for r in range(1, rounds + 1):
            memory_now: list[float] = []
            for k, (name, urls) in enumerate(sets.items()):
                out = ctx.work_dir / f"train-from-shards-{k}"
                started = time.perf_counter()
                train(urls, out, dataclasses.replace(cfg, steps=r * chunk), progress=False)
                call_s = time.perf_counter() - started
                log = [json.loads(line) for line in (out / LOG).read_text().splitlines() if line.strip()]
                shards_now = [rec["step_s"] for rec in log if (r - 1) * chunk + skip < rec["step"] <= r * chunk]
                call_start[name] += [rec["step_s"] for rec in log
                                     if (r - 1) * chunk < rec["step"] <= (r - 1) * chunk + skip]
                if not memory_now:
                    memory_now = memory_chunk()
                    memory_steps += memory_now
                shard_steps[name] += shards_now
                per_round[name].append(statistics.median(memory_now) / statistics.median(shards_now))
                ctx.log(f"  train round {r}, {name}: train() call {call_s:.1f} s for {chunk} steps; median step "
                        f"{statistics.median(shards_now):.3f} s from shards, {statistics.median(memory_now):.3f} s in memory")
        loader = {name: loader_rate(urls, cfg, 3 if ctx.quick else 6) for name, urls in sets.items()}

    memory_rate = cfg.batch_size / statistics.median(memory_steps)
    summary: dict[str, dict[str, Any]] = {}
    for name in sets:
        shard_rate = cfg.batch_size / statistics.median(shard_steps[name])
        ratio = statistics.median(per_round[name])  # paired per round: robust to load that drifts between rounds
        quartiles = statistics.quantiles(per_round[name], n=4) if len(per_round[name]) > 1 else [ratio] * 3
        what = "" if name == "embedded" else f", {name}"
        result.rows.append(Ratio(NAME, f"samples/s from shards{what} / same model on in-memory tensors", ratio, "x",
                                 f">= {TARGET:g}", ratio >= TARGET,
                                 f"{shard_rate:.0f} vs {memory_rate:.0f} samples/s, {cfg.workers} loader worker(s), "
                                 f"{cfg.threads} torch threads; rounds {min(per_round[name]):.2f}-"
                                 f"{max(per_round[name]):.2f}, quartiles {quartiles[0]:.2f}-{quartiles[2]:.2f}"))
        result.rows.append(Ratio(NAME, f"data pipeline alone{what} (no training) / training from memory",
                                 loader[name] / memory_rate, "x", "", None, f"{loader[name]:.0f} samples/s decoded + augmented"))
        summary[name] = {"ratio": ratio, "quartiles": quartiles, "shard_rate": shard_rate,
                         "median_step_s": statistics.median(shard_steps[name])}
    result.data = {"model": cfg.model, "batch_size": cfg.batch_size, "workers": cfg.workers, "torch_threads": cfg.threads,
                   "steps_timed": {"memory": len(memory_steps), **{n: len(v) for n, v in shard_steps.items()}},
                   "per_round_ratio": per_round, "steps_left_out_per_round": skip, "call_start_step_s": call_start,
                   "median_step_s": {"memory": statistics.median(memory_steps),
                                     **{n: v["median_step_s"] for n, v in summary.items()}},
                   "samples_per_s": {"memory": memory_rate, **{n: v["shard_rate"] for n, v in summary.items()},
                                     **{f"loader_alone {n}": v for n, v in loader.items()}}}
    embedded_loader = loader["embedded"]
    lines = [
        f"`{cfg.model}` at batch {cfg.batch_size}, {cfg.threads} torch threads (`[train] threads`), "
        f"{cfg.workers} DataLoader worker(s), fp32 on CPU; {rounds} rounds of {chunk} steps per side, "
        f"the first {skip} of each chunk left out (a resumed call's start: the model and checkpoint loaded, a new "
        f"loader worker forked and filling its shuffle buffer; those steps took "
        f"{statistics.median(call_start['embedded']):.2f} s (median) from shards). Two sets of shards: "
        f"{len(pool.shards)} shards of 64 embedded images (512x384 JPEG), and "
        + (f"{REAL_SHARDS} of {REAL_PER_SHARD} real photographs (`../shared/realdata`'s scene-text photos and "
           "scikit-image's, as the download stage stores them: largest side 512, JPEG q95, the other side "
           "whatever the photo's shape makes it) with real LAION alt-texts; each round trains a chunk on the "
           "embedded shards, steps the in-memory batch, then trains a chunk on the real photographs, and each "
           "set's ratio pairs its chunk with that in-memory chunk." if real else
           "no real photographs (`../shared/realdata` not found)."),
        "",
        "| side | median s / step | samples/s | data pipeline alone, samples/s |",
        "|---|---:|---:|---:|",
        *[f"| from shards, {name} (`training.train.train`) | {summary[name]['median_step_s']:.3f} | "
          f"{summary[name]['shard_rate']:.1f} | {loader[name]:.1f} |" for name in sets],
        f"| in-memory tensors | {statistics.median(memory_steps):.3f} | {memory_rate:.1f} | — |",
        "",
        "Each ratio is the median over rounds of each round's ratio (the two sides back to back): "
        + "; ".join(f"{name} " + ", ".join(f"{x:.2f}" for x in per_round[name])
                    + f" (quartiles {summary[name]['quartiles'][0]:.2f}-{summary[name]['quartiles'][2]:.2f})"
                    for name in sets)
        + ". The machine is shared, and host load alone moves a round by about 0.1. The loader worker and the two "
        f"training threads share {ctx.cores} cores. Were all of the worker's CPU taken from the threads, the "
        "embedded ratio would be about (2 x in-memory step) / (2 x in-memory step + loader CPU per batch) = "
        f"{2 * statistics.median(memory_steps) / (2 * statistics.median(memory_steps) + cfg.batch_size / embedded_loader):.2f}; "
        "the worker also decodes in the gaps the threads leave, since they sleep when idle (`OMP_WAIT_POLICY=PASSIVE`, "
        "which the train command sets before torch loads) and it runs at nice 19 (`training.train`). "
        "With spinning threads and the worker at the threads' priority this was 0.80x.",
    ]
    result.markdown = "\n".join(lines)
    return result


def main(argv: list[str] | None = None) -> int:
    return standalone_main(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
