"""Actor pools sized from what the stages cost (pipeline/sample_runner.size_pools): pure logic,
no Ray and no models, so it runs in well under a second.

The rule under test: on CPU an "auto" pool gets the cluster's cores in proportion to its stage's
cost per image (rounded, at least one replica); on GPU the device is filled one replica at a time
by the stage with the most work per replica, never beyond what exists; fixed counts stay.
"""

from __future__ import annotations

import dataclasses
import tomllib

import pytest

import pipeline  # noqa: F401
from core.errors import ConfigError
from pipeline.config import DEFAULT_CONFIG_PATH, config_from_dict, load_config
from pipeline.dag import SAMPLE_STEPS
from pipeline.sample_runner import AUTO, fit_to_cluster, pool_sizes, size_pools
from stages.base import Resources
from stages.clip_score import ClipConfig, ClipScoreStage
from stages.ocr import OcrConfig, OcrStage


def _replicas(cluster: dict[str, float], **sections: dict) -> dict[str, int]:
    """Auto pool sizes of the shipped config on ``cluster``, with sections overridden. The OCR
    engine is easyocr unless given: the sizing rules are checked at its cost (the heaviest OCR,
    ~8x CLIP); the shipped ppocr-v6 has a test of its own."""
    sections = {**sections, "ocr": {"engine": "easyocr", **sections.get("ocr", {})}}
    config = load_config()
    for name, values in sections.items():
        config = dataclasses.replace(config, **{name: dataclasses.replace(getattr(config, name), **values)})
    return {name: r.replicas for name, r in pool_sizes(config, list(SAMPLE_STEPS), cluster).items()}


def test_defaults_are_auto_and_ocr_costs_most() -> None:
    assert OcrConfig().replicas == ClipConfig().replicas == AUTO
    shipped, clip = OcrStage(OcrConfig()), ClipScoreStage(ClipConfig())
    assert shipped.cost_per_image() > 2 * clip.cost_per_image()  # ppocr-v6 at 512 vs ViT-S-32: 0.14 vs 0.05
    ocr = OcrStage(OcrConfig(engine="easyocr"))
    assert ocr.cost_per_image() > 2 * shipped.cost_per_image()  # measured 0.92 vs 0.14 CPU-s per image
    assert ocr.cost_per_image() > 5 * clip.cost_per_image()  # easyocr (CRAFT int8) at 512 vs ViT-S-32: measured ~8x
    # CRAFT in fp32 (quantize = false) costs about 4.6x int8 (make bench's ocr rows)
    assert (OcrStage(OcrConfig(engine="easyocr", quantize=False)).cost_per_image()
            == pytest.approx(1.88 / 0.41 * ocr.cost_per_image()))
    assert OcrStage(OcrConfig(quantize=False)).cost_per_image() == shipped.cost_per_image()  # easyocr's setting only
    # cost follows the detector's pixels and the CLIP model's size
    assert OcrStage(OcrConfig(detector_size=256)).cost_per_image() == pytest.approx(shipped.cost_per_image() / 4)
    assert ClipScoreStage(ClipConfig(model="ViT-B-32")).cost_per_image() == pytest.approx(4 * clip.cost_per_image())
    assert OcrStage(OcrConfig(engine="rapidocr")).cost_per_image() < ocr.cost_per_image() / 5


def test_two_cores_get_two_ocr_replicas_and_pools_grow_with_the_cluster() -> None:
    """On the 2-core box one OCR actor left a core idle (0.38 img/s, 36% idle): now both cores
    run OCR; on big nodes OCR takes nearly every core and CLIP grows when its share reaches one."""
    assert _replicas({"CPU": 2}) == {"ocr": 2, "parrot": 1, "caption": 1, "clip_score": 1, "dedup": 1}
    assert _replicas({"CPU": 16})["ocr"] == 14
    big = _replicas({"CPU": 64})
    assert big["ocr"] >= 50 and big["clip_score"] >= 5
    # the expensive stage gets the cores, whichever it is
    large_clip = _replicas({"CPU": 16}, clip={"model": "ViT-L-14"})
    assert large_clip["clip_score"] > large_clip["ocr"]
    # two threads per replica: half the replicas; half a CPU still runs one thread: no more replicas
    assert _replicas({"CPU": 16}, ocr={"cpus_per_replica": 2.0})["ocr"] == 7
    assert _replicas({"CPU": 16}, ocr={"cpus_per_replica": 0.5})["ocr"] == 14


def test_shipped_ocr_engine_on_two_and_sixteen_cores() -> None:
    """ppocr-v6 costs ~3x a CLIP replica (0.14 vs 0.05 CPU-s per image): one OCR and one CLIP
    replica on the 2-core box (2 x 0.14 / 0.2 rounds to 1), and about 3:1 on a 16-core node."""
    shipped = {"ocr": {"engine": "ppocr-v6"}}
    assert _replicas({"CPU": 2}, **shipped) == {"ocr": 1, "parrot": 1, "caption": 1, "clip_score": 1, "dedup": 1}
    sixteen = _replicas({"CPU": 16}, **shipped)
    assert (sixteen["ocr"], sixteen["clip_score"]) == (11, 4)


def test_fixed_counts_are_kept() -> None:
    assert _replicas({"CPU": 64}, ocr={"replicas": 3}, clip={"replicas": 1})["ocr"] == 3
    assert _replicas({"CPU": 1})["ocr"] == 1  # at least one replica


def test_gpus_fill_up_and_never_overflow() -> None:
    """Fractional GPU replicas: the GPU left after one replica per GPU stage goes to OCR (it has
    the most work per replica); the pools' GPUs never exceed the cluster's (Ray would wait forever)."""
    declared = {"ocr": Resources(cpus=1.0, gpus=0.25, batch_size=8, replicas=AUTO),
                "clip_score": Resources(cpus=1.0, gpus=0.5, batch_size=32, replicas=AUTO),
                "parrot": Resources(cpus=0.25, batch_size=32, replicas=1)}
    costs = {"ocr": 1.0, "clip_score": 0.05, "parrot": 0.005}
    for gpus in (1, 2, 8):
        sized = size_pools(declared, costs, cluster_cpus=8 * gpus, cluster_gpus=gpus)
        used = sum(r.gpus * r.replicas for r in sized.values())
        assert gpus - 0.25 < used <= gpus + 1e-9
        assert sized["clip_score"].replicas >= 1 and sized["parrot"].replicas == 1
    one = size_pools(declared, costs, cluster_cpus=8, cluster_gpus=1)
    assert (one["ocr"].replicas, one["clip_score"].replicas) == (2, 1)
    # the CPU requests are then scaled to fit the cores (tokens; threads stay per replica)
    assert fit_to_cluster(size_pools(declared, costs, 2, 1), 2) < 1.0


def test_replicas_must_be_a_count_or_auto() -> None:
    data = tomllib.loads(DEFAULT_CONFIG_PATH.read_text())
    data["ocr"]["replicas"] = "many"
    with pytest.raises(ConfigError, match="ocr.replicas must be a count >= 1 or \"auto\""):
        config_from_dict(data)
    assert OcrConfig(replicas=0).problems() and ClipConfig(replicas="x").problems()
    assert not OcrConfig(replicas=4).problems() and not ClipConfig(replicas="auto").problems()
