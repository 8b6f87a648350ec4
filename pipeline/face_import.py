"""The faces step from a pool's own face boxes: no detector, no image.

A DataComp pool lists every sample's faces (``face_bboxes``, DataComp's own detector, the boxes its
resharder blurs), kept in the run's plan as the source column ``source_face_bboxes``
(``sources.SOURCE_RENAMES``: the faces step writes ``face_bboxes`` itself). For each downloaded
shard whose faces part is missing and whose list brought the column, the part is written here on
the driver from the plan and the download part alone (as ``pipeline/clip_import.py`` does for a
pool's embeddings): ``face_bboxes`` are the pool's, ``face_source = "pool"``. No image is read and
MTCNN does not load. A row whose pool value is null is a failed row saying so; shards of a list
without the column (another list appended, the embedded dataset) go to the detector as usual.
"""

from __future__ import annotations

import json

import pyarrow as pa

from manifests.schemas import schema_for
from manifests.store import RunLayout, write_table_atomic
from pipeline.plan_import import pool_rows
from stages.faces import POOL_SOURCE, FaceConfig

POOL_BOXES = "source_face_bboxes"  # sources.SOURCE_RENAMES["face_bboxes"]
NO_POOL_BOXES = "the pool lists no face_bboxes for this row"


def import_face_parts(layout: RunLayout, config: FaceConfig, shards: list[str]) -> dict[str, int]:
    """Write the faces part of each of ``shards`` whose list brought face boxes; returns {shard:
    samples}. Shards it cannot serve are left to the detector."""
    if not config.enabled:
        return {}
    done: dict[str, int] = {}
    for found in pool_rows(layout, shards, [POOL_BOXES]):
        write_table_atomic(_part(found.uids, found.values), layout.part_path("faces", found.shard))
        done[found.shard] = len(found.uids)
    return done


def _boxes(value: object) -> list[list[float]]:
    """A pool's face_bboxes value as boxes of four floats (text, as a CSV list holds it, is read as
    JSON); ValueError naming what is wrong with it, which becomes the row's face_error."""
    if value is None:
        raise ValueError(NO_POOL_BOXES)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError(f"the pool's face_bboxes is not a list of boxes: {value[:80]!r}") from None
    try:
        boxes = [[float(v) for v in box] for box in value]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"the pool's face_bboxes is not a list of boxes: {str(value)[:80]!r}") from None
    if any(len(box) != 4 for box in boxes):
        raise ValueError(f"the pool's face_bboxes has a box without 4 numbers: {str(value)[:80]!r}")
    return boxes


def _part(uids: pa.ChunkedArray, boxes: pa.Table) -> pa.Table:
    """The faces part of ``uids`` from the pool's boxes (a row the pool gives none: failed, said why)."""
    schema = schema_for("faces")
    index = {u: i for i, u in enumerate(boxes.column("uid").to_pylist())}
    values = boxes.column(POOL_BOXES).to_pylist()
    n = len(uids)
    out: dict[str, list] = {name: [None] * n for name in schema.names}
    out["uid"] = uids.to_pylist()
    for k, uid in enumerate(out["uid"]):
        i = index.get(uid)
        out["face_source"][k] = POOL_SOURCE
        out["face_engine"][k] = f"imported: the list's {POOL_BOXES}"
        try:
            found = _boxes(None if i is None else values[i])
        except ValueError as err:
            out["face_status"][k] = "failed"
            out["face_error"][k] = str(err)
            continue
        out["face_status"][k] = "ok"
        out["face_bboxes"][k] = found
        out["n_faces"][k] = len(found)
    return pa.table({name: pa.array(out[name], schema.field(name).type) for name in schema.names}, schema=schema)
