"""The run's configuration: TOML loaded into the sections the stages own.

Each section is a frozen dataclass beside the code it configures (``DownloadConfig`` in
``stages/download.py``, ...; training's ``[train]``, ``[ablation]`` and ``[reading]`` in ``pipeline/training_config.py``,
because training/ imports pipeline/, never the reverse): its field defaults are the only place a
default is stated. ``pipeline/default.toml`` documents every key with the same values (a test checks
they agree) and holds what only TOML states: the shipped policies and datasets. A user's TOML
(``--config``) is merged over it key by key.

Loading is pydantic in strict mode over the composed :class:`Config`: an unknown key or section,
a wrong type (``"ten"`` for an int, ``3`` where a table belongs) is reported by its dotted key,
and every problem of a file is listed at once, in one line (exit code 2 at the CLI), because a
misspelt option that is silently ignored costs a whole curation run.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import field
from pathlib import Path
from typing import Any, get_type_hints

from pydantic import TypeAdapter, ValidationError

from core.errors import ConfigError
from core.settings import STRICT, require
from sources import DatasetConfig
from stages.caption import CaptionConfig
from stages.clip_score import ClipConfig
from stages.dedup import DedupConfig
from stages.decontaminate import DecontaminateConfig
from stages.download import DownloadConfig
from stages.faces import FaceConfig
from stages.filter import PolicyConfig
from stages.ocr import OcrConfig
from stages.parrot import ParrotConfig
from stages.reshard import ReshardConfig
from pipeline.training_config import AblationConfig, ReadingConfig, TrainConfig
from pipeline.watchdog import WatchdogConfig

DEFAULT_CONFIG_PATH = Path(__file__).with_name("default.toml")

__all__ = [
    "AblationConfig", "CaptionConfig", "ClipConfig", "Config", "ConfigError", "DatasetConfig", "DecontaminateConfig", "DedupConfig", "DownloadConfig", "FaceConfig",
    "OcrConfig", "ParrotConfig", "PolicyConfig", "ReadingConfig", "ReshardConfig", "TrainConfig", "WatchdogConfig", "load_config",
]


@dataclasses.dataclass(frozen=True)
class Config:
    """Every section of a run's configuration; one attribute per TOML section."""

    __pydantic_config__ = STRICT

    download: DownloadConfig = field(default_factory=DownloadConfig)
    ocr: OcrConfig = field(default_factory=OcrConfig)
    parrot: ParrotConfig = field(default_factory=ParrotConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    decontaminate: DecontaminateConfig = field(default_factory=DecontaminateConfig)
    faces: FaceConfig = field(default_factory=FaceConfig)
    reshard: ReshardConfig = field(default_factory=ReshardConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    reading: ReadingConfig = field(default_factory=ReadingConfig)
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

    def problems(self) -> list[str]:
        """Every section's problems, then the references between sections."""
        problems: list[str] = []
        for section in (self.download, self.ocr, self.parrot, self.caption, self.clip, self.dedup, self.decontaminate, self.faces, self.reshard, self.watchdog, self.train,
                        self.ablation, self.reading, *self.policies.values(), *self.datasets.values()):
            problems += section.problems()
        problems += require(
            (self.faces.enabled or not self.reshard.blur_faces,
             "reshard.blur_faces = true needs the face boxes: set [faces] enabled = true"),
            *((name in self.policies, f"ablation.policies names unknown policy {name!r}") for name in self.ablation.policies),
            *((name in self.policies, f"datasets.{d.name}.policies names unknown policy {name!r}")
              for d in self.datasets.values() for name in d.policies),
        )
        return problems

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError("; ".join(problems))


_ADAPTER = TypeAdapter(Config)
_KINDS = {
    "int_type": "int", "float_type": "float", "string_type": "str", "bool_type": "bool",
    "tuple_type": "a list of strings", "list_type": "a list of strings",
    "dataclass_type": "a table", "dict_type": "a table", "model_type": "a table",
}


def _section_type(loc: tuple[Any, ...]) -> Any:
    """The dataclass that holds the key at ``loc`` (None when it is not a dataclass)."""
    current: Any = Config
    for part in loc:
        hints = get_type_hints(current) if dataclasses.is_dataclass(current) else {}
        if part in hints:
            current = hints[part]
        elif getattr(current, "__origin__", None) is dict:
            current = current.__args__[1]
        else:
            return None
    return current if dataclasses.is_dataclass(current) else None


def _describe(error: dict[str, Any]) -> str:
    """One pydantic error as a sentence that names the dotted key."""
    loc = tuple(error["loc"])
    key = ".".join(str(p) for p in loc)
    kind = error["type"]
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        parent = _section_type(loc[:-1])
        known = sorted(f.name for f in dataclasses.fields(parent) if f.name != "name") if parent else []
        where = "section" if len(loc) == 1 else "key"
        return f"unknown {where} {key!r}" + (f" (known: {', '.join(known)})" if known else "")
    if kind == "missing":
        return f"{key} is required"
    if kind in _KINDS:
        return f"{key} must be {_KINDS[kind]}, got {error.get('input')!r}"
    return f"{key}: {error['msg']}"


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _named(data: dict[str, Any]) -> dict[str, Any]:
    """Policies and datasets know their own names: the table key becomes the ``name`` field."""
    out = dict(data)
    for section in ("policies", "datasets"):
        tables = out.get(section)
        if isinstance(tables, dict):
            out[section] = {n: ({**v, "name": n} if isinstance(v, dict) else v) for n, v in tables.items()}
    return out


def config_from_dict(data: dict[str, Any]) -> Config:
    """Validate a merged TOML document; one ConfigError listing every problem."""
    try:
        config = _ADAPTER.validate_json(json.dumps(_named(data), default=str))
    except ValidationError as err:
        raise ConfigError("; ".join(_describe(e) for e in err.errors())) from None
    config.validate()
    return config


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
    return config_from_dict(data)
