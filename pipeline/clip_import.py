"""The CLIP step from a pool's own embeddings (``[clip] embeddings_from = "pool"``): no model, no image.

When a URL list brought the pool's embeddings (sources/pool_embeddings.py: DataComp's ``.npz``,
clip-retrieval's ``.npy``), they are in its plan beside each row. For each downloaded shard whose
clip_score part is missing and whose rows have them, the part is written here on the driver from
the plan and the download part alone: ``clip_score`` is the cosine of the pool's image and caption
embeddings (unit vectors, so a dot product), the vectors are kept as the model's would be (the
catalog's ``embeddings`` view), and ``clip_model`` names where they came from. No image is read.

``clip_score_masked`` (T-MARS) needs the image with its text hidden, which no pool ships: it stays
null with the reason in ``clip_error``, so a policy on it drops those rows saying why. Shards
without pool embeddings (another list appended, the embedded dataset) go to the model as usual.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from manifests.catalog import parquet_metadata
from manifests.schemas import schema_for
from manifests.store import RunLayout, write_table_atomic
from pipeline.plan_import import pool_rows
from sources.pool_embeddings import EMBEDDINGS_KEY, IMAGE_EMBEDDING, TEXT_EMBEDDING
from stages.clip_score import ClipConfig

NO_MASKED_SCORE = "embeddings imported from the pool: no text-masked score (T-MARS needs the image)"


def import_clip_parts(layout: RunLayout, config: ClipConfig, shards: list[str]) -> dict[str, int]:
    """Write the clip_score part of each of ``shards`` whose samples the pool has embeddings for;
    returns {shard: samples scored}. Shards it cannot serve are left to the model."""
    if config.embeddings_from != "pool":
        return {}
    done: dict[str, int] = {}
    origins: dict[str, str] = {}
    for found in pool_rows(layout, shards, [IMAGE_EMBEDDING, TEXT_EMBEDDING]):
        if found.plan not in origins:
            origins[found.plan] = parquet_metadata(layout.input_dir / found.plan).get(EMBEDDINGS_KEY, found.plan)
        write_table_atomic(_part(found.uids, found.values, origins[found.plan], config),
                           layout.part_path("clip_score", found.shard))
        done[found.shard] = len(found.uids)
    return done


def _part(uids: pa.ChunkedArray, vectors: pa.Table, origin: str, config: ClipConfig) -> pa.Table:
    """The clip_score part of ``uids`` from their pool vectors (a uid the pool lacks: failed, said why)."""
    schema = schema_for("clip_score")
    index = {u: i for i, u in enumerate(vectors.column("uid").to_pylist())}
    images, texts = vectors.column(IMAGE_EMBEDDING), vectors.column(TEXT_EMBEDDING)
    n = len(uids)
    out: dict[str, list] = {name: [None] * n for name in schema.names}
    out["uid"] = uids.to_pylist()
    for k, uid in enumerate(out["uid"]):
        i = index.get(uid)
        image = None if i is None else images[i].values
        text = None if i is None else texts[i].values
        if image is None or text is None:
            out["clip_status"][k] = "failed"
            out["clip_error"][k] = "the pool ships no embedding for this row"
            continue
        a = image.to_numpy(zero_copy_only=False).astype(np.float32)
        b = text.to_numpy(zero_copy_only=False).astype(np.float32)
        out["clip_status"][k] = "ok"
        out["clip_score"][k] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) or 1.0))
        out["clip_error"][k] = NO_MASKED_SCORE
        out["clip_model"][k] = f"imported: {origin}"
        out["clip_weights_meaningful"][k] = True
        out["clip_precision"][k] = "float16 (pool)"
        if config.keep_embeddings:
            out[IMAGE_EMBEDDING][k] = a.astype(np.float16)
            out[TEXT_EMBEDDING][k] = b.astype(np.float16)
    return pa.table({name: pa.array(out[name], schema.field(name).type) for name in schema.names}, schema=schema)
