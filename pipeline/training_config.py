"""The ``[train]`` and ``[ablation]`` sections: declared here, not beside the code they configure.

Every other section lives with its stage (core/settings.py), but training/ sits above pipeline/ (the
ablation drives a curate run), so a section declared in training/ would make the composed
:class:`pipeline.config.Config` import the package that imports it. This module holds only the
dataclasses and their checks; training/train.py and training/ablation.py import them from here.
"""

from __future__ import annotations

from typing import Any

from core.settings import config_section, require

SOURCES = ("curated", "selection")  # where ``train`` reads a policy's samples (training.ablation.train_on_policy)
STARTS = ("scratch", "reading")  # where the ablation's variants start (AblationConfig.start)


@config_section
class TrainConfig:
    """Training a CLIP model on one policy's curated shards (training/train.py, in the driver process).

    The budget is a fixed number of optimisation steps at a fixed batch size, not epochs, so the
    models of every curation policy get the same compute however many samples a policy kept.
    """

    model: str = "curation-tiny"  # open_clip model name (models/model_configs/ adds curation-tiny)
    pretrained: str = ""  # "" = seeded random init; an open_clip tag; or a checkpoint file to start from
    steps: int = 300  # optimisation steps in total (a resumed run continues up to this)
    batch_size: int = 64
    lr: float = 1e-3  # peak learning rate of the warmup + cosine schedule
    weight_decay: float = 0.1  # AdamW; gains, biases and logit_scale get none
    warmup_steps: int = 20
    seed: int = 0  # model init, data order and masks
    precision: str = "amp"  # "amp" (autocast bf16/fp16 on CUDA; fp32 on CPU, recorded so) | "fp32"
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    masking: str = "none"  # image patches dropped per step: "none" | "random" (FLIP) | "pgs"
    mask_ratio: float = 0.5  # fraction of patches dropped when masking
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end
    log_every: int = 1  # steps between train_log.jsonl lines
    workers: int = 1  # DataLoader worker processes decoding and transforming images
    shuffle_buffer: int = 500  # samples in the shuffle buffer of each worker
    threads: int = 2  # torch intra-op threads of the training process (the driver's; on CPU, its cores)
    source: str = "curated"  # "curated" shards, or "selection": kept samples read from shards/ through the selection

    def problems(self) -> list[str]:
        """What types cannot say: ranges and choices, as readable messages (empty when fine)."""
        problems = require(
            (bool(self.model), "train.model must name an open_clip model"),
            (self.steps >= 1, "train.steps must be >= 1"),
            (self.batch_size >= 2, "train.batch_size must be >= 2 (a contrastive loss needs negatives)"),
            (self.lr > 0, "train.lr must be > 0"),
            (self.weight_decay >= 0, "train.weight_decay must be >= 0"),
            (self.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
            (self.precision in {"fp32", "amp"}, f"train.precision must be fp32 or amp, not {self.precision!r}"),
            (self.device in {"auto", "cpu", "cuda"}, f"train.device must be auto, cpu or cuda, not {self.device!r}"),
            (self.masking in {"none", "random", "pgs"}, f"train.masking must be none, random or pgs, not {self.masking!r}"),
            (0 < self.mask_ratio < 1, "train.mask_ratio must be within (0, 1)"),
            (self.checkpoint_every >= 0, "train.checkpoint_every must be >= 0"),
            (self.log_every >= 1, "train.log_every must be >= 1"),
            (self.workers >= 0, "train.workers must be >= 0"),
            (self.shuffle_buffer >= 1, "train.shuffle_buffer must be >= 1"),
            (self.threads >= 1, "train.threads must be >= 1"),
            (self.source in SOURCES, f"train.source must be curated or selection, not {self.source!r}"),
        )
        return problems


SCHEDULES = ("const-cooldown", "cosine")  # the reading start's learning-rate schedules (open_clip_train.scheduler)


@config_section
class ReadingConfig:
    """The reading start (training/reading.py): the image tower pretrained, supervised, to name the
    word written on an image, before any contrastive step; cached by these settings and the model's.

    At CPU scale a tower never learns to read from captions alone (docs/ablation.md), so the CPU
    ablation gives every variant this same start and asks what each policy's data then teaches it.
    """

    steps: int = 7_000  # optimisation steps (batch_size renders each, a fresh draw every step): ~23 min on 2 cores, once
    batch_size: int = 64
    lr: float = 1e-3  # peak learning rate, reached after warmup_steps
    schedule: str = "const-cooldown"  # open_clip's names: "const-cooldown" (warmup-stable-decay) or "cosine"
    cooldown_share: float = 0.2  # const-cooldown: the last share of the steps, over which the rate falls linearly to 0
    weight_decay: float = 0.05
    warmup_steps: int = 50
    seed: int = 0  # model init and the draws; the held-out renders come from seed + 1
    held_out: int = 2000  # unseen renders on which the held-out top-1 is measured (over every word)
    threads: int = 2  # torch threads of the trainer (the driver's)
    workers: int = 1  # processes drawing the words (about 2-4 ms per image each)
    precision: str = "auto"  # "auto": bf16 autocast where the CPU computes bf16 natively, else fp32; "bf16"; "fp32"

    def cooldown_steps(self) -> int:
        """The last steps over which ``const-cooldown`` lowers the rate to 0 (at least one)."""
        return max(1, round(self.steps * self.cooldown_share))

    def problems(self) -> list[str]:
        """What types cannot say: ranges, as readable messages (empty when fine)."""
        return require(
            (self.steps >= 1, "reading.steps must be >= 1"),
            (self.precision in ("auto", "bf16", "fp32"),
             f"reading.precision must be 'auto', 'bf16' or 'fp32', not {self.precision!r}"),
            (self.batch_size >= 2, "reading.batch_size must be >= 2"),
            (self.lr > 0, "reading.lr must be > 0"),
            (self.schedule in SCHEDULES,
             f"reading.schedule must be {' or '.join(map(repr, SCHEDULES))}, not {self.schedule!r}"),
            (0 < self.cooldown_share <= 1, f"reading.cooldown_share must be above 0 and at most 1, not {self.cooldown_share!r}"),
            (self.schedule != "const-cooldown" or self.warmup_steps + self.cooldown_steps() <= self.steps,
             f"reading.warmup_steps ({self.warmup_steps}) and the cooldown (reading.cooldown_share x steps = "
             f"{self.cooldown_steps()} steps) must fit in reading.steps ({self.steps})"),
            (self.weight_decay >= 0, "reading.weight_decay must be >= 0"),
            (0 <= self.warmup_steps < self.steps, "reading.warmup_steps must be >= 0 and below reading.steps"),
            (self.held_out >= 1, "reading.held_out must be >= 1"),
            (self.threads >= 1, "reading.threads must be >= 1"),
            (self.workers >= 0, "reading.workers must be >= 0"),
        )


@config_section
class AblationConfig:
    """`make ablation`: one model per policy and seed, trained on the embedded dataset at equal steps."""

    samples: int = 640  # embedded samples to curate (OCR sets the pace on a CPU: ~1 image/s)
    policies: tuple[str, ...] = ("all", "no-text", "no-parrot", "clip-score-top", "tmars", "no-parrot-tmars")
    seeds: tuple[int, ...] = (0,)  # training seeds (init, data order, masks): every model once per seed
    masking: tuple[str, ...] = ()  # also train the unfiltered policy with patches masked: "random" (FLIP), "pgs"
    start: str = "scratch"  # every variant starts from: "scratch" ([train] pretrained) | "reading" (training/reading.py)
    masking_model: str = ""  # the ViT the masked variants train ("" = [train] model; masking drops ViT patches)
    eval_seed: int = 10_000  # held-out sets: a seed stream apart from the training data's
    eval_per_class: int = 40  # images per class in each labelled eval set
    # The embedded dataset's proportions (sources.embedded.GeneratorSettings; these defaults are its own)
    text_fraction: float = 0.55  # images with text (LAION-2B: 54.6%)
    class_word_fraction: float = 0.5  # of text images, those where one region names another class
    class_word_cap: tuple[float, float] = (0.08, 0.13)  # class-word cap height / shorter side
    parrot_fraction: float = 0.4  # of text images: caption spells the text
    mixed_fraction: float = 0.3  # of text images: caption describes and spells some text
    mixed_quotes_class_word: bool = False  # a mixed caption quotes the class word (else a random region)

    def problems(self) -> list[str]:
        """What types cannot say: ranges and choices, as readable messages (empty when fine)."""
        problems = require(
            (self.samples >= 16, "ablation.samples must be >= 16"),
            (bool(self.policies), "ablation.policies must name at least one policy"),
            (bool(self.seeds), "ablation.seeds must name at least one seed"),
            (len(set(self.seeds)) == len(self.seeds), "ablation.seeds must not repeat a seed"),
            (set(self.masking) <= {"random", "pgs"}, f"ablation.masking may hold random and pgs, not {list(self.masking)}"),
            (self.eval_per_class >= 1, "ablation.eval_per_class must be >= 1"),
            (self.start in STARTS, f"ablation.start must be scratch or reading, not {self.start!r}"),
            (len(self.class_word_cap) == 2, "ablation.class_word_cap must be [low, high]"),
        )
        if len(self.class_word_cap) == 2:
            problems += [f"ablation.{p}" for p in self.generator().problems()]
        return problems

    def generator(self) -> Any:
        """The embedded dataset's ``GeneratorSettings`` from these fields."""
        from sources.embedded import GeneratorSettings

        low, high = self.class_word_cap
        return GeneratorSettings(text_fraction=self.text_fraction, class_word_fraction=self.class_word_fraction,
                                 class_word_cap=(low, high), parrot_fraction=self.parrot_fraction,
                                 mixed_fraction=self.mixed_fraction,
                                 mixed_quotes_class_word=self.mixed_quotes_class_word)
