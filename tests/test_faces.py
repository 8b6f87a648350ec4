"""The faces step: MTCNN on real photographs, the pool's own boxes imported instead, and curated
images with every face blurred as DataComp's resharder blurs them.

Real photos only: scikit-image's bundled ``astronaut`` (Eileen Collins, NASA, public domain),
``camera`` (the cameraman) and ``chelsea`` (a cat) and ``coffee`` (a cup), and matplotlib's bundled
``grace_hopper.jpg``; nothing is downloaded. Runs are real ``curate`` runs on a local Ray, their
photos served over HTTP on 127.0.0.1.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import tarfile
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
from manifests.store import RunLayout, read_table, tar_key
from models.faces import FaceDetector
from pipeline.cli import main
from pipeline.config import config_from_dict
from stages.faces import FaceConfig, FaceStage
from stages.reshard import blur_face_boxes

MPL_SAMPLE = Path(__import__("matplotlib").get_data_path()) / "sample_data" / "grace_hopper.jpg"


def _photos() -> dict[str, np.ndarray]:
    """name -> RGB uint8; the first three show one face each, the last two none."""
    import skimage.data as data

    grey = data.camera()
    return {
        "astronaut": data.astronaut(),
        "camera": np.stack([grey] * 3, axis=-1),
        "grace_hopper": np.asarray(Image.open(MPL_SAMPLE).convert("RGB")),
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
    }


FACES = {"astronaut": 1, "camera": 1, "grace_hopper": 1, "chelsea": 0, "coffee": 0}
NO_FACES_POLICY = '[policies.no-faces]\ndescription = "no face found"\nrules = { no_faces = "n_faces = 0" }\n'


def _centre_inside(box: list[float], region: tuple[float, float, float, float]) -> bool:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return region[0] <= cx <= region[2] and region[1] <= cy <= region[3]


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return _photos()


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector(device="cpu", min_confidence=0.9)


# -- the detector ---------------------------------------------------------------------------------


def test_mtcnn_finds_each_face_and_nothing_on_photos_without_one(detector, photos):
    found = dict(zip(photos, detector.detect_batch(list(photos.values()))))
    assert {name: len(boxes) for name, boxes in found.items()} == FACES
    for boxes in found.values():
        for x1, y1, x2, y2 in boxes:
            assert 0.0 <= x1 < x2 <= 1.0 and 0.0 <= y1 < y2 <= 1.0
    # Collins' face: centred near (0.44, 0.23) of the 512 px frame (OpenCV's Haar cascade and
    # MediaPipe's BlazeFace put it there too), a sixth of the width across
    (astronaut,) = found["astronaut"]
    assert _centre_inside(astronaut, (0.40, 0.19, 0.48, 0.27)) and 0.12 < astronaut[2] - astronaut[0] < 0.25
    (hopper,) = found["grace_hopper"]
    assert _centre_inside(hopper, (0.40, 0.25, 0.62, 0.50))


def test_a_padded_batch_of_mixed_sizes_finds_what_each_image_alone_does(photos):
    """The GPU path (one padded call for a batch of sizes) run on CPU: the boxes are mapped back
    to each image's own frame."""
    alone = FaceDetector(device="cpu", pad_batches=False)
    padded = FaceDetector(device="cpu", pad_batches=True)
    images = [photos["chelsea"], photos["grace_hopper"], photos["astronaut"]]  # 451x300, 512x600, 512x512
    one_by_one = [alone.detect_batch([im])[0] for im in images]
    together = padded.detect_batch(images)
    assert [len(b) for b in together] == [len(b) for b in one_by_one] == [0, 1, 1]
    for a, b in zip(one_by_one[1:], together[1:]):
        assert np.allclose(a[0], b[0], atol=0.03), (a, b)


def test_stage_rows_follow_the_schema_and_a_missing_image_fails_alone(detector, photos):
    stage = FaceStage(FaceConfig(enabled=True), detector=detector)
    out = stage.process_batch({"uid": ["a", "b", "c"], "image": [photos["astronaut"], None, photos["coffee"]],
                               "decode_error": [None, "decode failed: truncated", None]})
    stage.check_output(out)
    assert out["face_status"] == ["ok", "failed", "ok"] and out["n_faces"] == [1, None, 0]
    assert out["face_error"][1] == "decode failed: truncated" and out["face_source"] == ["mtcnn"] * 3
    assert out["face_engine"][0].startswith("facenet-pytorch 2.6.0 mtcnn")
    table = pa.table(out, schema=stage.output_schema)  # the part's types hold the values
    assert table.column("face_bboxes").type == pa.list_(pa.list_(pa.float64()))


def test_config_errors_name_the_key(tmp_path, capsys):
    with pytest.raises(ConfigError, match="reshard.blur_faces = true needs the face boxes: set \\[faces\\] enabled = true"):
        config_from_dict({"reshard": {"blur_faces": True}}).validate()
    with pytest.raises(ConfigError, match="faces.min_confidence must be within 0..1"):
        config_from_dict({"faces": {"min_confidence": 2.0}}).validate()
    code = main(["curate", "--output", str(tmp_path / "out"), "--stages", "download,faces", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--stages names 'faces', which is switched off; set [faces] enabled = true" in err
    assert not (tmp_path / "out").exists()
    # a policy on n_faces while the step is off: refused at start, as any column nothing writes
    (tmp_path / "policy.toml").write_text(NO_FACES_POLICY)
    code = main(["curate", "--config", str(tmp_path / "policy.toml"), "--output", str(tmp_path / "out"),
                 "--policies", "no-faces", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "step 'filter' (policy 'no-faces') reads 'n_faces', which no earlier step writes" in err
    assert not (tmp_path / "out").exists()


# -- blurring -------------------------------------------------------------------------------------


def _jpeg(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95)
    return out.getvalue()


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def _inside_outside(before: np.ndarray, after: np.ndarray, box: list[float]) -> tuple[float, float]:
    """Mean absolute pixel change inside the box (its middle half) and well outside it (beyond the
    box grown by DataComp's 10 % plus the blur's reach, 3 sigma)."""
    h, w = before.shape[:2]
    x1, y1, x2, y2 = box[0] * w, box[1] * h, box[2] * w, box[3] * h
    side = max(x2 - x1, y2 - y1)
    diff = np.abs(after - before).mean(axis=2)
    qx, qy = (x2 - x1) / 4, (y2 - y1) / 4
    inside = diff[int(y1 + qy):int(y2 - qy), int(x1 + qx):int(x2 - qx)].mean()
    grow = 0.1 * side + 3 * 0.1 * side + 2
    mask = np.ones((h, w), bool)
    mask[max(0, int(y1 - grow)):int(y2 + grow) + 1, max(0, int(x1 - grow)):int(x2 + grow) + 1] = False
    return float(inside), float(diff[mask].mean())


def test_blur_changes_the_face_and_leaves_the_rest_and_is_deterministic(detector, photos):
    jpg = _jpeg(photos["astronaut"])
    (box,) = detector.detect_batch([photos["astronaut"]])[0]
    blurred = blur_face_boxes(jpg, [box])
    inside, outside = _inside_outside(_decode(jpg), _decode(blurred), box)
    assert inside > 8 and outside < 1.5, (inside, outside)
    assert blur_face_boxes(jpg, [box]) == blurred  # same bytes in, same bytes out


# -- runs -----------------------------------------------------------------------------------------


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The photos as JPEGs on 127.0.0.1, and a config that lets the download reach them."""
    base = tmp_path_factory.mktemp("faces")
    www = base / "www"
    www.mkdir()
    for name, pixels in _photos().items():
        Image.fromarray(pixels).save(www / f"{name}.jpg", quality=95)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"base": base, "host": f"http://127.0.0.1:{server.server_address[1]}"}
    server.shutdown()
    server.server_close()


def _config(path: Path, blur: bool) -> Path:
    path.write_text('[download]\nallow_networks = ["127.0.0.1/32"]\nshard_size = 3\n\n'
                    '[faces]\nenabled = true\nreplicas = 1\n\n'
                    f'[reshard]\nsamples_per_shard = 4\nblur_faces = {str(blur).lower()}\n\n' + NO_FACES_POLICY)
    return path


def _curate(*args: str) -> None:
    assert main(["curate", *args, "--no-progress"]) == 0


def _rows(root: Path, sql: str) -> list[dict]:
    con = duckdb.connect(str(RunLayout(root).catalog_path), read_only=True)
    try:
        return con.execute(sql).to_arrow_table().to_pylist()
    finally:
        con.close()


def _tar_members(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} of a tar."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = tar_key(member.name)
            out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


def _by_uid(folder: Path) -> dict[str, dict[str, bytes]]:
    """uid -> members, over every tar of a folder (download shards or a policy's curated shards)."""
    found = {}
    for tar in sorted(folder.glob("*.tar")):
        for members in _tar_members(tar).values():
            found[json.loads(members["json"])["uid"]] = members
    return found


def test_a_curated_run_blurs_every_detected_face_and_says_so(ray_local, served, tmp_path):
    base, host = served["base"], served["host"]
    names = list(FACES)
    pq.write_table(pa.table({"url": [f"{host}/{n}.jpg" for n in names], "caption": [f"a photo: {n}" for n in names]}),
                   tmp_path / "list.parquet")
    out = tmp_path / "out"
    common = ["--url-list", str(tmp_path / "list.parquet"), "--output", str(out), "--policies", "all,no-faces",
              "--stages", "download,faces,filter,reshard"]
    _curate(*common, "--config", str(_config(tmp_path / "blur.toml", True)))

    faces = {r["url"].rsplit("/", 1)[1][:-4]: r for r in _rows(out, "select url, n_faces, face_bboxes, face_source from samples")}
    assert {n: r["n_faces"] for n, r in faces.items()} == FACES
    assert {r["face_source"] for r in faces.values()} == {"mtcnn"}

    layout = RunLayout(out)
    source = _by_uid(layout.shards_dir)
    curated_dir = layout.curated_dir("all")
    curated = _by_uid(curated_dir)
    uid_of = {r["url"].rsplit("/", 1)[1][:-4]: r["uid"] for r in _rows(out, "select uid, url from download")}
    for name, n in FACES.items():
        meta = json.loads(curated[uid_of[name]]["json"])
        assert meta["faces_blurred"] == n and meta["face_bboxes"] == faces[name]["face_bboxes"]
        before, after = source[uid_of[name]]["jpg"], curated[uid_of[name]]["jpg"]
        if n == 0:
            assert after == before  # no face: the bytes are copied as they were
            continue
        inside, outside = _inside_outside(_decode(before), _decode(after), meta["face_bboxes"][0])
        assert inside > 5 and outside < 1.5, (name, inside, outside)
    params = json.loads((curated_dir / "reshard.json").read_text())
    assert params["blur_faces"] is True and params["faces_blurred"] == 3
    # a policy by n_faces keeps the photos without a face
    no_faces = _by_uid(layout.curated_dir("no-faces"))
    assert set(no_faces) == {uid_of["chelsea"], uid_of["coffee"]}
    blurred_tars = {p.name: p.read_bytes() for p in curated_dir.glob("*.tar")}

    # blurring switched off: the curated shards are redone, every image as downloaded
    _curate(*common, "--config", str(_config(tmp_path / "plain.toml", False)))
    plain = _by_uid(curated_dir)
    assert all(plain[u]["jpg"] == source[u]["jpg"] for u in plain) and "faces_blurred" not in json.loads(
        plain[uid_of["astronaut"]]["json"])
    assert json.loads((curated_dir / "reshard.json").read_text())["blur_faces"] is False
    # and on again: byte for byte the first blurred shards
    _curate(*common, "--config", str(tmp_path / "blur.toml"))
    assert {p.name: p.read_bytes() for p in curated_dir.glob("*.tar")} == blurred_tars


def test_a_pools_own_face_boxes_are_used_and_no_detector_runs(ray_local, served, tmp_path):
    """A DataComp-shaped list with face_bboxes: they arrive as source_face_bboxes, the faces step
    imports them (face_source "pool"), and the blur uses them. The pool's boxes differ from what
    MTCNN finds on purpose: none on the astronaut (MTCNN finds one), one on the cat."""
    host = served["host"]
    pool_boxes = {"astronaut": [], "chelsea": [[0.1, 0.2, 0.4, 0.6]], "coffee": None}
    names = list(pool_boxes)
    pq.write_table(pa.table({
        "uid": [hashlib.md5(n.encode()).hexdigest() for n in names],
        "url": [f"{host}/{n}.jpg" for n in names],
        "text": [f"a photo: {n}" for n in names],
        "face_bboxes": pa.array([pool_boxes[n] for n in names], pa.list_(pa.list_(pa.float64()))),
    }), tmp_path / "pool.parquet")
    out = tmp_path / "out"
    _curate("--dataset", "datacomp", "--url-list", str(tmp_path / "pool.parquet"), "--output", str(out),
            "--config", str(_config(tmp_path / "blur.toml", True)), "--policies", "all",
            "--stages", "download,faces,filter,reshard")

    rows = {r["url"].rsplit("/", 1)[1][:-4]: r for r in _rows(
        out, "select url, source_face_bboxes, face_bboxes, n_faces, face_status, face_error, face_source, face_engine, "
             "face_device from samples")}
    assert {r["face_source"] for r in rows.values()} == {"pool"}
    assert all(r["face_engine"].startswith("imported") and r["face_device"] is None for r in rows.values())
    for name, boxes in pool_boxes.items():
        assert rows[name]["source_face_bboxes"] == boxes
        assert rows[name]["face_bboxes"] == boxes and rows[name]["n_faces"] == (None if boxes is None else len(boxes))
    assert rows["coffee"]["face_status"] == "failed" and "lists no face_bboxes" in rows["coffee"]["face_error"]

    layout = RunLayout(out)
    source, curated = _by_uid(layout.shards_dir), _by_uid(layout.curated_dir("all"))
    uid_of = {r["url"].rsplit("/", 1)[1][:-4]: r["uid"] for r in _rows(out, "select uid, url from download")}
    cat = uid_of["chelsea"]
    assert json.loads(curated[cat]["json"])["faces_blurred"] == 1
    inside, outside = _inside_outside(_decode(source[cat]["jpg"]), _decode(curated[cat]["jpg"]), pool_boxes["chelsea"][0])
    assert inside > 3 and outside < 1.5, (inside, outside)
    assert curated[uid_of["astronaut"]]["jpg"] == source[uid_of["astronaut"]]["jpg"]  # the pool says no face: not blurred
    assert json.loads(curated[uid_of["coffee"]]["json"])["face_bboxes"] is None
    assert read_table(layout.stage_dir("faces")).num_rows == 3
