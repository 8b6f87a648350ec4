"""Decontamination: pool samples that copy an evaluation image are found, and only those.

Real photographs written by others (../shared/realdata/scenetext: mmocr's wildreceipt, RapidOCR's
test images and clovaai's demo crops, Apache-2.0) make the evaluation set (a folder) and the pool
(served on 127.0.0.1, downloaded by img2dataset): the pool holds re-encoded and resized copies of
some evaluation photos (planted) beside photos the evaluation set does not have. The tiers are also
checked one by one over a real DuckDB catalog, the semantic tier with a real open_clip model.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from core.errors import ConfigError
from manifests.catalog import run_query
from manifests.store import RunLayout
from pipeline.cli import main
from core.cache import CACHE_ENV
from stages.decontaminate import DecontaminateConfig, DecontaminateStage, cache_dir, eval_embeddings, load_eval_set
from stages.dedup import phash

SCENETEXT = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "scenetext"
EVAL_PHOTOS = ["mmocr_wildreceipt/1.jpeg", "rapidocr_tests/en.jpg", "rapidocr_tests/korean.jpg",
               "mmocr_wildreceipt/2.jpeg"]  # the last is not in the pool
OTHER_PHOTOS = ["rapidocr_tests/return_word_debug.jpg", "rapidocr_tests/issue_170.png", "dtrb_demo/demo_1.png",
                "dtrb_demo/demo_2.jpg", "rapidocr_tests/ch_en_num.jpg"]  # in the pool, not in the eval set


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture()
def planted(tmp_path):
    """(eval folder, base URL, pool rows (file, planted?)) with the server running."""
    if not SCENETEXT.is_dir():
        pytest.skip(f"the real photos are not there: {SCENETEXT}")
    eval_dir, www = tmp_path / "eval", tmp_path / "www"
    eval_dir.mkdir()
    www.mkdir()
    rows = []
    for i, name in enumerate(EVAL_PHOTOS):
        with Image.open(SCENETEXT / name) as image:
            (eval_dir / f"e{i}.jpg").write_bytes(_jpeg(image, 95))
            if i < 3:  # planted: a re-encode, and a half-size copy of the first
                (www / f"copy{i}-q50.jpg").write_bytes(_jpeg(image, 50))
                rows.append((f"copy{i}-q50.jpg", True))
                if i == 0:
                    w, h = image.size
                    (www / f"copy{i}-half.jpg").write_bytes(_jpeg(image.resize((w // 2, h // 2), Image.LANCZOS)))
                    rows.append((f"copy{i}-half.jpg", True))
    for i, name in enumerate(OTHER_PHOTOS):
        with Image.open(SCENETEXT / name) as image:
            (www / f"other{i}.jpg").write_bytes(_jpeg(image, 90))
            rows.append((f"other{i}.jpg", False))
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield eval_dir, f"http://127.0.0.1:{server.server_address[1]}", rows
    server.shutdown()
    server.server_close()


def test_planted_copies_are_found_and_dropped_by_no_eval_dups(ray_local, planted, tmp_path, capsys):
    eval_dir, base, rows = planted
    url_list = tmp_path / "pool.parquet"
    pq.write_table(pa.table({"url": [f"{base}/{f}" for f, _ in rows], "caption": [f"photo {f}" for f, _ in rows]}), url_list)
    config = tmp_path / "fast.toml"
    config.write_text('[download]\nallow_networks = ["127.0.0.1/32"]\ntimeout_s = 10.0\n[ocr]\nengine = "rapidocr"\n'
                      f'[decontaminate]\neval_sets = ["{eval_dir}"]\n')
    out = tmp_path / "out"
    args = ["curate", "--url-list", str(url_list), "--config", str(config), "--output", str(out),
            "--policies", "all,no-eval-dups", "--shard-size", "20", "--no-progress"]
    assert main(args) == 0
    layout = RunLayout(out)
    _, got = run_query(layout, "select url, eval_match from samples where status = 'ok' order by url")
    assert len(got) == len(rows)
    planted_urls = {f"{base}/{f}" for f, p in rows if p}
    found = {url for url, match in got if match is not None}
    assert found == planted_urls  # every planted copy, and no other photo
    for url, match in got:
        if match is not None:
            assert match["set"] == str(eval_dir) and match["tier"] == "phash" and match["distance"] <= 10
            copy = url.rsplit("/", 1)[1].split("-")[0].removeprefix("copy")
            assert match["image"] == f"e{copy}.jpg", (url, match)  # the evaluation photo it copies
    kept = dict(run_query(layout, "select policy, count(*) filter (where kept) from selections group by 1")[1])
    assert kept == {"all": len(rows), "no-eval-dups": len(rows) - len(planted_urls)}
    _, dropped = run_query(layout, "select url from samples join selection_no_eval_dups using (uid) where not kept")
    assert {u for (u,) in dropped} == planted_urls
    summary = capsys.readouterr().out
    assert f"decontaminate: {len(planted_urls)} sample(s) match an evaluation image (exact 0, phash {len(planted_urls)}" in summary
    assert "random init" in summary  # why the semantic tier did not run
    report = (layout.report_dir / "index.html").read_text()
    assert "Decontamination" in report and report.count('class="pair"') == len(planted_urls)

    # the set is read and hashed once: the rerun finds it in the cache (same file, untouched)
    cached = list(cache_dir().glob("*.npz"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    assert main(args) == 0
    assert [p.stat().st_mtime_ns for p in cache_dir().glob("*.npz")] == [stamp]


def test_an_unreadable_eval_set_stops_the_run_in_one_line(ray_local, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    bad_list = tmp_path / "list.csv"
    bad_list.write_text("name\nx\n")
    for entry, why in ((tmp_path / "missing", "no such file or folder"), (empty, "no images in it"),
                       (bad_list, "no url column")):
        config = tmp_path / "c.toml"
        config.write_text(f'[decontaminate]\neval_sets = ["{entry}"]\n')
        code = main(["curate", "--config", str(config), "--output", str(tmp_path / "out"), "--samples", "16",
                     "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert why in err and str(entry) in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "out" / "shards").exists()  # nothing downloaded


def _catalog(uids, phashes, sha256s, vectors=None, model=None, meaningful=True) -> duckdb.DuckDBPyConnection:
    """A real DuckDB holding the views the stage reads, as a run's catalog has them."""
    con = duckdb.connect()
    con.register("d_", pa.table({"uid": uids, "status": ["ok"] * len(uids), "sha256": sha256s}))
    con.execute("create table download as select * from d_")
    con.register("p_", pa.table({"uid": uids, "phash": pa.array(phashes, pa.int64())}))
    con.execute("create table dedup as select * from p_")
    if vectors is not None:
        dim = vectors.shape[1]
        con.register("e_", pa.table({"uid": uids, "v": [list(map(float, v)) for v in vectors], "model": [model] * len(uids)}))
        con.execute(f"create table embeddings as select uid, v::FLOAT[{dim}] as image_embedding, model from e_")
        con.register("c_", pa.table({"uid": uids, "clip_model": [model] * len(uids), "clip_weights_meaningful": [meaningful] * len(uids)}))
        con.execute("create table clip_score as select * from c_")
    return con


def _matches(stage: DecontaminateStage, con) -> dict[str, dict | None]:
    table = pa.Table.from_batches(list(stage.process_pool(con)))
    return dict(zip(table.column("uid").to_pylist(), table.column("eval_match").to_pylist()))


def test_exact_before_phash_and_null_for_the_rest(tmp_path):
    folder = tmp_path / "eval"
    folder.mkdir()
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).resize((256, 256)) for _ in range(3)]
    files = [_jpeg(p) for p in pictures]
    for i, data in enumerate(files):
        (folder / f"{i}.jpg").write_bytes(data)
    evals = load_eval_set(str(folder))
    import hashlib

    def h(im: Image.Image) -> int:
        return phash(np.asarray(im.convert("RGB")))

    other = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).resize((256, 256))
    uids = ["a", "b", "c", "d"]
    phashes = [int(evals.phashes[0].view(np.int64)), h(pictures[1].resize((128, 128))), h(other), None]
    sha = [hashlib.sha256(files[0]).hexdigest(), "x", "y", hashlib.sha256(files[2]).hexdigest()]
    got = _matches(DecontaminateStage(DecontaminateConfig(eval_sets=(str(folder),))), _catalog(uids, phashes, sha))
    assert got["a"] == {"set": str(folder), "image": "0.jpg", "tier": "exact", "distance": 0.0}
    assert got["b"]["tier"] == "phash" and got["b"]["image"] == "1.jpg" and got["b"]["distance"] <= 4
    assert got["c"] is None
    assert got["d"]["tier"] == "exact" and got["d"]["image"] == "2.jpg"  # bytes alone, no pHash


def test_semantic_tier_with_the_runs_own_model_and_its_cache(tmp_path):
    """Embeddings of the run's CLIP (a real open_clip model from a checkpoint file): a copy whose pHash
    is unknown is found by cosine; a random-init pool or another model's vectors leave the tier off."""
    if not SCENETEXT.is_dir():
        pytest.skip(f"the real photos are not there: {SCENETEXT}")
    import torch

    from models.clip import load_clip, register_model_configs
    from stages.clip_score import ClipConfig

    register_model_configs()
    import open_clip

    torch.manual_seed(0)
    net = open_clip.create_model("curation-tiny")
    checkpoint = tmp_path / "tiny.pt"
    torch.save(net.state_dict(), checkpoint)
    clip_config = ClipConfig(model="curation-tiny", pretrained=str(checkpoint), device="cpu")
    folder = tmp_path / "eval"
    folder.mkdir()
    with Image.open(SCENETEXT / EVAL_PHOTOS[0]) as image:
        photo = image.convert("RGB")
    (folder / "e0.jpg").write_bytes(_jpeg(photo))
    clip = load_clip("curation-tiny", str(checkpoint), device="cpu", precision="fp32", seed=0)
    copy = np.asarray(Image.open(io.BytesIO(_jpeg(photo, 60))).convert("RGB"))
    with Image.open(SCENETEXT / OTHER_PHOTOS[2]) as image:
        other = np.asarray(image.convert("RGB"))
    vectors = clip.encode_images([copy, other])
    cosines = vectors @ clip.encode_images([np.asarray(photo)]).T
    assert cosines[0, 0] > 0.99  # the planted copy
    config = DecontaminateConfig(eval_sets=(str(folder),), min_cosine=float(cosines[0, 0]) - 1e-4)
    assert cosines[1, 0] < config.min_cosine  # the other photo is below the threshold
    stage = DecontaminateStage(config, clip_config)
    got = _matches(stage, _catalog(["copy", "other"], [None, None], ["x", "y"], vectors, clip.description))
    assert stage.note is None
    assert got["copy"]["tier"] == "semantic" and got["copy"]["distance"] == pytest.approx(1 - cosines[0, 0], abs=1e-3)
    assert got["other"] is None
    # embedded once: the second stage reuses the cached vectors (the file is not rewritten)
    cached = list(cache_dir().glob("*.npy"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    evals = load_eval_set(str(folder))
    assert np.allclose(eval_embeddings(evals, clip_config, clip.description), np.load(cached[0]))
    _matches(DecontaminateStage(config, clip_config), _catalog(["copy"], [None], ["x"], vectors[:1], clip.description))
    assert cached[0].stat().st_mtime_ns == stamp
    # a CLIP that calls a share of the pool copies no real pool has (one that clusters look-alikes)
    # is refused, judged on the pool's first batch; a few copies among many samples are found
    rng = np.random.default_rng(0)
    for copies, refused in ((30, True), (5, False)):
        pool = np.repeat(vectors[1:2], 250, axis=0)
        pool[:copies] = vectors[0]
        pool = pool + rng.normal(0, 1e-4, pool.shape)
        uids = [f"u{i:03d}" for i in range(250)]
        stage = DecontaminateStage(config, clip_config)
        got = _matches(stage, _catalog(uids, [None] * 250, ["x"] * 250, pool, clip.description))
        found = sum(match is not None for match in got.values())
        if refused:
            assert found == 0 and "12% of the pool" in (stage.note or "") and "exact and pHash" in stage.note
        else:
            assert found == 5 and stage.note is None
    # another model's vectors, or random weights: the tier does not run, and the note says why
    for model, meaningful, why in (("imported: datacomp npz l14", True, "cannot be compared"),
                                   (clip.description, False, "random init")):
        stage = DecontaminateStage(config, clip_config)
        got = _matches(stage, _catalog(["copy"], [None], ["x"], vectors[:1], model, meaningful))
        assert got["copy"] is None and why in (stage.note or "")


def test_config_problems_are_one_line_each(tmp_path):
    problems = DecontaminateConfig(eval_sets=(str(tmp_path / "nope"), "s3://bucket/x"), radius=40).problems()
    assert any("radius" in p for p in problems)
    assert any("no such file or folder" in p for p in problems)
    assert any("s3://" in p for p in problems)
    with pytest.raises(ConfigError, match="no images in it"):
        load_eval_set(str(tmp_path))


def test_builtin_sets_are_the_ablations_own_and_a_copy_of_one_is_found():
    """"builtin" draws the held-out sets the ablation evaluates on (sources.eval_sets): a re-encode of
    one of its typographic images in the pool is found, labelled with the arguments that draw it."""
    from pipeline.config import load_config
    from pipeline.dag import builtin_eval_sets
    from sources.eval_sets import image_files

    config = load_config()
    builtin = dataclasses.replace(builtin_eval_sets(config), per_class=1)
    assert builtin.seed == config.ablation.eval_seed and builtin.draw is image_files
    files = dict(image_files(builtin.seed, 1))
    copy = Image.open(io.BytesIO(files["typographic/00003"]))
    pool_hash = phash(np.asarray(Image.open(io.BytesIO(_jpeg(copy, 50))).convert("RGB")))
    stage = DecontaminateStage(DecontaminateConfig(radius=2), None, builtin)
    got = _matches(stage, _catalog(["copy"], [pool_hash], ["x"]))
    label = f"builtin(seed={builtin.seed},per_class=1)"
    assert got["copy"]["set"] == label and got["copy"]["tier"] == "phash"
    assert got["copy"]["image"] in ("typographic/00003", "clean/00003")  # its clean twin may be as near
    from stages.decontaminate import eval_images

    assert eval_images(label, [got["copy"]["image"]], image_files)[got["copy"]["image"]] == files[got["copy"]["image"]]
