"""Train stage: an open_clip model on curated WebDataset shards, for a fixed number of steps.

Curation policies are compared by the models they give, so every policy's model gets the same
compute: ``steps`` optimisation steps of ``batch_size`` samples, whatever the number of samples the
policy kept. The data stream is resampled (shards drawn with replacement, for ever), so a small
subset is simply seen more often and never runs out.

What is open_clip's and what is ours: the model and its train transform, the tokenizer, ``ClipLoss``
and the warmup + cosine schedule are open_clip's (``open_clip_train.scheduler.cosine_lr``); so are the
recipe details copied from ``open_clip_train``: AdamW without weight decay on gains, biases and
``logit_scale``, and ``logit_scale`` clamped to ln(100) after each step. This file only wires them
into a loop with checkpoints, a log and resume.

- **Checkpoints** are open_clip's format (a dict with ``state_dict``), so stock
  ``open_clip.create_model_and_transforms(name, pretrained=path)`` loads them. Each is written under
  a temporary name and renamed; ``checkpoints/latest.pt`` is a hard link to the newest.
- **Resume**: a call finds ``latest.pt`` and continues from its step (model, optimiser, grad scaler;
  the learning rate is a function of the step) up to ``steps``; at ``steps`` already it does nothing
  and says so. Log lines past the checkpoint (a run killed between checkpoints) are dropped first.
- **Determinism**: the init, the shard draws, the sample shuffle, the augmentation and the patch masks
  all derive from ``seed`` (and the step a run starts at, so a resumed run draws fresh data).
- **Precision**: ``amp`` autocasts on CUDA (bf16 where supported, else fp16 with a grad scaler); on
  CPU the same code runs in fp32 and the result records "fp32".
- **Source**: a policy's curated shards, or (``source = "selection"``) its kept samples read from
  the download shards through its selection (``training.selection_data``), with no resharded copy.
  Either source only yields raw samples; one pipeline (:func:`_batches`) turns them into tensors.
- **Masking** (``random`` as in FLIP, or ``pgs``): each step keeps a subset of the image patches
  (``models.patch_masking``), so a step costs less; the images are whole again after the step.
- **Sharing a CPU with the loader**: on a CPU the DataLoader workers and torch's threads share the
  cores. torch's idle OpenMP threads sleep instead of spinning (:func:`sleeping_omp_threads`, which the
  train and ablation commands call first), and the workers run at the lowest priority
  (:func:`below_the_training`), so they decode in the gaps the model leaves rather than taking a
  core from it: 0.80x -> 0.88-0.91x of the in-memory rate on 2 cores (``make bench --only train``).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.devices import resolve_device
from core.errors import ConfigError
from manifests.store import SIZES_FILE, tmp_sibling, write_json_atomic
from models.pixels import Pixels
from pipeline.training_config import TrainConfig  # the [train] section, declared below pipeline/config.py
from training.tar_members import tar_file_expander

logger = logging.getLogger(__name__)

TRAIN_DEVICE = "train.device"  # the config key named in device errors
CHECKPOINTS = "checkpoints"  # step_<n>.pt and latest.pt, inside the output folder
LATEST = "latest.pt"
LOG = "train_log.jsonl"  # one line per logged step: step, loss, lr, logit_scale, step_s
RESULT = "result.json"  # the TrainResult and the config, written when a run ends
IMAGE_EXTS = "jpg;png;jpeg;webp"
OMP_WAIT_POLICY = "OMP_WAIT_POLICY"  # libgomp's (torch's OpenMP on Linux) setting for idle threads
LOADER_NICENESS = 19  # a CPU training's DataLoader workers: the lowest priority, below the model's threads

Shards = Sequence[str | Path] | str | Path  # a list of tars, a brace pattern, or a curated folder


@dataclass
class TrainResult:
    """What a call did. ``loss_curve`` holds only this call's logged steps (the log file has all)."""

    out_dir: str
    step: int  # the step the model is at now
    start_step: int  # the step this call started from (0, or the resumed checkpoint's)
    steps_done: int  # optimisation steps run by this call
    final_loss: float | None  # the last logged loss (of an earlier call when nothing was done)
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    step_time_s: float = 0.0  # mean wall time per step after the first (data waits included)
    samples_per_s: float = 0.0
    checkpoint: str = ""
    device: str = ""
    precision: str = ""  # what ran: "fp32" | "amp-bf16" | "amp-fp16"
    masking: str = "none"
    shards: int = 0
    source: str = "curated"  # "curated" shards, or "selection" (download shards through a selection)
    skipped: bool = False  # the checkpoint was already at the requested steps

    def summary(self) -> str:
        if self.skipped:
            return f"train: {self.out_dir} is already at step {self.step}: no training done (resumed run)"
        first = self.loss_curve[0][1] if self.loss_curve else float("nan")
        return (
            f"train: steps {self.start_step + 1}..{self.step} on {self.shards} {self.source} shard(s) "
            f"in {self.seconds:.1f} s "
            f"({self.step_time_s:.2f} s/step, {self.samples_per_s:.1f} samples/s), loss {first:.3f} -> "
            f"{self.final_loss:.3f}, {self.device} {self.precision}, masking {self.masking} -> {self.checkpoint}"
        )


def shard_urls(shards: Shards) -> list[str]:
    """The tars to train on, from a list, a brace pattern (``dir/{000000..000003}.tar``), or a
    curated folder (the non-empty shards its ``sizes.json`` lists)."""
    import webdataset as wds

    if isinstance(shards, (str, Path)) and Path(shards).is_dir():
        folder = Path(shards)
        if not (folder / SIZES_FILE).is_file():
            raise ValueError(f"{folder} has no {SIZES_FILE}: not a finished curated shard folder")
        sizes = json.loads((folder / SIZES_FILE).read_text())
        urls = [str(folder / name) for name, n in sorted(sizes.items()) if n > 0]
    elif isinstance(shards, (str, Path)):
        urls = wds.shardlists.expand_urls(str(shards))
    else:
        urls = [str(s) for s in shards]
    if not urls:
        raise ValueError(f"no shards to train on in {shards}")
    missing = [u for u in urls if "://" not in u and not os.path.isfile(u)]
    if missing:
        raise ValueError(f"{len(missing)} shard(s) not found, e.g. {missing[0]}")
    return urls


class SampleSource(ABC):
    """Where training's raw samples come from: the first stages of the WebDataset pipeline, which
    yield ``{"__key__", "jpg", "txt", ...}`` dicts of bytes, endlessly. Everything after (shuffle,
    decode, transform, batch, tokenize) is one pipeline for every source (:func:`_batches`)."""

    kind: str = ""  # named in the result: "curated", "selection"
    shards: int = 0  # tars it reads

    @abstractmethod
    def stages(self, seed: int) -> list[Any]:
        """The pipeline's source stages, drawing from ``seed`` (and the DataLoader worker)."""


class CuratedShards(SampleSource):
    """WebDataset shards (a policy's curated folder): tars drawn with replacement, read whole."""

    kind = "curated"

    def __init__(self, shards: Shards) -> None:
        self.urls = shard_urls(shards)
        self.shards = len(self.urls)

    def stages(self, seed: int) -> list[Any]:
        import webdataset as wds

        # worker_seed=, not seed=: webdataset 0.2.86 (the version open_clip_train requires) has no seed
        draws = wds.ResampledShards(self.urls, worker_seed=functools.partial(_worker_seed, seed), deterministic=True)
        # wds.tarfile_to_samples() with its tarfile-based expander swapped for ours (training/tar_members.py)
        return [draws, wds.tariterators.url_opener, tar_file_expander, wds.tariterators.group_by_keys]


def train(shards: Shards | SampleSource, out_dir: Path, cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """Train ``cfg.model`` on ``shards`` (tars, or any :class:`SampleSource`) up to ``cfg.steps``
    steps, resuming from ``out_dir``.

    Writes ``out_dir/checkpoints/step_<n>.pt`` (every ``checkpoint_every`` steps and at the end) and
    ``latest.pt``, ``train_log.jsonl`` and ``result.json``. ``progress`` shows a tqdm bar; the one-line
    summary is ``result.summary()`` (also logged), for the caller to print.
    """
    import open_clip
    import torch
    from open_clip_train.scheduler import cosine_lr
    from tqdm import tqdm

    cfg.validate()
    started = time.monotonic()
    out_dir = Path(out_dir)
    source = shards if isinstance(shards, SampleSource) else CuratedShards(shards)
    device = resolve_device(cfg.device, torch.cuda.is_available(), TRAIN_DEVICE)
    precision = _precision(cfg.precision, device)
    latest = out_dir / CHECKPOINTS / LATEST
    checkpoint = torch.load(latest, map_location="cpu", weights_only=True) if latest.is_file() else None
    start = checkpoint["step"] if checkpoint else 0
    if checkpoint and checkpoint["name"] != cfg.model:
        raise ConfigError(f"train.model is {cfg.model!r} but {latest} holds {checkpoint['name']!r}; use another output")
    if start >= cfg.steps:
        result = TrainResult(
            str(out_dir), start, start, 0, _last_logged_loss(out_dir / LOG), checkpoint=str(latest),
            device=device, precision=precision, masking=cfg.masking, shards=source.shards, source=source.kind,
            skipped=True,
        )
        logger.info(result.summary())
        return result

    model, preprocess, optimizer, scaler = _build(cfg, device, precision, checkpoint)
    del checkpoint  # its CPU copy of the weights and optimiser state is not needed while training
    schedule = cosine_lr(optimizer, cfg.lr, cfg.warmup_steps, cfg.steps)
    loss_fn = open_clip.ClipLoss()
    data_seed = _seed(cfg.seed, start)
    masking = _PatchMasking(model, cfg.masking, cfg.mask_ratio, data_seed, device) if cfg.masking != "none" else None
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16 if precision == "amp-bf16" else torch.float16)
        if precision != "fp32"
        else nullcontext()
    )
    pixels = Pixels(preprocess)
    batches = _batches(source, pixels, open_clip.get_tokenizer(cfg.model), cfg, data_seed, device)
    log_path = out_dir / LOG
    out_dir.mkdir(parents=True, exist_ok=True)
    truncate_log(log_path, start)

    model.train()
    curve: list[tuple[int, float]] = []
    step_times: list[float] = []
    last = time.perf_counter()
    with (
        intra_op_threads(cfg.threads),
        torch.random.fork_rng(devices=[]),
        open(log_path, "a") as log,
        tqdm(total=cfg.steps, initial=start, unit="step", desc=f"train {cfg.model}", disable=not progress) as bar,
    ):
        torch.manual_seed(data_seed)  # what draws in this process (crops when workers = 0) draws from the seed
        for step, (images, texts) in zip(range(start + 1, cfg.steps + 1), batches):
            lr = schedule(step - 1)
            images, texts = pixels.to_model(images, device), texts.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with masking.step(images) if masking else nullcontext():
                with autocast:
                    loss = loss_fn(*model(images, texts))
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            now = time.perf_counter()
            step_times.append(now - last)
            last = now
            if step % cfg.log_every == 0 or step == cfg.steps:
                value = loss.item()
                curve.append((step, value))
                scale = model.logit_scale.exp().item()
                record = {"step": step, "loss": value, "lr": lr, "logit_scale": scale, "step_s": step_times[-1]}
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{value:.3f}")
            if step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                saved = _save_checkpoint(out_dir, step, model, optimizer, scaler, cfg)
            bar.update(1)
    steady = step_times[1:] or step_times
    step_time = sum(steady) / len(steady)
    result = TrainResult(
        str(out_dir), cfg.steps, start, cfg.steps - start, curve[-1][1], curve,
        seconds=time.monotonic() - started, step_time_s=step_time, samples_per_s=cfg.batch_size / step_time,
        checkpoint=str(saved), device=device, precision=precision, masking=cfg.masking, shards=source.shards,
        source=source.kind,
    )
    write_json_atomic({**asdict(result), "config": asdict(cfg)}, out_dir / RESULT)
    logger.info(result.summary())
    return result


def _precision(requested: str, device: str) -> str:
    import torch

    if requested == "amp" and device == "cuda":
        return "amp-bf16" if torch.cuda.is_bf16_supported() else "amp-fp16"
    if requested == "amp":
        logger.info("train.precision 'amp' needs CUDA; training in fp32 on %s", device)
    return "fp32"


def sleeping_omp_threads() -> None:
    """Let this process's idle OpenMP threads sleep rather than spin (``OMP_WAIT_POLICY=PASSIVE``),
    unless the user chose a policy.

    libgomp's threads spin between parallel regions by default, on cores that a CPU training's
    DataLoader worker needs; asleep they leave them to it (2 cores: from shards 0.80x -> 0.86x of
    the in-memory rate alone, 0.89x with the worker niced; the in-memory step was no slower).
    libgomp reads the variable once, when torch loads, so the train and ablation commands and
    ``python -m training.reading`` call this before anything imports torch; once torch is loaded it
    changes nothing. Child processes (loader
    workers, a Ray started afterwards) inherit it."""
    if "torch" not in sys.modules:
        os.environ.setdefault(OMP_WAIT_POLICY, "PASSIVE")


def below_the_training(worker_id: int) -> None:
    """A CPU training's DataLoader worker (and the reading start's drawing worker) runs at the
    lowest priority (``LOADER_NICENESS``): the model's threads keep the cores, and the worker
    decodes when they wait (between parallel regions, in the optimiser's Python), a batch or two
    ahead. Otherwise it takes a core from one of the two threads, and the other waits for it at
    every parallel region."""
    os.nice(LOADER_NICENESS)


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's threads follow the task's CPUs while training (more than the cores it may use only
    spin against each other), and are the caller's again afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _seed(*parts: int) -> int:
    import webdataset as wds

    return wds.utils.make_seed(*parts)


def _worker_seed(seed: int) -> int:
    """``seed`` told apart per DataLoader worker (and rank), so that workers draw different data."""
    import webdataset as wds

    return _seed(seed, wds.utils.pytorch_worker_seed())


def _build(cfg: TrainConfig, device: str, precision: str, checkpoint: dict | None) -> tuple[Any, Any, Any, Any]:
    """The model (seeded init, ``pretrained``, or the checkpoint's weights), its train transform,
    the optimiser and the grad scaler (a no-op unless fp16), restored from the checkpoint if any."""
    import open_clip
    import torch

    from models.clip import register_model_configs

    register_model_configs()
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's RNG alone
        torch.manual_seed(cfg.seed)
        pretrained = None if checkpoint else cfg.pretrained or None  # a resumed run has its own weights
        model, preprocess, _ = open_clip.create_model_and_transforms(cfg.model, pretrained=pretrained, device=device)
    optimizer = adamw(model, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "amp-fp16")
    if checkpoint:
        model.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint["scaler"]:  # empty when saved without a scaler (fp32, bf16)
            scaler.load_state_dict(checkpoint["scaler"])
    return model, preprocess, optimizer, scaler


def adamw(model: Any, cfg: TrainConfig) -> Any:
    """AdamW as open_clip_train builds it: no weight decay on gains, biases and logit_scale."""
    import torch

    def exclude(name: str, p: Any) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": cfg.weight_decay},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-6,  # betas and eps: open_clip_train's defaults for ViTs
    )


def _batches(source: SampleSource, pixels: Pixels, tokenizer: Any, cfg: TrainConfig, seed: int, device: str) -> Any:
    """An endless loader of (images, tokens) batches: the source's samples (shards drawn with
    replacement), shuffled in a buffer, each DataLoader worker seeded apart from the others
    (workers share the shards). The one place that turns samples into tensors, whatever the source.

    On 2 cores the worker takes its CPU from the training threads, so it does as little per sample
    as gives the same pixels (models/pixels.py): a JPEG decoded at the scale its crop needs, crop
    and resize in one PIL call, the batch normalised at once (on a GPU: there, sent as uint8)."""
    import torch
    import webdataset as wds

    pipeline = wds.DataPipeline(
        *source.stages(seed),
        functools.partial(_shuffle_per_worker, bufsize=cfg.shuffle_buffer, seed=seed),
        functools.partial(_decoded, pixels=pixels),
        wds.batched(cfg.batch_size, partial=False,
                    collation_fn=functools.partial(_collate, pixels=pixels, tokenizer=tokenizer, on_gpu=device == "cuda")),
    )
    return wds.WebLoader(
        pipeline,
        batch_size=None,
        num_workers=cfg.workers,
        pin_memory=device == "cuda",
        generator=torch.Generator().manual_seed(seed),  # the workers' torch seeds: the random crops
        worker_init_fn=below_the_training if device == "cpu" else None,  # on a GPU node the loader has cores of its own
    )


def _decoded(samples: Iterator[dict], pixels: Pixels) -> Iterator[tuple[Any, str]]:
    """Each sample's image (``IMAGE_EXTS``, the first present) as the batch holds it, and its caption;
    a sample without either stops the loader, as webdataset's ``to_tuple`` does."""
    exts = IMAGE_EXTS.split(";")
    for sample in samples:
        ext = next((e for e in exts if e in sample), None)
        if ext is None or "txt" not in sample:
            raise ValueError(f"sample {sample.get('__key__')!r} lacks an image ({IMAGE_EXTS}) or a caption (txt)")
        yield pixels.from_encoded(sample[ext]), sample["txt"].decode("utf-8")


def _collate(items: list[tuple[Any, str]], pixels: Pixels, tokenizer: Any, on_gpu: bool) -> tuple[Any, Any]:
    """A batch: the images stacked (for a GPU as uint8, normalised there; for the CPU normalised
    here, in the worker, off the training threads) and the captions tokenized."""
    return pixels.collate([image for image, _ in items], normalise=not on_gpu), tokenizer([c for _, c in items])


def _shuffle_per_worker(samples: Iterator[dict], bufsize: int, seed: int) -> Iterator[dict]:
    import random

    import webdataset as wds

    rng = random.Random(_worker_seed(seed))  # rng=, not seed=: webdataset 0.2.86 has no seed (same draws)
    return wds.shuffle(bufsize, initial=min(bufsize, 100), rng=rng)(samples)


class _PatchMasking:
    """Which image patches each step keeps ("random" or "pgs"), set on the model's patch dropout."""

    def __init__(self, model: Any, masking: str, ratio: float, seed: int, device: str) -> None:
        import torch

        from models import patch_masking

        self.masking, self.ratio, self.module = masking, ratio, patch_masking
        self.dropper = patch_masking.install(model)
        grid_h, grid_w = patch_masking.patch_grid(model)
        self.n_patches, self.patch_size = grid_h * grid_w, model.visual.patch_size[0]
        self.generator = torch.Generator(device=device).manual_seed(seed)

    @contextmanager
    def step(self, images: Any) -> Iterator[None]:
        if self.masking == "random":
            keep = self.module.random_keep_indices(images.shape[0], self.n_patches, self.ratio, self.generator)
        else:
            keep = self.module.pgs_keep_indices(images, self.patch_size, self.ratio, generator=self.generator)
        self.dropper.keep = keep
        try:
            yield
        finally:
            self.dropper.keep = None


def _save_checkpoint(out_dir: Path, step: int, model: Any, optimizer: Any, scaler: Any, cfg: TrainConfig) -> Path:
    """``checkpoints/step_<n>.pt`` in open_clip's format, then ``latest.pt`` linked to it (both atomic)."""
    import torch

    folder = out_dir / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step}.pt"
    state = {
        "step": step,
        "name": cfg.model,
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "config": asdict(cfg),
    }
    tmp = tmp_sibling(path)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
        os.link(path, tmp)
        os.replace(tmp, folder / LATEST)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def truncate_log(path: Path, step: int) -> None:
    """Keep a JSON-lines log's records up to ``step``: a killed run may have logged past its last
    checkpoint, and those steps run again (the trainer's log and the reading start's)."""
    records = _read_log(path)
    kept = [r for r in records if r["step"] <= step]
    if len(kept) < len(records):
        tmp = tmp_sibling(path)
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)


def _last_logged_loss(path: Path) -> float | None:
    records = _read_log(path)
    return records[-1]["loss"] if records else None
