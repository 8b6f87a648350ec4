"""Columns keep their meaning between actors of the streaming DAG, on a real local Ray.

Ray hands a column that is all None in one block (Arrow's null type) to the next actor as float32
NaNs. Found by CI: a shard whose images all decoded (decode_error all None) passed on as floats
could no longer be merged with a block where decode_error held text, and the whole run stopped
with ArrowConversionError.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

import pipeline  # noqa: F401
from pipeline.config import load_config
from pipeline.dag import SAMPLE_STEPS
from pipeline.sample_runner import StageActor, decode_batch


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
