"""Embeddings a pool ships beside its metadata, read row-aligned with the URL list (issue 24 item 5).

A pool that paid for CLIP embeddings publishes them: DataComp an ``.npz`` beside each metadata
parquet (``b32_img``, ``b32_txt``, ``l14_img``, ``l14_txt``; row i is the parquet's row i),
clip-retrieval ``img_emb/img_emb_<n>.npy`` and ``text_emb/text_emb_<n>.npy`` beside
``metadata/metadata_<n>.parquet``. Offline there are no real CLIP weights to compute them again,
and online it would decode every image again: so they are carried into the run with each row
(two columns of the plan, float16 unit vectors) and the CLIP step imports them instead of running
the model (``[clip] embeddings_from = "pool"``, pipeline/clip_import.py).

Which layout a dataset has is its config's ``embeddings`` ("" none, "npz", "clip-retrieval"); a
listed file that is absent means the pool has none (the CLIP step computes), a file that is there
but does not fit the list (other row count, missing key, not 2-d) stops the run with one line.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa

from core.errors import ConfigError

LAYOUTS = ("", "npz", "clip-retrieval")
IMAGE_EMBEDDING, TEXT_EMBEDDING = "image_embedding", "text_embedding"  # the plan's columns (and clip_score's)
EMBEDDINGS_KEY = "imported_embeddings"  # a plan file's footer key: where its embeddings came from


@dataclass(frozen=True)
class PoolEmbeddings:
    """A list's embeddings as loaded: unit vectors, float16, one row per list row."""

    image: np.ndarray
    text: np.ndarray
    origin: str  # e.g. "datacomp npz l14 (pool.npz)": what clip_model says for imported rows

    def columns(self) -> dict[str, pa.Array]:
        return {IMAGE_EMBEDDING: _as_lists(self.image), TEXT_EMBEDDING: _as_lists(self.text)}


def embedding_files(list_path: str, layout: str, model: str) -> tuple[str, str] | None:
    """Where a list's image and text embeddings are for ``layout`` (None: the layout names none)."""
    if layout == "npz":
        stem = re.sub(r"\.(parquet|pq)$", "", list_path)
        return f"{stem}.npz", f"{stem}.npz"
    if layout == "clip-retrieval":
        match = re.search(r"(.*)/metadata/metadata_(\w+)\.parquet$", list_path)
        if match is None:
            raise ConfigError(f"URL list {list_path}: a clip-retrieval list is metadata/metadata_<n>.parquet, "
                              "with img_emb/img_emb_<n>.npy and text_emb/text_emb_<n>.npy beside metadata/")
        root, n = match.groups()
        return f"{root}/img_emb/img_emb_{n}.npy", f"{root}/text_emb/text_emb_{n}.npy"
    return None


def load_pool_embeddings(list_path: str, layout: str, model: str, rows: int) -> PoolEmbeddings | None:
    """The list's embeddings, or None when the pool ships none where ``layout`` says they would be."""
    files = embedding_files(list_path, layout, model)
    if files is None:
        return None
    image_file, text_file = files
    fs, _ = fsspec.core.url_to_fs(image_file)
    if not fs.exists(image_file):
        return None
    if layout == "npz":
        with fsspec.open(image_file, "rb") as f:
            arrays = np.load(io.BytesIO(f.read()))
            keys = {k: f"{model}_{k}" for k in ("img", "txt")}
            missing = [v for v in keys.values() if v not in arrays.files]
            if missing:
                raise ConfigError(f"{image_file}: has no {', '.join(missing)} (it has {', '.join(arrays.files)}); "
                                  f"set [datasets.<name>] embeddings_model to one of its models")
            image, text = arrays[keys["img"]], arrays[keys["txt"]]
        origin = f"datacomp npz {model} ({image_file.rsplit('/', 1)[-1]})"
    else:
        image, text = _npy(image_file), _npy(text_file)
        origin = f"clip-retrieval npy ({image_file.rsplit('/', 1)[-1]}, {text_file.rsplit('/', 1)[-1]})"
    for name, array in (("image", image), ("text", text)):
        if array.ndim != 2 or array.shape[0] != rows:
            raise ConfigError(f"{image_file if name == 'image' else text_file}: {name} embeddings of shape "
                              f"{array.shape}, but the list has {rows} rows: they must be row-aligned, one per row")
    return PoolEmbeddings(_unit_half(image), _unit_half(text), origin)


def _npy(path: str) -> np.ndarray:
    try:
        with fsspec.open(path, "rb") as f:
            return np.load(io.BytesIO(f.read()))
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (clip-retrieval writes image and text embeddings side by side)") from None


def _unit_half(vectors: np.ndarray) -> np.ndarray:
    """L2-normalised (as the pool meant them: DataComp's are already) and float16, as the CLIP step keeps its own."""
    as_float = vectors.astype(np.float32)
    norms = np.linalg.norm(as_float, axis=1, keepdims=True)
    return (as_float / np.where(norms > 0, norms, 1)).astype(np.float16)


def _as_lists(vectors: np.ndarray) -> pa.Array:
    """(n, d) float16 as Arrow list<halffloat>: the clip_score part's type."""
    n, d = vectors.shape
    flat = pa.array(np.ascontiguousarray(vectors).reshape(-1), pa.float16())
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, flat)
