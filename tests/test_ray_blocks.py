"""Columns keep their meaning between actors of the streaming DAG, on a real local Ray.

Ray hands a column that is all None in one block (Arrow's null type) to the next actor as float32
NaNs. Found by CI: a shard whose images all decoded (decode_error all None) passed on as floats
could no longer be merged with a block where decode_error held text, and the whole run stopped
with ArrowConversionError.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image

import pipeline  # noqa: F401
from pipeline.config import load_config
from pipeline.dag import SAMPLE_STEPS
from pipeline.sample_runner import StageActor, _stage_table, decode_batch, pools
from stages.base import Resources


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def test_a_block_without_decode_errors_merges_with_one_that_has_them(ray_local):
    dedup = next(s for s in SAMPLE_STEPS if s.name == "dedup")
    # two blocks of four: the first decodes cleanly (decode_error all None), the second has a corrupt image
    items = [{"uid": f"u{i}", "jpg": _jpeg(i)} for i in range(7)] + [{"uid": "u7", "jpg": b"not a jpeg"}]
    ds = ray_local.data.from_items(items, override_num_blocks=2)
    ds = ds.map_batches(decode_batch, batch_size=4)
    ds = ds.map_batches(StageActor, fn_constructor_args=(dedup, load_config(), False), batch_size=4,
                        compute=ray_local.data.ActorPoolStrategy(size=1))
    # a batch spanning both blocks: Ray concatenates them, which needs one type per column
    ds = ds.map_batches(lambda batch: batch, batch_size=8, batch_format="pyarrow")
    rows = sorted(ds.take_all(), key=lambda r: r["uid"])

    assert [r["decode_error"] for r in rows[:7]] == [None] * 7
    assert rows[7]["decode_error"].startswith("decode failed")
    # the stage read None, not NaN, for the images that decoded: no reason invented for them
    reasons = {r["uid"]: r.get("dedup_error") for r in rows}
    assert reasons["u7"] and "decode failed" in reasons["u7"]
    assert all(reasons[f"u{i}"] is None for i in range(7)), reasons


def test_a_block_of_embeddings_merges_with_one_holding_a_failed_row(ray_local):
    """CLIP's embeddings are vectors, or None for a failed row: a block whose rows all scored and
    one with a failed row must concatenate downstream (dedup takes both in one bundle)."""
    import dataclasses

    clip = next(s for s in SAMPLE_STEPS if s.name == "clip_score")
    config = load_config()
    config = dataclasses.replace(config, clip=dataclasses.replace(config.clip, model="curation-tiny", device="cpu"))
    items = [{"uid": f"u{i}", "jpg": _jpeg(i), "caption": f"photo {i}", "ocr_status": "ok"} for i in range(7)]
    items += [{"uid": "u7", "jpg": b"not a jpeg", "caption": "broken", "ocr_status": "failed"}]
    ds = ray_local.data.from_items(items, override_num_blocks=2)
    ds = ds.map_batches(decode_batch, batch_size=4)
    ds = ds.map_batches(StageActor, fn_constructor_args=(clip, config, False), batch_size=4,
                        compute=ray_local.data.ActorPoolStrategy(size=1))
    ds = ds.map_batches(lambda batch: batch, batch_size=8, batch_format="pyarrow")
    rows = sorted(ds.take_all(), key=lambda r: r["uid"])
    assert [r["clip_status"] for r in rows] == ["ok"] * 7 + ["failed"]
    assert rows[7]["image_embedding"] is None
    assert all(len(r["image_embedding"]) == len(rows[0]["text_embedding"]) > 0 for r in rows[:7])


def test_a_light_stage_in_the_actor_before_it_gives_the_rows_of_its_own_pool(ray_local):
    """dedup riding in CLIP's actor (the stage's output handed over in memory) gives the rows it
    gives in a pool of its own (through Ray's conversions), a failed row included."""
    import dataclasses

    clip, dedup = (next(s for s in SAMPLE_STEPS if s.name == name) for name in ("clip_score", "dedup"))
    config = load_config()
    config = dataclasses.replace(config, clip=dataclasses.replace(config.clip, model="curation-tiny", device="cpu"))
    items = [{"uid": f"u{i}", "jpg": _jpeg(i), "caption": f"photo {i}", "ocr_status": "ok"} for i in range(7)]
    items += [{"uid": "u7", "jpg": b"not a jpeg", "caption": "broken", "ocr_status": "failed"}]

    def run(chains: list[tuple]) -> list[dict]:
        ds = ray_local.data.from_items(items, override_num_blocks=2).map_batches(decode_batch, batch_size=4)
        for k, chain in enumerate(chains):
            ds = ds.map_batches(StageActor, fn_constructor_args=(chain, config, k < len(chains) - 1), batch_size=4,
                                compute=ray_local.data.ActorPoolStrategy(size=1))
        ds = ds.map_batches(lambda batch: batch, batch_size=8, batch_format="pyarrow")
        return sorted(ds.take_all(), key=lambda r: r["uid"])

    together, apart = run([(clip, dedup)]), run([(clip,), (dedup,)])
    assert "image" not in together[0]
    assert [r["dedup_status"] for r in together] == ["ok"] * 7 + ["failed"]
    assert all(len(r["image_embedding"]) > 0 for r in together[:7]) and together[7]["image_embedding"] is None
    # in its own pool the failed row's clip_score came through Ray's conversions as NaN; the
    # driver's parts (what the manifests hold) are the same either way, the score a null
    parts = [{s.stage.name: _stage_table(pa.Table.from_pylist(rows), s.stage) for s in (clip, dedup)}
             for rows in (together, apart)]
    for name in ("clip_score", "dedup"):
        assert parts[0][name].equals(parts[1][name]), name
    assert parts[1]["clip_score"].column("clip_score").null_count == 1


def test_light_stages_ride_along_only_after_a_cpu_stage():
    steps = {s.name: s for s in SAMPLE_STEPS}
    cpu = {name: Resources(cpus=1.0) for name in steps}
    names = ["ocr", "parrot", "caption", "clip_score", "dedup"]
    chains = pools([steps[n] for n in names], cpu)
    assert [[s.name for s in chain] for chain in chains] == [["ocr", "parrot"], ["caption"], ["clip_score", "dedup"]]
    on_gpu = {**cpu, "ocr": Resources(cpus=1.0, gpus=0.5), "clip_score": Resources(cpus=1.0, gpus=0.5)}
    assert [[s.name for s in chain] for chain in pools([steps[n] for n in names], on_gpu)] == [[n] for n in names]
    # a rerun of parrot alone: nothing before it to ride in
    assert [[s.name for s in chain] for chain in pools([steps["parrot"]], cpu)] == [["parrot"]]


def test_read_shards_hands_on_a_shards_rows_decoded_a_batch_at_a_time(tmp_path):
    """One read operator reads the tar and decodes: rows in the tar's order, DECODE_BATCH at a
    time, a corrupt image a row with its reason, a done stage's columns joined (None for a uid its
    part lacks), and no tar opened when no stage reads pixels."""
    import json
    import tarfile

    import pyarrow.parquet as pq

    from pipeline.sample_runner import DECODE_BATCH, read_shards

    keys = [f"{k:09d}" for k in range(DECODE_BATCH + 5)]
    pq.write_table(pa.table({"uid": [f"u{k}" for k in range(len(keys))] + ["gone"], "key": keys + [None],
                             "caption": [f"c{k}" for k in range(len(keys))] + ["x"],
                             "status": ["ok"] * len(keys) + ["failed"]}), tmp_path / "download.parquet")
    pq.write_table(pa.table({"uid": ["u0", "u2"], "ocr_text": ["STOP", "SALE"]}), tmp_path / "ocr.parquet")
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for k, key in enumerate(keys):
            data = b"not a jpeg" if k == 3 else _jpeg(k)
            member = tarfile.TarInfo(f"{key}.jpg")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    item = {"shard": "000000", "download_part": str(tmp_path / "download.parquet"), "tar": str(tmp_path / "shard.tar"),
            "parts": [[str(tmp_path / "ocr.parquet"), ["ocr_text"]]]}
    batches = list(read_shards({"item": np.array([json.dumps(item)])}))
    assert [len(b["uid"]) for b in batches] == [DECODE_BATCH, 5]
    rows = [dict(zip(b, values)) for b in batches for values in zip(*b.values())]
    assert [r["key"] for r in rows] == keys and "jpg" not in rows[0]
    assert rows[0]["image"].shape == (32, 32, 3) and rows[0]["decode_error"] is None
    assert rows[3]["image"].size == 0 and rows[3]["decode_error"].startswith("decode failed")
    assert [r["ocr_text"] for r in rows[:3]] == ["STOP", None, "SALE"]
    # a run whose stages read no pixels: the same rows, no tar opened, nothing decoded
    texts = list(read_shards({"item": np.array([json.dumps({**item, "tar": None})])}))
    assert sum(len(b["uid"]) for b in texts) == len(keys) and "image" not in texts[0] and "jpg" not in texts[0]


def test_reading_takes_the_tasks_its_pace_needs_one_on_a_small_machine():
    import dataclasses

    from pipeline.dag import step
    from pipeline.sample_runner import pool_sizes, read_tasks

    config, steps = load_config(), [step(n) for n in ("ocr", "parrot", "clip_score")]
    assert read_tasks(config, steps, pool_sizes(config, steps, {"CPU": 2})) == 1  # each task more: a process importing Ray Data
    assert 1 < read_tasks(config, steps, pool_sizes(config, steps, {"CPU": 64})) < 64  # keeps up with 44 OCR replicas
    on_gpu = dataclasses.replace(config, ocr=dataclasses.replace(config.ocr, engine="easyocr", device="cuda"))
    sized = pool_sizes(on_gpu, steps, {"CPU": 16, "GPU": 1})
    assert sized["ocr"].gpus > 0 and read_tasks(on_gpu, steps, sized) is None  # a GPU pool's pace: not in the CPU costs
