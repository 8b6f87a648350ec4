"""Configuration in one typed place.

The defaults live in `pipeline/default.toml`; a user's TOML (``--config``) is merged over them
key by key. Unknown keys and wrong types are errors with the key's dotted name, because a
misspelt option that is silently ignored costs a whole curation run.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

DEFAULT_CONFIG_PATH = Path(__file__).with_name("default.toml")


class ConfigError(ValueError):
    """A configuration or input problem the user must fix; printed as one line, exit code 2."""


@dataclass(frozen=True)
class DownloadConfig:
    """How the download stage calls img2dataset's downloader for each shard."""

    shard_size: int = 64
    thread_count: int = 16
    timeout_s: float = 2.0
    retries: int = 0
    image_size: int = 512
    resize_mode: str = "keep_ratio_largest"
    encode_quality: int = 95
    max_image_pixels: int = 40_000_000
    cpus_per_task: float = 1.0
    # The network guard (pipeline/net_guard.py). URL lists are untrusted input: by default a host
    # that resolves to a loopback, private, link-local (cloud metadata), multicast or reserved
    # address is refused before connecting. allow_networks lets chosen networks through (CIDR).
    allow_networks: tuple[str, ...] = ()
    max_response_bytes: int = 32 * 1024 * 1024  # body cap: declared or streamed beyond it = failed
    request_deadline_s: float = 20.0  # whole request incl. redirects and body (timeout_s is per read)
    max_redirects: int = 5  # each hop is checked like the first request

    def validate(self) -> None:
        _require(self.shard_size >= 1, "download.shard_size must be >= 1")
        _require(self.thread_count >= 1, "download.thread_count must be >= 1")
        _require(self.timeout_s > 0, "download.timeout_s must be > 0")
        _require(self.retries >= 0, "download.retries must be >= 0")
        _require(self.image_size >= 16, "download.image_size must be >= 16")
        _require(
            self.resize_mode in {"no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"},
            f"download.resize_mode {self.resize_mode!r} is not an img2dataset resize mode",
        )
        _require(self.max_image_pixels > 0, "download.max_image_pixels must be > 0")
        _require(self.cpus_per_task > 0, "download.cpus_per_task must be > 0")
        _check_networks(self.allow_networks, "download.allow_networks")
        _require(self.max_response_bytes >= 1024, "download.max_response_bytes must be >= 1024 (bytes)")
        _require(self.request_deadline_s > 0, "download.request_deadline_s must be > 0 (seconds)")
        _require(0 <= self.max_redirects <= 20, "download.max_redirects must be within 0..20")


@dataclass(frozen=True)
class OcrConfig:
    """Text-region detection and recognition (stages/ocr.py, models/ocr.py)."""

    engine: str = "easyocr"  # "easyocr" (CRAFT + english_g2, torch) | "rapidocr" (PP-OCRv4, onnxruntime)
    device: str = "auto"  # "auto" (GPU when torch sees one) | "cpu" | "cuda"
    batch_size: int = 8  # images per process_batch call (one batched detector forward)
    replicas: int = 1  # model actors; each loads the model once
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.25  # used only on GPU; fractional packs replicas on one GPU
    detector_size: int = 512  # longest image side fed to the text detector, pixels
    min_confidence: float = 0.0  # regions recognised below this confidence are dropped
    quantize: bool = True  # easyocr's dynamic int8 quantisation on CPU (recorded as ocr_precision)

    def validate(self) -> None:
        _require(self.engine in {"easyocr", "rapidocr"}, f"ocr.engine must be easyocr or rapidocr, not {self.engine!r}")
        _require(self.device in {"auto", "cpu", "cuda"}, f"ocr.device must be auto, cpu or cuda, not {self.device!r}")
        _require(self.batch_size >= 1, "ocr.batch_size must be >= 1")
        _require(self.replicas >= 1, "ocr.replicas must be >= 1")
        _require(self.cpus_per_replica > 0, "ocr.cpus_per_replica must be > 0")
        _require(0 < self.gpus_per_replica <= 1, "ocr.gpus_per_replica must be in (0, 1]")
        _require(64 <= self.detector_size <= 4096, "ocr.detector_size must be within 64..4096")
        _require(0 <= self.min_confidence <= 1, "ocr.min_confidence must be within 0..1")


@dataclass(frozen=True)
class ParrotConfig:
    """Parrot-caption scoring (stages/parrot.py): how caption words are matched to OCR words."""

    stop_words: str = "english"  # "english" (a fixed built-in list) | "none"
    fuzzy_max_distance: int = 1  # edit distance at which a caption word still counts as spelled
    fuzzy_min_length: int = 4  # words shorter than this must match exactly (short words collide)
    min_word_length: int = 1  # caption words shorter than this are ignored
    parrot_threshold: float = 0.5  # is_parrot when parrot_score >= this

    def validate(self) -> None:
        _require(self.stop_words in {"english", "none"}, "parrot.stop_words must be 'english' or 'none'")
        _require(self.fuzzy_max_distance >= 0, "parrot.fuzzy_max_distance must be >= 0")
        _require(self.fuzzy_min_length >= 1, "parrot.fuzzy_min_length must be >= 1")
        _require(self.min_word_length >= 1, "parrot.min_word_length must be >= 1")
        _require(0 < self.parrot_threshold <= 1, "parrot.parrot_threshold must be within (0, 1]")


@dataclass(frozen=True)
class ClipConfig:
    """CLIP scoring (stages/clip_score.py, models/clip.py) with open_clip."""

    model: str = "ViT-S-32"  # any open_clip model name
    pretrained: str = ""  # "" = random init (scores NOT meaningful); an open_clip tag; or a checkpoint file
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    batch_size: int = 32
    replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.5
    precision: str = "fp32"  # "fp32" | "amp" (autocast fp16/bf16 on GPU)
    seed: int = 0  # seed of the random init, so offline scores are reproducible

    def validate(self) -> None:
        _require(bool(self.model), "clip.model must name an open_clip model")
        _require(self.device in {"auto", "cpu", "cuda"}, f"clip.device must be auto, cpu or cuda, not {self.device!r}")
        _require(self.batch_size >= 1, "clip.batch_size must be >= 1")
        _require(self.replicas >= 1, "clip.replicas must be >= 1")
        _require(self.cpus_per_replica > 0, "clip.cpus_per_replica must be > 0")
        _require(0 < self.gpus_per_replica <= 1, "clip.gpus_per_replica must be in (0, 1]")
        _require(self.precision in {"fp32", "amp"}, "clip.precision must be fp32 or amp")


@dataclass(frozen=True)
class PolicyConfig:
    """A named filter policy: SQL rules over the catalog's ``samples`` view; kept when all hold.

    Each rule is a DuckDB boolean expression evaluated per downloaded sample, and may use window
    functions over the pool (``quantile_cont(x, 0.5) over ()``), so percentile policies stay SQL.
    A rule that evaluates to NULL (a score is missing) counts as failed, with that as the reason.
    """

    name: str
    description: str = ""
    rules: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        _require(bool(self.rules), f"policies.{self.name} needs at least one rule (rules = {{ name = \"sql\" }})")
        for rule, sql in self.rules.items():
            _require(isinstance(sql, str) and sql.strip() != "", f"policies.{self.name}.rules.{rule} must be SQL text")


@dataclass(frozen=True)
class ReshardConfig:
    """Materialising a policy's kept samples as new WebDataset shards."""

    samples_per_shard: int = 64  # DataComp uses 10000; small here so the embedded run has several

    def validate(self) -> None:
        _require(self.samples_per_shard >= 1, "reshard.samples_per_shard must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    """Training a CLIP model on one policy's curated shards (stages/train.py).

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
    cpus: float = 2.0  # CPUs the training task asks for; torch's intra-op threads follow it
    gpus: float = 1.0  # used only on GPU

    def validate(self) -> None:
        _require(bool(self.model), "train.model must name an open_clip model")
        _require(self.steps >= 1, "train.steps must be >= 1")
        _require(self.batch_size >= 2, "train.batch_size must be >= 2 (a contrastive loss needs negatives)")
        _require(self.lr > 0, "train.lr must be > 0")
        _require(self.weight_decay >= 0, "train.weight_decay must be >= 0")
        _require(self.warmup_steps >= 0, "train.warmup_steps must be >= 0")
        _require(self.precision in {"fp32", "amp"}, f"train.precision must be fp32 or amp, not {self.precision!r}")
        _require(self.device in {"auto", "cpu", "cuda"}, f"train.device must be auto, cpu or cuda, not {self.device!r}")
        _require(
            self.masking in {"none", "random", "pgs"},
            f"train.masking must be none, random or pgs, not {self.masking!r}",
        )
        _require(0 < self.mask_ratio < 1, "train.mask_ratio must be within (0, 1)")
        _require(self.checkpoint_every >= 0, "train.checkpoint_every must be >= 0")
        _require(self.log_every >= 1, "train.log_every must be >= 1")
        _require(self.workers >= 0, "train.workers must be >= 0")
        _require(self.shuffle_buffer >= 1, "train.shuffle_buffer must be >= 1")
        _require(self.cpus > 0, "train.cpus must be > 0")
        _require(0 < self.gpus <= 1, "train.gpus must be in (0, 1]")


@dataclass(frozen=True)
class AblationConfig:
    """`make ablation`: one model per policy, trained on the embedded dataset at equal steps."""

    samples: int = 640  # embedded samples to curate (OCR sets the pace on a CPU: ~1 image/s)
    policies: tuple[str, ...] = ("all", "no-text", "no-parrot", "clip-threshold", "tmars", "combined")
    eval_seed: int = 10_000  # held-out sets: a seed stream apart from the training data's
    eval_per_class: int = 40  # images per class in each labelled eval set

    def validate(self) -> None:
        _require(self.samples >= 16, "ablation.samples must be >= 16")
        _require(bool(self.policies), "ablation.policies must name at least one policy")
        _require(self.eval_per_class >= 1, "ablation.eval_per_class must be >= 1")


@dataclass(frozen=True)
class DatasetConfig:
    """A named dataset: the embedded offline generator, or a URL list (path or fsspec URL)."""

    name: str
    description: str = ""
    source: str = "url_list"  # "embedded" | "url_list"
    url_list: str = ""
    url_column: str = "url"
    caption_column: str = "caption"
    samples: int = 320
    seed: int = 0
    port: int = 8710
    policies: tuple[str, ...] = ("all", "no-text", "no-parrot", "clip-threshold", "tmars", "combined")
    # Networks this dataset's URLs may reach despite the download guard, added to
    # download.allow_networks for this dataset only: the embedded dataset is served on 127.0.0.1,
    # an intranet mirror might be on 10.1.0.0/16. Empty for an ordinary web URL list.
    allow_networks: tuple[str, ...] = ()

    def validate(self) -> None:
        _require(
            self.source in {"embedded", "url_list"},
            f"datasets.{self.name}.source must be 'embedded' or 'url_list', not {self.source!r}",
        )
        _check_networks(self.allow_networks, f"datasets.{self.name}.allow_networks")
        if self.source == "embedded":
            _require(self.samples >= 1, f"datasets.{self.name}.samples must be >= 1")
            _require(0 <= self.port < 65536, f"datasets.{self.name}.port must be a TCP port")


@dataclass(frozen=True)
class Config:
    download: DownloadConfig = field(default_factory=DownloadConfig)
    ocr: OcrConfig = field(default_factory=OcrConfig)
    parrot: ParrotConfig = field(default_factory=ParrotConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    reshard: ReshardConfig = field(default_factory=ReshardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    policies: dict[str, PolicyConfig] = field(default_factory=dict)
    datasets: dict[str, DatasetConfig] = field(default_factory=dict)

    def policy(self, name: str) -> PolicyConfig:
        if name not in self.policies:
            raise ConfigError(f"unknown policy {name!r}; known policies: {', '.join(sorted(self.policies))}")
        return self.policies[name]

    def dataset(self, name: str) -> DatasetConfig:
        if name not in self.datasets:
            known = ", ".join(sorted(self.datasets))
            raise ConfigError(f"unknown dataset {name!r}; known datasets: {known}")
        return self.datasets[name]

    def validate(self) -> None:
        self.download.validate()
        self.ocr.validate()
        self.parrot.validate()
        self.clip.validate()
        self.reshard.validate()
        self.train.validate()
        self.ablation.validate()
        for name in self.ablation.policies:
            _require(name in self.policies, f"ablation.policies names unknown policy {name!r}")
        for policy in self.policies.values():
            policy.validate()
        for dataset in self.datasets.values():
            dataset.validate()
            for name in dataset.policies:
                _require(name in self.policies, f"datasets.{dataset.name}.policies names unknown policy {name!r}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_networks(values: tuple[str, ...], key: str) -> None:
    """Every entry must be a CIDR network; one error naming the key and the bad entry."""
    from pipeline.net_guard import parse_network

    if not isinstance(values, (tuple, list)):
        raise ConfigError(f"{key} must be a list of CIDR networks, e.g. [\"127.0.0.1/32\"], got {values!r}")
    for value in values:
        try:
            parse_network(value)
        except ValueError as err:
            raise ConfigError(f"{key}: {err}") from None


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _build(cls: type, values: dict[str, Any], where: str, **fixed: Any) -> Any:
    """Instantiate a config dataclass, refusing unknown keys and wrong scalar types by name."""
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)} - set(fixed)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) in [{where}]: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    kwargs: dict[str, Any] = dict(fixed)
    for key, value in values.items():
        expected = hints[key]
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if expected == tuple[str, ...]:
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ConfigError(f"{where}.{key} must be a list of strings, got {value!r}")
            value = tuple(value)
        if expected == dict[str, str] and not isinstance(value, dict):
            raise ConfigError(f"{where}.{key} must be a table of name = \"sql\", got {value!r}")
        if expected in (int, float, str, bool) and (
            not isinstance(value, expected) or (expected is int and isinstance(value, bool))
        ):
            raise ConfigError(f"{where}.{key} must be {expected.__name__}, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def load_config(path: str | Path | None = None) -> Config:
    """Load the defaults, merge a user's TOML over them, and validate."""
    with open(DEFAULT_CONFIG_PATH, "rb") as f:
        data = tomllib.load(f)
    if path is not None:
        try:
            with open(path, "rb") as f:
                user = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
        data = _merge(data, user)
    unknown_sections = sorted(set(data) - {"download", "ocr", "parrot", "clip", "reshard", "train", "ablation", "policies", "datasets"})
    if unknown_sections:
        raise ConfigError(f"unknown section(s) in config: {', '.join(unknown_sections)}")
    datasets = {
        name: _build(DatasetConfig, values, f"datasets.{name}", name=name)
        for name, values in data.get("datasets", {}).items()
    }
    config = Config(
        download=_build(DownloadConfig, data.get("download", {}), "download"),
        ocr=_build(OcrConfig, data.get("ocr", {}), "ocr"),
        parrot=_build(ParrotConfig, data.get("parrot", {}), "parrot"),
        clip=_build(ClipConfig, data.get("clip", {}), "clip"),
        reshard=_build(ReshardConfig, data.get("reshard", {}), "reshard"),
        train=_build(TrainConfig, data.get("train", {}), "train"),
        ablation=_build(AblationConfig, data.get("ablation", {}), "ablation"),
        policies={
            name: _build(PolicyConfig, values, f"policies.{name}", name=name)
            for name, values in data.get("policies", {}).items()
        },
        datasets=datasets,
    )
    config.validate()
    return config
