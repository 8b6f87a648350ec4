"""Embeddings kept: the CLIP stage stores each sample's image and caption embedding beside its
scores (float16, in the same clip_score part), and the catalog's ``embeddings`` view gives them
to DuckDB as FLOAT[d] arrays, to numpy and FAISS as plain arrays, without decoding an image.

Real open_clip forwards, real Parquet, real DuckDB, the session's real embedded curation run.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
from pathlib import Path

import duckdb
import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SMALL_SAMPLES
from PIL import Image

from manifests.catalog import build_catalog
from manifests.schemas import EMBEDDING_COLUMNS, schema_for
from manifests.store import RunLayout
from manifests.uids import read_selection
from models.clip import load_clip, mask_text_regions
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.dag import SAMPLE_STEPS, STEPS
from pipeline.sample_runner import run_per_sample
from sources.embedded import generate
from stages.clip_score import ClipConfig, ClipScoreStage

FP16_NORM_TOL = 2e-3  # a unit float32 vector rounded to float16: |norm - 1| stays under ~1e-3


def _con(root: Path) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(str(root / "catalog.duckdb"), read_only=True)


def _embed_dim(config: Path) -> int:
    return open_clip.get_model_config(load_config(config).clip.model)["embed_dim"]


def _copy(embedded_run: dict, tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of the session's run, and the CLI arguments that point at it."""
    root = tmp_path / "copy"
    shutil.copytree(embedded_run["root"], root)
    args = list(embedded_run["args"])
    args[args.index("--output") + 1] = str(root)
    return root, args


# -- the catalog of a real run ------------------------------------------------------------------


def test_embeddings_view_holds_unit_vectors_whose_cosine_is_the_clip_score(embedded_run):
    con = _con(embedded_run["root"])
    d = _embed_dim(embedded_run["config"])
    types = {name: kind for name, kind, *_ in con.execute("describe embeddings").fetchall()}
    assert types == {"uid": "VARCHAR", "image_embedding": f"FLOAT[{d}]", "text_embedding": f"FLOAT[{d}]", "model": "VARCHAR"}
    # one row per clip-ok sample, its model the clip_model string
    ok = dict(con.execute("select uid, clip_model from clip_score where clip_status = 'ok'").fetchall())
    rows = dict(con.execute("select uid, model from embeddings").fetchall())
    assert rows == ok and len(ok) >= SMALL_SAMPLES - 4
    # numpy (and so FAISS) reads them as they are: unit rows
    table = con.execute("select uid, image_embedding, text_embedding from embeddings order by uid").to_arrow_table()
    for column in EMBEDDING_COLUMNS:
        vectors = table.column(column).combine_chunks().flatten().to_numpy().reshape(-1, d)
        assert vectors.shape == (len(ok), d)
        assert np.abs(np.linalg.norm(vectors, axis=1) - 1).max() < FP16_NORM_TOL
    # DuckDB's own cosine of the kept vectors is the score the stage computed
    worst = con.execute(
        "select max(abs(array_cosine_similarity(image_embedding, text_embedding) - clip_score)) "
        "from embeddings join clip_score using (uid)"
    ).fetchone()[0]
    assert worst < 1e-2, worst
    assert con.execute("select count(*) from embeddings join clip_score using (uid)").fetchone()[0] == len(ok)


def test_nearest_neighbours_in_duckdb(embedded_run):
    con = _con(embedded_run["root"])
    probe = con.execute("select uid from embeddings order by uid limit 1").fetchone()[0]
    near = con.execute(
        "select uid, array_cosine_similarity(image_embedding, "
        "  (select image_embedding from embeddings where uid = ?)) as sim "
        "from embeddings order by sim desc limit 5",
        [probe],
    ).fetchall()
    assert len(near) == 5
    assert near[0][0] == probe and near[0][1] == pytest.approx(1.0, abs=FP16_NORM_TOL)  # itself first
    sims = [s for _, s in near]
    assert sims == sorted(sims, reverse=True) and sims[-1] < sims[0]


def test_samples_and_clip_score_views_carry_no_embedding(embedded_run):
    con = _con(embedded_run["root"])
    for view in ("samples", "clip_score"):
        names = [c for c, *_ in con.execute(f"describe {view}").fetchall()]
        assert "clip_score" in names and not set(EMBEDDING_COLUMNS) & set(names), view
    assert con.execute("select count(*) from (select * from samples)").fetchone()[0] >= SMALL_SAMPLES
    # ... while the part on disk has them, float16, aligned with the scores by row
    layout = RunLayout(embedded_run["root"])
    part = sorted(layout.stage_dir("clip_score").glob("part-*.parquet"))[0]
    table = pq.read_table(part)
    assert table.schema.field("image_embedding").type == pa.list_(pa.float16())
    ok = pc.equal(table.column("clip_status"), "ok")
    assert table.filter(ok).column("image_embedding").null_count == 0
    assert table.filter(pc.invert(ok)).column("image_embedding").null_count == table.num_rows - pc.sum(ok).as_py()


def test_policy_over_embeddings_decodes_no_image(embedded_run, tmp_path):
    """A policy whose rule reads the kept vectors runs with every shard tar moved away: it cannot
    have decoded an image, since there is none, and keeps exactly what DuckDB says it should."""
    root, args = _copy(embedded_run, tmp_path)
    layout = RunLayout(root)
    shutil.move(layout.shards_dir, tmp_path / "tars-aside")
    median = _con(root).execute(
        "select median(array_cosine_similarity(image_embedding, text_embedding)) from embeddings").fetchone()[0]
    config = tmp_path / "emb.toml"
    config.write_text(
        embedded_run["config"].read_text()
        + '\n[policies.emb-agree]\ndescription = "image and caption embeddings agree"\n'
        + f"params = {{ min_cos = {median!r} }}\n"
        + 'rules = { agree = "list_cosine_similarity(image_embedding, text_embedding) >= {min_cos}" }\n'
    )
    args[args.index("--config") + 1] = str(config)
    assert main(args + ["--stages", "filter", "--policies", "emb-agree"]) == 0
    selection = read_selection(layout.selection_path("emb-agree"), columns=["uid", "kept"])
    kept = set(selection.filter(selection.column("kept")).column("uid").to_pylist())
    parts = str(layout.stage_dir("clip_score") / "part-*.parquet")
    want = {u for (u,) in duckdb.execute(
        f"select uid from read_parquet('{parts}') where list_cosine_similarity(image_embedding, text_embedding) >= {median!r}"
    ).fetchall()}
    assert kept == want and 0 < len(kept) < SMALL_SAMPLES
    # and the CLIP step, done, decodes nothing on a rerun
    clip_step = tuple(s for s in SAMPLE_STEPS if s.name == "clip_score")
    report = run_per_sample(layout, load_config(config), clip_step, progress=False, context=SAMPLE_STEPS)
    assert report.images_decoded == 0 and report.stages["clip_score"].shards_run == 0


def test_clip_rerun_alone_writes_the_same_embeddings(embedded_run, tmp_path):
    """clip_score as the last stage of the pipeline (``--stages clip_score``): its vectors reach the
    driver straight from Ray, whose column type then differs batch by batch (tensor or list);
    the part written is the first run's, to the bit."""
    root, _ = _copy(embedded_run, tmp_path)
    layout = RunLayout(root)
    part = sorted(layout.stage_dir("clip_score").glob("part-*.parquet"))[0]
    before = pq.read_table(part).sort_by("uid")
    part.unlink()
    clip_step = [s for s in SAMPLE_STEPS if s.name == "clip_score"]
    report = run_per_sample(layout, load_config(embedded_run["config"]), tuple(clip_step), progress=False,
                            context=SAMPLE_STEPS)
    assert report.images_decoded == before.num_rows and report.stages["clip_score"].shards_run == 1
    after = pq.read_table(part).sort_by("uid")
    assert after.schema.field("image_embedding").type == pa.list_(pa.float16())
    for column in ("uid", "clip_score", *EMBEDDING_COLUMNS):
        assert after.column(column).equals(before.column(column)), column


def test_parts_written_before_embeddings_still_build_a_catalog(embedded_run, tmp_path):
    root, _ = _copy(embedded_run, tmp_path)
    layout = RunLayout(root)
    parts = sorted(layout.stage_dir("clip_score").glob("part-*.parquet"))
    assert len(parts) >= 2
    old_uids = set()
    for part in parts[:1]:  # one shard's part as an older run wrote it: no embedding columns
        table = pq.read_table(part)
        old_uids |= set(table.column("uid").to_pylist())
        pq.write_table(table.drop_columns(list(EMBEDDING_COLUMNS)), part)
    order = tuple(s.name for s in STEPS)
    build_catalog(layout, order)
    con = _con(root)
    uids = {u for (u,) in con.execute("select uid from embeddings").fetchall()}
    ok = {u for (u,) in con.execute("select uid from clip_score where clip_status = 'ok'").fetchall()}
    assert uids == ok - old_uids and uids
    con.close()
    for part in parts[1:]:  # every part old: no embeddings view, the others as before
        pq.write_table(pq.read_table(part).drop_columns(list(EMBEDDING_COLUMNS)), part)
    build_catalog(layout, order)
    con = _con(root)
    views = {name for (name,) in con.execute("select view_name from duckdb_views() where not internal").fetchall()}
    assert "embeddings" not in views and {"clip_score", "samples"} <= views
    assert con.execute("select count(clip_score) from samples").fetchone()[0] == len(ok)


def test_models_of_two_dimensions_leave_the_vectors_as_lists(embedded_run, tmp_path):
    """A run whose parts hold vectors of two models (a pool's imported ones beside the model's):
    no single FLOAT[d] fits, so the view keeps lists, which list_cosine_similarity reads per model."""
    root, _ = _copy(embedded_run, tmp_path)
    layout = RunLayout(root)
    part = sorted(layout.stage_dir("clip_score").glob("part-*.parquet"))[0]
    table = pq.read_table(part)
    rng = np.random.default_rng(0)
    for column in EMBEDDING_COLUMNS:
        vectors = rng.normal(size=(table.num_rows, 8)).astype(np.float16)
        table = table.set_column(table.schema.get_field_index(column), column,
                                 pa.array(list(vectors), pa.list_(pa.float16())))
    table = table.set_column(table.schema.get_field_index("clip_model"), "clip_model",
                             pa.array(["other-8d"] * table.num_rows))
    pq.write_table(table, part)
    build_catalog(layout, tuple(s.name for s in STEPS))
    con = _con(root)
    types = {name: kind for name, kind, *_ in con.execute("describe embeddings").fetchall()}
    assert types["image_embedding"] == "FLOAT[]"
    dims = dict(con.execute("select model, max(len(image_embedding)) from embeddings group by model").fetchall())
    assert dims["other-8d"] == 8 and set(dims.values()) == {8, _embed_dim(embedded_run["config"])}
    worst = con.execute("select max(abs(list_cosine_similarity(image_embedding, text_embedding) - clip_score)) "
                        "from embeddings join clip_score using (uid) where model <> 'other-8d'").fetchone()[0]
    assert worst < 1e-2


# -- the stage -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip():
    threads = torch.get_num_threads()
    model = load_clip("curation-tiny", "", device="cpu", precision="fp32", seed=0, batch_size=8)
    yield model
    torch.set_num_threads(threads)


def _stage_batch() -> dict[str, list]:
    rows = list(generate(6, 0))
    images = [np.asarray(Image.open(io.BytesIO(s.image)).convert("RGB")) for s in rows]
    images[2] = None  # an undecodable image: a failed row, no vectors
    return {
        "uid": [s.sample_id for s in rows],
        "caption": [s.caption for s in rows],
        "image": images,
        "decode_error": [None, None, "decode failed: OSError: truncated", None, None, None],
        "ocr_status": ["ok"] * len(rows),
        "quads": [[list(map(list, q)) for q in s.boxes] for s in rows],
    }


def _process(model, keep: bool) -> pa.Table:
    stage = ClipScoreStage(dataclasses.replace(ClipConfig(), model="curation-tiny", keep_embeddings=keep))
    stage.clip = model
    out = stage.process_batch(_stage_batch())
    return pa.Table.from_pydict(out, schema=schema_for("clip_score"))


def test_stage_keeps_the_plain_image_and_caption_vectors(tiny_clip):
    table = _process(tiny_clip, keep=True)
    batch = _stage_batch()
    assert table.column("clip_status").to_pylist() == ["ok", "ok", "failed", "ok", "ok", "ok"]
    assert table.column("image_embedding")[2].as_py() is None and table.column("text_embedding")[2].as_py() is None
    ok = [i for i in range(table.num_rows) if i != 2]
    image = np.array([table.column("image_embedding")[i].values.to_numpy() for i in ok])
    text = np.array([table.column("text_embedding")[i].values.to_numpy() for i in ok])
    assert image.dtype == np.float16 and image.shape == (len(ok), 128)  # curation-tiny's embed_dim
    # the unmasked image's vector (the text-masked image's would differ where there is text)
    want = tiny_clip.encode_images([batch["image"][i] for i in ok])
    np.testing.assert_allclose(image.astype(np.float32), want, atol=1e-3)
    with_text = [k for k, i in enumerate(ok) if batch["quads"][i]]
    masked = tiny_clip.encode_images([mask_text_regions(batch["image"][ok[k]], batch["quads"][ok[k]]) for k in with_text])
    assert with_text and np.abs(masked - want[with_text]).max() > 3e-3  # the check above tells them apart
    np.testing.assert_allclose(text.astype(np.float32), tiny_clip.encode_texts([batch["caption"][i] for i in ok]), atol=1e-3)
    cos = np.einsum("ij,ij->i", image.astype(np.float32), text.astype(np.float32))
    np.testing.assert_allclose(cos, [table.column("clip_score")[i].as_py() for i in ok], atol=1e-2)


def test_stage_without_keep_embeddings_writes_null_vectors_and_the_same_scores(tiny_clip):
    kept, plain = _process(tiny_clip, keep=True), _process(tiny_clip, keep=False)
    for column in EMBEDDING_COLUMNS:
        assert plain.column(column).null_count == plain.num_rows
    assert plain.column("clip_score").equals(kept.column("clip_score"))
    assert plain.column("clip_score_masked").equals(kept.column("clip_score_masked"))
