"""Training samples/s from WebDataset shards vs the same model on in-memory tensors.

    python bench/train_data_bench.py [--quick]

- **from shards**: ``training.train.train`` as ``make train`` runs it (the ``[train]`` config on
  CPU: webdataset pipeline with resampled shards, a shuffle buffer, JPEG decode and open_clip's
  train transform in ``workers`` DataLoader processes, tokenizer, AdamW, checkpoint at the end),
  on embedded images written as WebDataset shards; per-step wall times from its ``train_log.jsonl``;
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
    urls = shard_urls([str(pool.tar(s)) for s in pool.shards])
    base = load_config().train
    cfg = dataclasses.replace(base, device="cpu", precision="fp32", log_every=1, checkpoint_every=0, warmup_steps=2)
    out = ctx.work_dir / "train-from-shards"

    # the same model, optimiser and loss for the in-memory side; one fixed batch through the train transform
    with quiet_warnings():
        model, preprocess, optimizer, _ = _build(cfg, "cpu", "fp32", None)
    model.train()
    loss_fn = open_clip.ClipLoss()
    from sources.embedded import generate

    samples = generate(cfg.batch_size, seed=11)
    images = torch.stack([preprocess(Image.open(io.BytesIO(s.image)).convert("RGB")) for s in samples])
    texts = open_clip.get_tokenizer(cfg.model)([s.caption for s in samples])

    shard_steps: list[float] = []
    memory_steps: list[float] = []
    per_round: list[float] = []  # each round's ratio: the two sides measured back to back
    call_start: list[float] = []  # the first `skip` steps of each resumed call (set-up, new worker), from shards
    with quiet_warnings():
        for r in range(1, rounds + 1):
            started = time.perf_counter()
            train(urls, out, dataclasses.replace(cfg, steps=r * chunk), progress=False)
            call_s = time.perf_counter() - started
            log = [json.loads(line) for line in (out / LOG).read_text().splitlines() if line.strip()]
            shards_now = [rec["step_s"] for rec in log if (r - 1) * chunk + skip < rec["step"] <= r * chunk]
            call_start += [rec["step_s"] for rec in log if (r - 1) * chunk < rec["step"] <= (r - 1) * chunk + skip]
            with intra_op_threads(cfg.threads):  # the threads train() gives itself
                memory_now = _in_memory_steps(model, optimizer, loss_fn, images, texts, chunk)[skip:]
            shard_steps += shards_now
            memory_steps += memory_now
            per_round.append(statistics.median(memory_now) / statistics.median(shards_now))
            ctx.log(f"  train round {r}: train() call {call_s:.1f} s for {chunk} steps; median step "
                    f"{statistics.median(shards_now):.3f} s from shards, {statistics.median(memory_now):.3f} s in memory")
        loader = loader_rate(urls, cfg, 3 if ctx.quick else 6)

    shard_rate = cfg.batch_size / statistics.median(shard_steps)
    memory_rate = cfg.batch_size / statistics.median(memory_steps)
    ratio = statistics.median(per_round)  # paired per round: robust to load that drifts between rounds
    quartiles = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else [ratio, ratio, ratio]
    result.rows.append(Ratio(NAME, "samples/s from shards / same model on in-memory tensors", ratio, "x",
                             f">= {TARGET:g}", ratio >= TARGET,
                             f"{shard_rate:.0f} vs {memory_rate:.0f} samples/s, {cfg.workers} loader worker(s), "
                             f"{cfg.threads} torch threads; rounds {min(per_round):.2f}-{max(per_round):.2f}, "
                             f"quartiles {quartiles[0]:.2f}-{quartiles[2]:.2f}"))
    result.rows.append(Ratio(NAME, "data pipeline alone (no training) / training from memory", loader / memory_rate,
                             "x", "", None, f"{loader:.0f} samples/s decoded + augmented"))
    result.data = {"model": cfg.model, "batch_size": cfg.batch_size, "workers": cfg.workers, "torch_threads": cfg.threads,
                   "steps_timed": {"shards": len(shard_steps), "memory": len(memory_steps)}, "per_round_ratio": per_round,
                   "steps_left_out_per_round": skip, "call_start_step_s": call_start,
                   "median_step_s": {"shards": statistics.median(shard_steps), "memory": statistics.median(memory_steps)},
                   "samples_per_s": {"shards": shard_rate, "memory": memory_rate, "loader_alone": loader}}
    result.markdown = "\n".join([
        f"`{cfg.model}` at batch {cfg.batch_size}, {cfg.threads} torch threads (`[train] threads`), "
        f"{cfg.workers} DataLoader worker(s), fp32 on CPU; {rounds} rounds of {chunk} steps per side, "
        f"the first {skip} of each chunk left out (a resumed call's start: the model and checkpoint loaded, a new "
        f"loader worker forked and filling its shuffle buffer; those steps took {statistics.median(call_start):.2f} s "
        f"(median) from shards); {len(pool.shards)} shards of 64 embedded images (512x384 JPEG).",
        "",
        "| side | median s / step | samples/s |",
        "|---|---:|---:|",
        f"| from shards (`training.train.train`) | {statistics.median(shard_steps):.3f} | {shard_rate:.1f} |",
        f"| in-memory tensors | {statistics.median(memory_steps):.3f} | {memory_rate:.1f} |",
        f"| data pipeline alone (decode + transform + tokenize, no model) | — | {loader:.1f} |",
        "",
        "The ratio is the median over rounds of each round's ratio (the two sides back to back): "
        + ", ".join(f"{x:.2f}" for x in per_round) + f" (quartiles {quartiles[0]:.2f}-{quartiles[2]:.2f}; "
        "the machine is shared, and host load alone moves a round by about 0.1). The loader worker and the two training threads share "
        f"{ctx.cores} cores. Were all of the worker's CPU taken from the threads, the ratio would be about "
        "(2 x in-memory step) / (2 x in-memory step + loader CPU per batch) = "
        f"{2 * statistics.median(memory_steps) / (2 * statistics.median(memory_steps) + cfg.batch_size / loader):.2f}; "
        "the worker also decodes in the gaps the threads leave, since they sleep when idle (`OMP_WAIT_POLICY=PASSIVE`, "
        "which the train command sets before torch loads) and it runs at nice 19 (`training.train`). "
        "With spinning threads and the worker at the threads' priority this was 0.80x.",
    ])
    return result


def main(argv: list[str] | None = None) -> int:
    return standalone_main(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
