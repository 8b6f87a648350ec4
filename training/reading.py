"""The reading start: an image tower that can already read, before any contrastive step.

Large CLIPs read; at CPU scale a tower never learns to from captions (docs/ablation.md, issue 17).
The papers' claim is about what data teaches a tower that can read, so the CPU ablation first
trains the image tower, supervised, to name the word written on an image (1,000 common words,
training/reading_words.txt, drawn by training/reading_render.py), then starts every variant from
that one checkpoint.

Two heads sit on the tower's embedding while it learns: a linear classifier over the words, and
one that says which letters and letter pairs the word holds (its bag of unigrams and bigrams,
wherever they stand: Jaderberg et al.'s N-gram encoding). The letters are shared by every word, so
they give each image a dense signal that a 1,000-way softmax alone gives only once the tower has
left chance (measured: alone, the loss stays at ln(1000) for 500 steps); the word head is what the
held-out top-1 measures. The draws start easy (big words on flat colours, the 100 most frequent
words) and reach the full mix (photographs, slant, blur, small words, all 1,000) a third of the way in.

The start is built once per settings and model and kept in ``$CLIP_CURATION_CACHE/reading/`` (key:
the ``[reading]`` settings, the model's open_clip config, the word list, the drawing code, torch
and open_clip versions): ``start.pt`` is an open_clip checkpoint of the whole CLIP (the trained
image tower; the text tower at its seeded init) that ``[train] pretrained`` loads through open_clip's
own path; ``head.pt`` holds the two heads for the probes; ``reading.json``, written last, the
settings and the held-out accuracy. A start whose files do not match their recorded SHA-256 is
rebuilt, never used. A build writes ``partial.pt`` every 500 steps; a build that was killed goes on
from its last one (the draws are a pure function of the seed and the step, the optimiser's state is
saved), so it ends with the same weights as one that ran straight through.

A start can be carried to another machine instead of built there: ``python -m training.reading
--ship MODEL`` writes its trained tower and heads into ``training/reading_starts/`` (not tracked:
weights belong to a package, and this one is 6.4 MB), with the key of the recipe they came from
(settings, model, words, drawing; not the library versions). A start there whose recipe matches is
put in the cache in seconds, once its tower reads the probe renders as it did where it was built;
any other recipe is built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from core.cache import cache_dir, write_atomic
from manifests.store import sha256_of
from pipeline.training_config import ReadingConfig
from training import reading_render  # its WORDS_FILE: the vocabulary is part of the key
from training.reading_render import draw, reading_words

NGRAMS = 26 + 26 * 26  # the bag head's outputs: every letter, then every letter pair
BAG_WEIGHT = 30.0  # the bag head's mean binary cross-entropy is this many times the word loss's weight
RAMP_SHARE = 1 / 3  # the share of the steps over which the draws go from easy to the full mix
FIRST_WORDS = 100  # the draws start from the 100 most frequent words and reach all of them with the mix
START_FILE, HEAD_FILE, INFO_FILE, LOG_FILE = "start.pt", "head.pt", "reading.json", "reading_log.jsonl"
PARTIAL_FILE = "partial.pt"  # a build under way: tower, heads, optimiser and step, so a killed build resumes
SHIPPED_DIR = Path(__file__).parent / "reading_starts"  # starts carried from the machine that built them
PROBE_RENDERS = 200  # unseen renders a shipped start must read on loading as it read where it was built
RUN_SETTINGS = ("threads", "workers")  # how a build runs, not what it learns: a shipped start serves any value
PROBE_TOLERANCE = 0.02  # top-1 it may differ by there (another torch, another CPU): more, and it is built instead
EVAL_EVERY = 500  # steps between held-out checks in the log (and at the end)
CHECKPOINT_EVERY = 500  # steps between the partial checkpoints a killed build resumes from
# Bump when the drawing (training/reading_render.py) or the training below changes what is built:
# the cache key holds it, so every cached start is rebuilt once (an edit to a comment is not one).
READING_VERSION = 3


@dataclass(frozen=True)
class ReadingStart:
    """A built start: where its checkpoint is, and how well its tower reads."""

    model: str
    checkpoint: str  # open_clip checkpoint of the whole CLIP ([train] pretrained)
    folder: str
    steps: int
    words: int
    held_out_top1: float  # word head on unseen renders, over every word
    held_out_curve: tuple[tuple[int, float], ...]  # (step, held-out top-1) at every check
    seconds: float  # build time
    built: bool = False  # True when this call built it (False: found in the cache)
    shipped: bool = False  # taken from training/reading_starts/ (built on another machine), not built here
    precision: str = ""  # what the build computed in: "bf16" | "fp32" ("": not recorded)

    def summary(self) -> str:
        how = (f"built in {self.seconds:.0f} s" + (f" ({self.precision})" if self.precision else "") if self.built else
               f"taken from training/reading_starts/ (built in {self.seconds:.0f} s)" if self.shipped else
               f"cached (built in {self.seconds:.0f} s)")
        return (f"reading start {self.model}: held-out top-1 {self.held_out_top1:.3f} over {self.words} words "
                f"after {self.steps} steps, {how}: {self.checkpoint}")


def _recipe(model: str, cfg: ReadingConfig) -> dict[str, Any]:
    """What decides the weights a build ends with, short of the library versions."""
    import open_clip

    from models.clip import register_model_configs

    register_model_configs()
    return {
        "settings": asdict(cfg),
        "model": model,
        "model_config": open_clip.get_model_config(model),
        "words": hashlib.sha256(reading_render.WORDS_FILE.read_bytes()).hexdigest(),
        "version": READING_VERSION,
    }


def _hash(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def start_key(model: str, cfg: ReadingConfig) -> str:
    """What the start is built from, hashed: any change builds another one."""
    import open_clip
    import torch

    return _hash({**_recipe(model, cfg), "torch": torch.__version__, "open_clip": open_clip.__version__})


def shipped_key(model: str, cfg: ReadingConfig) -> str:
    """The key a shipped start answers to: the recipe without the library versions and without
    ``RUN_SETTINGS`` (another torch or thread count computes the same tower a little differently,
    which the probe on loading checks)."""
    recipe = _recipe(model, cfg)
    recipe["settings"] = {k: v for k, v in recipe["settings"].items() if k not in RUN_SETTINGS}
    return _hash(recipe)


def start_folder(model: str, cfg: ReadingConfig) -> Path:
    return cache_dir("reading") / f"{model}-{start_key(model, cfg)[:16]}"


def reading_start(model: str, cfg: ReadingConfig, progress: bool = True) -> ReadingStart:
    """The cached start for ``model`` and ``cfg``, built first when missing or not intact."""
    folder = start_folder(model, cfg)
    found = _load(folder)
    if found is not None:
        return found
    shipped = _from_shipped(model, cfg, folder)
    if shipped is not None:
        return shipped
    return _build(model, cfg, folder, progress)


def _load(folder: Path) -> ReadingStart | None:
    info_path = folder / INFO_FILE
    if not info_path.is_file():
        return None
    try:
        info = json.loads(info_path.read_text())
        recorded = info["sha256"]
    except (ValueError, KeyError, TypeError):
        recorded = {}
    for name in (START_FILE, HEAD_FILE):
        path = folder / name
        if not path.is_file() or sha256_of(path) != recorded.get(name):
            print(f"reading start {folder}: {name} does not match its recorded SHA-256; building it again",
                  file=sys.stderr)
            return None
    fields = {f.name for f in dataclasses.fields(ReadingStart)}
    values = {k: v for k, v in info.items() if k in fields}
    values["held_out_curve"] = tuple(tuple(p) for p in values["held_out_curve"])
    # where it is now (a cache folder may have been moved or mounted elsewhere), not where it was built
    values.update(folder=str(folder), checkpoint=str(folder / START_FILE))
    return ReadingStart(**values)


def _from_shipped(model_name: str, cfg: ReadingConfig, folder: Path) -> ReadingStart | None:
    """The start carried into ``SHIPPED_DIR`` for ``model_name``, put in the cache, when it was built from these
    very settings, its file is intact and it reads here as it read where it was built (the probe:
    held-out top-1 on the first ``PROBE_RENDERS`` unseen renders); else None, and a build follows."""
    info_path = SHIPPED_DIR / f"{model_name}.json"
    if not info_path.is_file():
        return None
    try:
        info = json.loads(info_path.read_text())
        if info.get("key") != shipped_key(model_name, cfg):
            return None  # built from other settings (or another drawing): not this start
        weights = SHIPPED_DIR / str(info["file"])
        recorded = (info["sha256"], float(info["probe_top1"]), str(info["built_with"]["torch"]),
                    float(info["held_out_top1"]), tuple((int(a), float(b)) for a, b in info["held_out_curve"]),
                    float(info["seconds"]))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        print(f"reading start {model_name}: the shipped {info_path.name} cannot be read ({error!r}); building it "
              "instead", file=sys.stderr)
        return None
    sha256, probe_built, torch_built, held_out, curve, seconds = recorded
    if not weights.is_file() or sha256_of(weights) != sha256:
        print(f"reading start {model_name}: the shipped {weights.name} is damaged (it does not match its recorded "
              "SHA-256); building it instead", file=sys.stderr)
        return None
    try:
        model, heads, probe_here = _shipped_tower(model_name, cfg, weights)
    except Exception as error:  # noqa: BLE001 - another open_clip or torch may not take the file: build instead
        print(f"reading start {model_name}: the shipped {weights.name} does not load here ({error}); building it "
              "instead", file=sys.stderr)
        return None
    if abs(probe_here - probe_built) > PROBE_TOLERANCE:
        print(f"reading start {model_name}: the shipped tower reads {probe_here:.3f} of {PROBE_RENDERS} unseen renders "
              f"here against {probe_built:.3f} where it was built (torch {torch_built}); building it instead",
              file=sys.stderr)
        return None
    folder.mkdir(parents=True, exist_ok=True)
    start = ReadingStart(model=model_name, checkpoint=str(folder / START_FILE), folder=str(folder), steps=cfg.steps,
                         words=len(reading_words()), held_out_top1=held_out, held_out_curve=curve, seconds=seconds,
                         shipped=True)
    _write_start(folder, model, heads, start, cfg)
    return start


def _shipped_tower(model_name: str, cfg: ReadingConfig, weights: Path) -> tuple[Any, Any, float]:
    """The seed's CLIP with the shipped tower and heads on it, and how it reads the probe renders."""
    import torch

    model, heads, preprocess, side = _seeded(model_name, cfg)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.visual.load_state_dict(state["visual"])
    heads.load_state_dict(state["heads"])
    return model, heads, probe_top1(model, heads, preprocess, side, cfg)


def probe_top1(model: Any, heads: Any, preprocess: Any, side: int, cfg: ReadingConfig) -> float:
    """Held-out top-1 on the first ``PROBE_RENDERS`` unseen renders: a shipped start's check."""
    return held_out_top1(model.visual, heads, _Draws(cfg.seed + 1, PROBE_RENDERS, side, preprocess).batch(0))


def ship(model_name: str, cfg: ReadingConfig, dest: Path = SHIPPED_DIR) -> Path:
    """Write the cached start of ``model_name`` (built first if missing) into ``dest`` for another
    machine to take instead of building it: the trained image tower and heads (the text tower is the
    seed's init, made again on loading), with the recipe's key, the held-out figures and the probe a
    loading machine repeats."""
    import open_clip
    import torch

    start = reading_start(model_name, cfg)
    model, heads, preprocess, side = _seeded(model_name, cfg)
    model.load_state_dict(torch.load(start.checkpoint, map_location="cpu", weights_only=True)["state_dict"])
    heads.load_state_dict(torch.load(Path(start.folder) / HEAD_FILE, map_location="cpu", weights_only=True))
    probe = probe_top1(model, heads, preprocess, side, cfg)
    dest.mkdir(parents=True, exist_ok=True)
    weights = dest / f"{model_name}.pt"
    write_atomic(weights, lambda f: torch.save({"visual": model.visual.state_dict(), "heads": heads.state_dict()}, f))
    info = {"model": model_name, "file": weights.name, "sha256": sha256_of(weights), "key": shipped_key(model_name, cfg),
            "settings": asdict(cfg), "steps": start.steps, "held_out_top1": start.held_out_top1,
            "held_out_curve": start.held_out_curve, "seconds": round(start.seconds, 1),
            "probe_renders": PROBE_RENDERS, "probe_top1": probe,
            "built_with": {"torch": torch.__version__, "open_clip": open_clip.__version__}}
    info_path = dest / f"{model_name}.json"
    write_atomic(info_path, lambda f: f.write((json.dumps(info, indent=1) + "\n").encode()))
    return info_path


def ngram_bags(words: tuple[str, ...]) -> Any:
    """One row per word: 1 where it holds a letter (column ``a..z``) or a letter pair (26 + 26 i + j)."""
    import torch

    bags = torch.zeros(len(words), NGRAMS)
    for row, word in enumerate(words):
        codes = [ord(letter) - ord("a") for letter in word]
        for code in codes:
            bags[row, code] = 1.0
        for first, second in zip(codes, codes[1:]):
            bags[row, 26 + 26 * first + second] = 1.0
    return bags


def _heads(dim: int, words: int) -> Any:
    import torch

    return torch.nn.ModuleDict({"word": torch.nn.Linear(dim, words), "bag": torch.nn.Linear(dim, NGRAMS)})


class _Draws:
    """An endless stream of (images, labels) batches, batch ``b`` drawn from indices
    ``b * batch_size ...``; DataLoader workers take batches in turn, so the order is the seed's."""

    def __init__(self, seed: int, batch_size: int, side: int, preprocess: Any, ramp_batches: int = 0) -> None:
        self.seed, self.batch_size, self.side, self.preprocess = seed, batch_size, side, preprocess
        self.ramp_batches = ramp_batches  # batches until the full mix (0: the full mix from the start)

    def batch(self, number: int) -> tuple[Any, Any]:
        import torch

        progress = min(1.0, number / self.ramp_batches) if self.ramp_batches else 1.0
        words = len(reading_words())
        first = round(FIRST_WORDS + (words - FIRST_WORDS) * progress) if FIRST_WORDS < words else words
        pairs = [draw(self.seed, number * self.batch_size + k, self.side, progress, first)
                 for k in range(self.batch_size)]
        return (torch.stack([self.preprocess(image) for image, _ in pairs]),
                torch.tensor([label for _, label in pairs]))


def _stream(draws: _Draws, workers: int, first: int = 0) -> Iterator[tuple[Any, Any]]:
    """Batches ``first, first + 1, ...`` in order (``first``: where a resumed build goes on)."""
    import torch

    class Batches(torch.utils.data.IterableDataset):
        def __iter__(self) -> Iterator[tuple[Any, Any]]:
            info = torch.utils.data.get_worker_info()
            number, stride = (first, 1) if info is None else (first + info.id, info.num_workers)
            while True:
                yield draws.batch(number)
                number += stride

    from training.train import below_the_training

    # the drawing workers share the CPU with the tower's threads: they run below them (train.py)
    loader = torch.utils.data.DataLoader(Batches(), batch_size=None, num_workers=workers,
                                         prefetch_factor=4 if workers else None, persistent_workers=False,
                                         worker_init_fn=below_the_training if workers else None)
    return iter(loader)


def computes_in_bf16(precision: str) -> bool:
    """Whether a build autocasts to bf16: ``auto`` does where oneDNN computes bf16 natively (AVX-512
    BF16 or AMX; there the ResNet's step is ~1.8x faster with channels-last), not where it would
    emulate it, slower than fp32."""
    import torch

    if precision != "auto":
        return precision == "bf16"
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _seeded(model_name: str, cfg: ReadingConfig) -> tuple[Any, Any, Any, int]:
    """The CLIP, heads, preprocessing and image side a build starts from: the seed's random init
    (the text tower stays at it; a shipped start puts its trained tower and heads on top)."""
    import open_clip
    import torch

    from models.clip import register_model_configs, without_open_clip_random_notice

    register_model_configs()
    with torch.random.fork_rng(devices=[]), without_open_clip_random_notice():  # a random init is the point here
        torch.manual_seed(cfg.seed)
        model, _, preprocess = open_clip.create_model_and_transforms(model_name)
        heads = _heads(model.visual.output_dim, len(reading_words()))
    side = model.visual.image_size
    return model, heads, preprocess, side[0] if isinstance(side, (tuple, list)) else side


def _write_start(folder: Path, model: Any, heads: Any, start: ReadingStart, cfg: ReadingConfig) -> None:
    """The start's files, ``reading.json`` last (the marker of a start that is whole)."""
    import torch

    write_atomic(folder / START_FILE, lambda f: torch.save({"state_dict": model.state_dict()}, f))
    write_atomic(folder / HEAD_FILE, lambda f: torch.save(heads.state_dict(), f))
    info = {**asdict(start), "settings": asdict(cfg), "built": False,
            "sha256": {name: sha256_of(folder / name) for name in (START_FILE, HEAD_FILE)}}
    write_atomic(folder / INFO_FILE, lambda f: f.write((json.dumps(info, indent=1) + "\n").encode()))


def learning_rate(optimizer: Any, cfg: ReadingConfig) -> Callable[[int], float]:
    """The build's rate, step -> lr (set on ``optimizer``), from open_clip's own schedules.

    ``const-cooldown`` (warmup-stable-decay) is the default because the tower leaves chance only
    after ~1,500 steps: a cosine has spent much of its rate by then, while a held rate keeps it
    learning and the linear fall at the end settles it (7,000 such steps read as well as 10,000
    cosine ones: docs/ablation.md)."""
    from open_clip_train.scheduler import const_lr_cooldown, cosine_lr

    if cfg.schedule == "cosine":
        return cosine_lr(optimizer, cfg.lr, cfg.warmup_steps, cfg.steps)
    return const_lr_cooldown(optimizer, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.cooldown_steps())


def _build(model_name: str, cfg: ReadingConfig, folder: Path, progress: bool) -> ReadingStart:
    import torch
    from tqdm import tqdm

    from training.train import adamw, intra_op_threads, truncate_log

    cfg.validate()
    started = time.monotonic()
    words = reading_words()
    model, heads, preprocess, side = _seeded(model_name, cfg)
    bf16 = computes_in_bf16(cfg.precision)
    model.visual.to(memory_format=torch.channels_last)  # oneDNN's convolutions run faster on NHWC
    bags = ngram_bags(words)
    trained = torch.nn.ModuleDict({"visual": model.visual, "heads": heads})
    optimizer = adamw(trained, cfg)
    schedule = learning_rate(optimizer, cfg)
    held = _Draws(cfg.seed + 1, cfg.held_out, side, preprocess).batch(0)  # unseen draws: another seed
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INFO_FILE).unlink(missing_ok=True)  # the marker of a start that did not pass its check goes first
    key = start_key(model_name, cfg)
    done, curve, earlier_seconds = _resume(folder, key, trained, optimizer)
    started -= earlier_seconds  # a resumed build's time is both runs' together
    print(f"== reading start {model_name}: {cfg.steps} steps x {cfg.batch_size} renders of {len(words)} words, "
          f"{'bf16' if bf16 else 'fp32'} ({folder})" + (f", going on from step {done}" if done else ""), file=sys.stderr)
    truncate_log(folder / LOG_FILE, done)  # the steps a killed build logged past its last checkpoint run again
    ramp = max(1, round(cfg.steps * RAMP_SHARE))
    batches = _stream(_Draws(cfg.seed, cfg.batch_size, side, preprocess, ramp), cfg.workers, first=done)
    with (intra_op_threads(cfg.threads), open(folder / LOG_FILE, "a") as log,
          tqdm(total=cfg.steps, initial=done, unit="step", desc=f"reading start {model_name}",
               disable=not progress) as bar):
        trained.train()
        for step, (images, labels) in zip(range(done + 1, cfg.steps + 1), batches):
            schedule(step - 1)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # weights and optimiser stay fp32
                features = model.visual(images.contiguous(memory_format=torch.channels_last))
                word_logits, bag_logits = heads["word"](features), heads["bag"](features)
            word_loss = torch.nn.functional.cross_entropy(word_logits.float(), labels)
            bag_loss = torch.nn.functional.binary_cross_entropy_with_logits(bag_logits.float(), bags[labels])
            optimizer.zero_grad(set_to_none=True)
            (word_loss + BAG_WEIGHT * bag_loss).backward()
            optimizer.step()
            record: dict[str, Any] = {"step": step, "word_loss": word_loss.item(), "bag_loss": bag_loss.item()}
            if step % EVAL_EVERY == 0 or step == cfg.steps:
                curve.append((step, held_out_top1(model.visual, heads, held)))
                record["held_out_top1"] = curve[-1][1]
                trained.train()
            if step % 10 == 0 or "held_out_top1" in record:
                bar.set_postfix(word_loss=f"{word_loss.item():.2f}", held_out=f"{curve[-1][1]:.3f}" if curve else "-")
            log.write(json.dumps(record) + "\n")
            if step % 50 == 0:
                log.flush()  # the log is how a long build is watched
            if step % CHECKPOINT_EVERY == 0 and step < cfg.steps:
                log.flush()
                _save_partial(folder, key, step, curve, time.monotonic() - started, trained, optimizer)
            bar.update(1)
    start = ReadingStart(model=model_name, checkpoint=str(folder / START_FILE), folder=str(folder), steps=cfg.steps,
                         words=len(words), held_out_top1=curve[-1][1], held_out_curve=tuple(curve),
                         seconds=time.monotonic() - started, built=True, precision="bf16" if bf16 else "fp32")
    model.visual.to(memory_format=torch.contiguous_format)  # the checkpoint in the layout every loader expects
    _write_start(folder, model, heads, start, cfg)
    (folder / PARTIAL_FILE).unlink(missing_ok=True)
    return start


def _save_partial(folder: Path, key: str, step: int, curve: list[tuple[int, float]], seconds: float,
                  trained: Any, optimizer: Any) -> None:
    import torch

    state = {"key": key, "step": step, "curve": curve, "seconds": seconds, "trained": trained.state_dict(),
             "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}
    write_atomic(folder / PARTIAL_FILE, lambda f: torch.save(state, f))


def _resume(folder: Path, key: str, trained: Any,
            optimizer: Any) -> tuple[int, list[tuple[int, float]], float]:
    """The step a killed build reached (0 with none), its held-out curve and its seconds so far; the
    tower, heads, optimiser and random state are put back as they were at that step."""
    import torch

    path = folder / PARTIAL_FILE
    if not path.is_file():
        return 0, [], 0.0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["key"] != key:
            raise ValueError("another build's checkpoint")
        trained.load_state_dict(state["trained"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
    except Exception as error:  # noqa: BLE001 - a damaged partial checkpoint costs a fresh build, nothing else
        print(f"reading start {folder}: {PARTIAL_FILE} cannot be resumed from ({error}); building from step 0",
              file=sys.stderr)
        path.unlink(missing_ok=True)
        return 0, [], 0.0
    return int(state["step"]), [(int(s), float(v)) for s, v in state["curve"]], float(state["seconds"])


def held_out_top1(visual: Any, heads: Any, held: tuple[Any, Any]) -> float:
    """The word head's top-1 on ``held`` (images, labels), in eval mode."""
    import torch

    visual.eval()
    with torch.no_grad():
        predicted = torch.cat([heads["word"](visual(chunk)).argmax(1) for chunk in held[0].split(256)])
    return float((predicted == held[1]).float().mean())


def probe(start: ReadingStart, sets: Any) -> dict[str, float]:
    """How the start's tower reads the evaluation sets through its word head (no text tower):
    the class words alone (``text_only``) named among all words and among the classes, and the
    word written on the typographic attack's images (``typographic``) among the classes."""
    import io

    import open_clip
    import torch
    from PIL import Image

    from models.clip import register_model_configs

    register_model_configs()
    words = reading_words()
    model, _, preprocess = open_clip.create_model_and_transforms(start.model, pretrained=start.checkpoint)
    heads = _heads(model.visual.output_dim, len(words))
    heads.load_state_dict(torch.load(Path(start.folder) / HEAD_FILE, map_location="cpu", weights_only=True))
    model.visual.eval()
    classes = [words.index(c) for c in sets.classes]

    def logits(items: Any) -> Any:
        images = torch.stack([preprocess(Image.open(io.BytesIO(item.image)).convert("RGB")) for item in items])
        with torch.no_grad():
            return heads["word"](model.visual(images))

    text_only = logits(sets.text_only)
    truth = torch.tensor([item.label for item in sets.text_only])
    typographic = logits(sets.typographic)
    written = torch.tensor([item.written_label for item in sets.typographic])
    return {
        "text_only_top1_words": float((text_only.argmax(1) == torch.tensor(classes)[truth]).float().mean()),
        "text_only_top1_classes": float((text_only[:, classes].argmax(1) == truth).float().mean()),
        "typographic_read_classes": float((typographic[:, classes].argmax(1) == written).float().mean()),
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    from pipeline.config import load_config

    parser = argparse.ArgumentParser(
        prog="python -m training.reading",
        description="Build (or find in the cache) the reading start of each MODEL at a config's [reading] settings "
        "and print how well it reads. With --ship, also write it into training/reading_starts/, where another "
        "machine with this checkout takes it instead of building (copy the two files it prints).")
    parser.add_argument("models", nargs="+", metavar="MODEL", help="open_clip model names, e.g. curation-tiny-rn")
    parser.add_argument("--config", default=None, help="TOML whose [reading] section to use (default: the shipped)")
    parser.add_argument("--ship", action="store_true", help="write the start into training/reading_starts/")
    args = parser.parse_args(argv)
    from training.train import sleeping_omp_threads

    sleeping_omp_threads()  # before torch loads: the drawing workers get the cores the tower's threads leave
    cfg = load_config(args.config).reading
    for model in args.models:
        print(reading_start(model, cfg).summary())
        if args.ship:
            path = ship(model, cfg)
            print(f"shipped: {path} and {path.with_suffix('.pt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
