"""The pyarrow schema of every manifest, in one module, with a version.

Later stages add columns keyed by ``uid``; they never rewrite an earlier stage's columns. Column
names are unique across stages (provenance columns carry the stage's prefix) so that the catalog's
``samples`` view can join every stage on ``uid`` without clashes.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1"

# The URL list as planned: the run's frozen input, so reruns see the same samples in the same shards.
INPUT = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("input_row", pa.int64(), nullable=False),
    ]
)

# A retry's plan (``curate --retry``): failed rows planned again, each with the attempt it will be.
RETRY_INPUT = pa.schema([*INPUT, pa.field("attempt", pa.int32(), nullable=False)])

DOWNLOAD = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("status", pa.string(), nullable=False),  # "ok" | "failed"
        pa.field("error_kind", pa.string()),  # short reason class, null when ok
        pa.field("error", pa.string()),  # the downloader's or decoder's message, null when ok
        pa.field("shard", pa.string(), nullable=False),
        pa.field("key", pa.string()),  # WebDataset __key__ inside shards/<shard>.tar
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("sha256", pa.string()),  # of the downloaded bytes
        pa.field("download_engine", pa.string()),  # e.g. "img2dataset 1.47.0"
        pa.field("downloaded_at", pa.timestamp("s", tz="UTC")),
        # 1 for a uid's first fetch, n+1 for its n-th retry (``curate --retry``): a uid has one row
        # per attempt; the catalog's ``download`` view shows the latest, ``download_history`` all.
        # NULL (a part written before retries existed) reads as 1.
        pa.field("attempt", pa.int32()),
    ]
)

# A text region's quad: 4 points clockwise from top-left, each [x, y] in pixels of the stored image.
QUAD = pa.list_(pa.list_(pa.float32(), 2), 4)

OCR = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("ocr_status", pa.string(), nullable=False),  # "ok" | "failed" (decode or model error)
        pa.field("ocr_error", pa.string()),
        pa.field("n_regions", pa.int32()),
        pa.field("text_area_ratio", pa.float32()),  # area of the union of text quads / image area
        pa.field("quads", pa.list_(QUAD)),  # one per region
        pa.field("texts", pa.list_(pa.string())),  # recognised text per region
        pa.field("confidences", pa.list_(pa.float32())),  # recognition confidence per region
        pa.field("ocr_text", pa.string()),  # texts joined by " ", for search and parrot scoring
        pa.field("ocr_engine", pa.string()),  # e.g. "easyocr 1.7.2 craft+english_g2"
        pa.field("ocr_device", pa.string()),  # "cpu" | "cuda:0"
        pa.field("ocr_precision", pa.string()),  # "int8-dynamic" | "fp32" | "fp16"
        pa.field("ocr_detector_size", pa.int32()),  # longest side fed to the detector
    ]
)

PARROT = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("parrot_status", pa.string(), nullable=False),  # "ok" | "failed"
        pa.field("caption_words", pa.list_(pa.string())),  # cleaned, normalised caption words (stop words per config)
        pa.field("parroted_words", pa.list_(pa.string())),  # caption words spelled in the image (exact, misread or merged)
        pa.field("n_caption_words", pa.int32()),
        pa.field("parrot_score", pa.float32()),  # share of caption_words spelled (fuzzy); 0 without text
        pa.field("parrot_score_exact", pa.float32()),  # same, exact word matches only
        pa.field("is_parrot", pa.bool_()),  # parrot_score >= parrot.parrot_threshold
        pa.field("cotr", pa.float32()),  # the paper's CoTR: distinct caption words found as OCR words / all of them, no stop words removed
        pa.field("cotr_fuzzy", pa.float32()),  # the paper's fuzzy CoTR, with this stage's matcher (misreads, merged tokens)
        pa.field("parrot_params", pa.string()),  # the cleaning/normalisation/matching parameters used, as JSON
    ]
)

# The caption's language and length (stages/caption.py): what DataComp's basic filter reads.
CAPTION = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("caption_status", pa.string(), nullable=False),  # "ok" | "failed" (the language model raised)
        pa.field("caption_error", pa.string()),
        pa.field("caption_lang", pa.string()),  # ISO 639 code of the most likely language; null for an empty caption
        pa.field("caption_lang_score", pa.float32()),  # the model's probability of caption_lang; 0 when null
        pa.field("caption_n_words", pa.int32()),  # len(caption.split()): Python's whitespace split, as DataComp
        pa.field("caption_n_chars", pa.int32()),  # len(caption): code points, nothing stripped, as DataComp
        pa.field("caption_lang_engine", pa.string()),  # e.g. "lingua-language-detector 2.1.1 high-accuracy spoken-languages"
    ]
)

CLIP_SCORE = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("clip_status", pa.string(), nullable=False),  # "ok" | "failed"
        pa.field("clip_error", pa.string()),
        pa.field("clip_score", pa.float32()),  # cosine(image embedding, caption embedding)
        pa.field("clip_score_masked", pa.float32()),  # same, every detected text region filled (T-MARS)
        pa.field("clip_n_masked", pa.int32()),  # text regions masked
        pa.field("clip_model", pa.string()),  # model name + pretrained tag or checkpoint file + sha256 prefix
        pa.field("clip_weights_meaningful", pa.bool_()),  # False for randomly initialised weights
        pa.field("clip_device", pa.string()),
        pa.field("clip_precision", pa.string()),
        # The embeddings the score is the cosine of (the plain image's, not the text-masked one's),
        # L2-normalised, float16; null when the row failed or clip.keep_embeddings is off. A list,
        # not a fixed-size list: the dimension is the model's. The catalog keeps them out of
        # ``clip_score`` and ``samples`` and shows them as FLOAT[d] in its ``embeddings`` view.
        pa.field("image_embedding", pa.list_(pa.float16())),
        pa.field("text_embedding", pa.list_(pa.float16())),
    ]
)
EMBEDDING_COLUMNS = ("image_embedding", "text_embedding")  # of CLIP_SCORE: the catalog's ``embeddings`` view

DEDUP = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("dedup_status", pa.string(), nullable=False),  # "ok" | "failed" (no image)
        pa.field("dedup_error", pa.string()),
        pa.field("phash", pa.int64()),  # 64-bit DCT perceptual hash, the bits as a signed int64
    ]
)

# A face box: [x1, y1, x2, y2] as fractions of the image's width and height (DataComp's face_bboxes).
FACE_BOX = pa.list_(pa.float64())

FACES = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("face_status", pa.string(), nullable=False),  # "ok" | "failed" (decode or model error, or no pool boxes)
        pa.field("face_error", pa.string()),
        pa.field("face_bboxes", pa.list_(FACE_BOX)),  # one per face, largest first (detector) or as the pool lists them
        pa.field("n_faces", pa.int32()),
        pa.field("face_source", pa.string()),  # "mtcnn" (detected here) | "pool" (the list's source_face_bboxes)
        pa.field("face_engine", pa.string()),  # e.g. "facenet-pytorch 2.6.0 mtcnn min_face=20px conf>=0.9"
        pa.field("face_device", pa.string()),  # "cpu" | "cuda:0" | null (pool)
    ]
)

# manifests/dup_group/part-pool.parquet: one row per downloaded-ok sample, computed over the whole pool
# (stages/dedup.py). Three tiers, each with its group (the smallest uid of the group; the sample's own uid when
# alone; null when the tier has nothing to compare: no bytes, no pHash, no embedding, or the tier is off), the
# group's size, and whether the sample is the one of its group a dedup keeps ([dedup] keeper: the largest original
# image by default, ties to the smaller uid).
DUP_GROUP = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        # perceptual tier: pHash within [dedup] radius bits (or the same bytes), chained
        pa.field("dup_group", pa.string()),
        pa.field("dup_group_size", pa.int32()),
        pa.field("dup_keeper", pa.bool_()),
        # exact tier: the same downloaded bytes (sha256)
        pa.field("dup_exact_group", pa.string()),
        pa.field("dup_exact_size", pa.int32()),
        pa.field("dup_exact_keeper", pa.bool_()),
        # semantic tier: image-embedding cosine >= 1 - [dedup] semantic_eps within a k-means cluster (SemDeDup)
        pa.field("dup_semantic_group", pa.string()),
        pa.field("dup_semantic_size", pa.int32()),
        pa.field("dup_semantic_keeper", pa.bool_()),
        pa.field("dup_centroid_cosine", pa.float32()),  # cosine to its k-means centroid (NeMo's hard / easy keepers)
        pa.field("dup_embedding_model", pa.string()),  # the model whose embeddings the semantic tier compared
    ]
)

# manifests/decontaminate/part-pool.parquet: one row per downloaded-ok sample (stages/decontaminate.py): its best
# match among the evaluation images of [decontaminate] eval_sets, or null. tier "exact" (same bytes; distance 0),
# "phash" (Hamming bits), "semantic" (1 - image-embedding cosine); exact before phash before semantic, then nearest.
EVAL_MATCH = pa.struct([("set", pa.string()), ("image", pa.string()), ("tier", pa.string()), ("distance", pa.float64())])
DECONTAMINATE = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("eval_match", EVAL_MATCH),
    ]
)

# selections/<policy>.parquet: the decision, one row per downloaded-ok sample (DataComp: decide, then materialise).
# The uid is its 16 bytes here (``manifests.uids``: a file per policy of every sample); the catalog's
# selection views and ``manifests.uids.read_selection`` give it back as text.
SELECTION = pa.schema(
    [
        pa.field("uid", pa.binary(16), nullable=False),
        pa.field("policy", pa.string(), nullable=False),
        pa.field("kept", pa.bool_(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),  # why kept or dropped, readable
    ]
)

# curated/<policy>/manifest.parquet: lineage of the resharded samples, uid -> new shard/key
CURATED = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("policy", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),  # new shard name, curated/<policy>/<shard>.tar
        pa.field("key", pa.string(), nullable=False),  # new __key__
        pa.field("source_shard", pa.string(), nullable=False),
        pa.field("source_key", pa.string(), nullable=False),
    ]
)

# A URL list's other columns travel with each sample as *source columns* (LAION's ``similarity``,
# DataComp's ``face_bboxes``): kept in the list's plan (``input/urls*.parquet``, beside the INPUT
# columns) and shown by the catalog's ``source`` view, which ``samples`` joins on uid. A list's own
# ``uid`` column (DataComp's 128-bit ids) becomes ``source_uid``, which exports use when present.
SOURCE_UID = "source_uid"
SOURCE_COLUMNS_KEY = "source_columns"  # a plan file's footer key: its source columns, as JSON

STAGE_SCHEMAS: dict[str, pa.Schema] = {
    "download": DOWNLOAD,
    "ocr": OCR,
    "parrot": PARROT,
    "caption": CAPTION,
    "clip_score": CLIP_SCORE,
    "dedup": DEDUP,
    "faces": FACES,
    "dup_group": DUP_GROUP,
    "decontaminate": DECONTAMINATE,
}


def pipeline_columns() -> frozenset[str]:
    """Every column name the pipeline itself writes (any stage, the plan, selections, the curated
    manifest), lower-cased: DuckDB's names are case-insensitive, so a source column named ``WIDTH``
    would collide with ``width`` in the ``samples`` view."""
    schemas = (INPUT, RETRY_INPUT, SELECTION, CURATED, *STAGE_SCHEMAS.values())
    return frozenset(name.lower() for schema in schemas for name in schema.names) | {SOURCE_UID}


def schema_for(stage: str) -> pa.Schema:
    """The schema of a stage's manifest, stamped with the schema version in its metadata."""
    return STAGE_SCHEMAS[stage].with_metadata({"schema_version": SCHEMA_VERSION, "stage": stage})
