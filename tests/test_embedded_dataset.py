"""Tests for the synthetic embedded-text dataset and its local HTTP server.

They check the properties later stages rely on: determinism, the text/caption mix,
exact and tight ground-truth boxes, and the failure modes the server must produce.
"""

from __future__ import annotations

import collections
import io
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from sources import embedded as E
from sources.embedded import (
    BACKGROUNDS,
    BROKEN_KINDS,
    CLASS_WORD_TEXT_FRACTION,
    CLASSES,
    COMMON_BACKGROUND,
    PARROT_FILLERS,
    TEXT_VOCABULARY,
    EmbeddedSample,
    EmbeddedServer,
    caption_tokens,
    generate,
    ground_truth_table,
)

PREVIEW_PATH = Path("/tmp/embedded_preview.png")


_TIMING: dict[str, float] = {}


@pytest.fixture(scope="module")
def samples() -> list[EmbeddedSample]:
    E._font_dir()  # the matplotlib import is a one-off cost, not per-sample work
    t0 = time.process_time()
    out = generate(300, seed=0)
    _TIMING["cpu_s"] = time.process_time() - t0
    return out


def _lower_words(s: EmbeddedSample) -> set[str]:
    return {w.lower() for w in s.words}


def _aabb(quad) -> tuple[float, float, float, float]:
    xs = [p[0] for p in quad]
    ys = [p[1] for p in quad]
    return min(xs), min(ys), max(xs), max(ys)


# --------------------------------------------------------------------------- determinism


def test_generate_is_deterministic_and_seed_dependent() -> None:
    a = generate(16, seed=7)
    b = generate(16, seed=7)
    assert a == b  # dataclass equality covers image bytes, captions and ground truth
    assert [s.image for s in a] == [s.image for s in b]
    c = generate(16, seed=8)
    assert [s.image for s in a] != [s.image for s in c]
    assert sum(x.image != y.image for x, y in zip(a, c)) >= 14
    # sample i depends only on (seed, i): a shorter run is a prefix of a longer one
    assert generate(5, seed=7) == a[:5]
    assert [s.sample_id for s in a] == [f"s{i:06d}" for i in range(16)]


def test_generate_300_is_fast(samples: list[EmbeddedSample]) -> None:
    # CPU time rather than wall time: the budget is 20 s on 2 cores and other test
    # processes may share the machine.
    assert len(samples) == 300
    assert _TIMING["cpu_s"] < 20.0, _TIMING


# --------------------------------------------------------------------------- content mix


def test_text_share_and_caption_kinds(samples: list[EmbeddedSample]) -> None:
    share = sum(s.has_text for s in samples) / len(samples)
    assert 0.45 <= share <= 0.65, share
    for s in samples:
        assert s.caption_kind in ("descriptive", "parrot", "mixed")
        assert s.has_text == bool(s.words) == bool(s.boxes)
        if not s.has_text:
            assert s.caption_kind == "descriptive"
    text = [s for s in samples if s.has_text]
    kinds = collections.Counter(s.caption_kind for s in text)
    assert 0.25 <= kinds["parrot"] / len(text) <= 0.55, kinds
    assert 0.15 <= kinds["mixed"] / len(text) <= 0.45, kinds
    assert 0.15 <= kinds["descriptive"] / len(text) <= 0.45, kinds


def test_parrot_captions_spell_the_image_text(samples: list[EmbeddedSample]) -> None:
    parrots = [s for s in samples if s.caption_kind == "parrot"]
    assert parrots
    for s in parrots:
        assert s.has_text
        toks = caption_tokens(s.caption)
        words = _lower_words(s)
        foreign = [t for t in toks if t not in words]
        assert len(foreign) <= 1 and all(t in PARROT_FILLERS for t in foreign), (s.caption, s.words)
        covered = sum(w.lower() in toks for w in s.words) / len(s.words)
        assert covered >= 0.5, (s.caption, s.words)


def test_descriptive_captions_never_spell_the_text(samples: list[EmbeddedSample]) -> None:
    """Class words included: a descriptive caption never names the class written in the image."""
    desc = [s for s in samples if s.caption_kind == "descriptive"]
    with_text = [s for s in desc if s.has_text]
    assert with_text, "descriptive captions on text images are needed to test parrot scoring"
    for s in desc:
        assert not set(caption_tokens(s.caption)) & _lower_words(s), (s.caption, s.words)
        # they do describe the drawn object (class name or a synonym from the templates)
        assert set(caption_tokens(s.caption)) & set(sum(map(list, E._CLASS_PHRASES.values()), []))


def test_mixed_captions_contain_description_and_some_text(samples: list[EmbeddedSample]) -> None:
    mixed = [s for s in samples if s.caption_kind == "mixed"]
    assert mixed
    for s in mixed:
        toks = caption_tokens(s.caption)
        words = _lower_words(s)
        assert any(t in words for t in toks), (s.caption, s.words)
        assert any(t not in words for t in toks), (s.caption, s.words)


def test_vocabulary_is_large_and_disjoint_from_description_words() -> None:
    assert len(TEXT_VOCABULARY) >= 150
    assert not set(TEXT_VOCABULARY) & E._CAPTION_VOCAB
    assert all(w.isalpha() and w.islower() for w in TEXT_VOCABULARY)


def test_words_come_from_vocabulary_with_varied_case(samples: list[EmbeddedSample]) -> None:
    all_words = [w for s in samples for w in s.words]
    for s in samples:  # the one deliberate exception is the class word
        assert _lower_words(s) - {s.text_class} <= set(TEXT_VOCABULARY), (s.words, s.text_class)
    assert any(w.isupper() for w in all_words)
    assert any(w.istitle() for w in all_words)
    assert len({w.lower() for w in all_words}) >= 100


def test_classes_backgrounds_and_spurious_correlation(samples: list[EmbeddedSample]) -> None:
    assert len(CLASSES) == 8 and set(COMMON_BACKGROUND) == set(CLASSES)
    assert set(COMMON_BACKGROUND.values()) <= set(BACKGROUNDS)
    assert {s.object_class for s in samples} == set(CLASSES)
    assert {s.background for s in samples} == set(BACKGROUNDS)
    common = sum(s.background == COMMON_BACKGROUND[s.object_class] for s in samples) / len(samples)
    assert 0.7 <= common <= 0.9, common


def test_some_text_names_another_class(samples: list[EmbeddedSample]) -> None:
    """Class words are what can teach a CLIP to read: written once, never the drawn class, never
    in a description of the image, and spelled by parrot captions."""
    text = [s for s in samples if s.has_text]
    named = [s for s in text if s.text_class is not None]
    assert abs(len(named) / len(text) - CLASS_WORD_TEXT_FRACTION) <= 0.1, len(named) / len(text)
    assert {s.text_class for s in named} == set(CLASSES)
    assert all(s.text_class is None for s in samples if not s.has_text)
    for s in named:
        assert s.text_class != s.object_class
        lower = [w.lower() for w in s.words]
        assert lower.count(s.text_class) == 1, s.words
        assert not set(lower) & (set(CLASSES) - {s.text_class})
        # it leads its region, so shortening a phrase to fit never drops it
        assert any(t.split()[0].lower() == s.text_class for t in s.box_texts), s.box_texts
        if s.caption_kind == "parrot":
            assert s.text_class in caption_tokens(s.caption), s.caption
        # a caption says it at most once, when spelling the text: the descriptive half of a
        # mixed caption never does (descriptive captions are checked with all words below)
        assert caption_tokens(s.caption).count(s.text_class) <= 1, s.caption
    for s in text:
        if s.text_class is None:
            assert not {w.lower() for w in s.words} & set(CLASSES)
    assert sum(s.caption_kind == "parrot" for s in named) >= 20
    # "house" is said by the indoor phrase "inside a house": never written on indoor images
    assert all(s.text_class != "house" for s in named if s.background == "indoor")
    assert "house" not in E._class_word_choices("apple", "indoor")


def _class_word_heights(samples: list[EmbeddedSample]) -> list[float]:
    """Height of each class word's box (tight around its ink) / the image's shorter side."""
    heights = []
    for s in samples:
        if s.text_class is not None:
            region = next(k for k, t in enumerate(s.box_texts) if t.split()[0].lower() == s.text_class)
            ys = [p[1] for p in s.boxes[region]]
            heights.append((max(ys) - min(ys)) / min(s.width, s.height))
    return heights


def test_generator_settings_change_the_proportions_and_the_defaults_change_nothing() -> None:
    """The ablation draws its dataset with other proportions: each field does what it says, and the
    defaults are the dataset every other test knows (same bytes)."""
    assert generate(12, seed=3, settings=E.DEFAULT_SETTINGS) == generate(12, seed=3)
    assert E.GeneratorSettings() == E.DEFAULT_SETTINGS
    settings = E.GeneratorSettings(text_fraction=0.9, class_word_fraction=1.0, class_word_cap=(0.15, 0.2),
                                   parrot_fraction=0.6, mixed_fraction=0.3, mixed_quotes_class_word=True)
    drawn = generate(120, seed=3, settings=settings)
    text = [s for s in drawn if s.has_text]
    assert len(text) >= 0.8 * len(drawn)
    assert sum(s.text_class is not None for s in text) >= 0.9 * len(text)
    kinds = collections.Counter(s.caption_kind for s in text)
    assert kinds["parrot"] >= 0.45 * len(text) and 0.15 * len(text) <= kinds["mixed"] <= 0.45 * len(text), kinds
    quoted = [s for s in text if s.caption_kind == "mixed" and s.text_class is not None]
    assert quoted and all(s.text_class in caption_tokens(s.caption) for s in quoted)
    big, usual = _class_word_heights(drawn), _class_word_heights(generate(120, seed=3))
    # placing a long word shrinks it to fit, so the median grows less than the range: 1.28x here
    assert np.median(big) >= 1.2 * np.median(usual), (np.median(big), np.median(usual))
    for bad in (E.GeneratorSettings(text_fraction=1.5), E.GeneratorSettings(parrot_fraction=0.8, mixed_fraction=0.3),
                E.GeneratorSettings(class_word_cap=(0.2, 0.1))):
        with pytest.raises(ValueError):
            generate(1, settings=bad)


def test_objects_and_class_words_lie_in_the_central_square() -> None:
    """CLIP's transforms centre-crop to a square: what must be learnt has to survive the crop."""
    seen = 0
    for i in range(80):
        s, scene = E._make_sample(0, i)
        x0, y0, x1, y1 = E.central_square(s.width, s.height)
        ox0, oy0, ox1, oy1 = scene.object_box
        assert x0 <= ox0 and ox1 <= x1 and y0 <= oy0 and oy1 <= y1, (s.sample_id, scene.object_box)
        assert ox1 - ox0 >= 0.45 * 1.1 * min(s.width, s.height) - 1e-6
        for r in scene.regions:
            if s.text_class in (w.lower() for w in r.words):
                fx0, fy0, fx1, fy1 = r.footprint
                assert x0 <= fx0 and fx1 <= x1 and y0 <= fy0 and fy1 <= y1, (s.sample_id, r.text)
                height = np.linalg.norm(np.subtract(r.quad[3], r.quad[0]))
                assert height >= 0.05 * min(s.width, s.height), (r.text, height)
                seen += 1
    assert seen >= 10


# --------------------------------------------------------------------------- images and boxes


def test_jpegs_decode_to_declared_size(samples: list[EmbeddedSample]) -> None:
    sizes = set()
    for s in samples:
        assert s.image[:2] == b"\xff\xd8"
        im = Image.open(io.BytesIO(s.image))
        assert im.format == "JPEG"
        im.load()
        assert im.size == (s.width, s.height)
        assert 320 <= min(im.size) and max(im.size) <= 512
        sizes.add(im.size)
    assert len(sizes) >= 4  # aspect ratios vary


def test_boxes_are_quads_inside_image_and_disjoint(samples: list[EmbeddedSample]) -> None:
    rotated = 0
    for s in samples:
        assert len(s.boxes) == len(s.box_texts)
        assert " ".join(s.box_texts).split() == list(s.words)
        assert all(1 <= len(t.split()) <= 3 for t in s.box_texts)
        assert len(s.boxes) <= 3
        for quad, text in zip(s.boxes, s.box_texts):
            assert len(quad) == 4 and all(len(p) == 2 for p in quad)
            for x, y in quad:
                assert 0.0 <= x <= s.width and 0.0 <= y <= s.height, (s.sample_id, quad)
            q = np.asarray(quad, dtype=float)
            # clockwise on screen (y down) => positive shoelace area; first edge = reading direction
            area = 0.5 * sum(q[i, 0] * q[(i + 1) % 4, 1] - q[(i + 1) % 4, 0] * q[i, 1] for i in range(4))
            assert area > 0, quad
            dx, dy = q[1] - q[0]
            angle = np.degrees(np.arctan2(-dy, dx))
            assert abs(angle) <= 25.5 and dx > 0, (quad, angle)
            rotated += abs(angle) > 1
            height = np.linalg.norm(q[3] - q[0])
            assert 10 <= height <= 100, (text, height)
        boxes = [_aabb(q) for q in s.boxes]
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                disjoint = a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
                assert disjoint, (s.sample_id, s.box_texts)
    assert rotated >= 20  # some rotated text exists


def test_boxes_are_tight_around_rendered_ink() -> None:
    """Compare each quad with the exact text ink mask the generator rendered."""
    checked = 0
    for i in range(60):
        s, scene = E._make_sample(0, i, debug=True)
        if not s.has_text:
            continue
        ys, xs = np.nonzero(np.asarray(scene.ink) >= 128)
        pts = np.stack([xs + 0.5, ys + 0.5], axis=1)
        claimed = np.zeros(len(pts), dtype=bool)
        for quad in s.boxes:
            q = np.asarray(quad, dtype=float)
            u, v = q[1] - q[0], q[3] - q[0]
            lu, lv = np.linalg.norm(u), np.linalg.norm(v)
            a = (pts - q[0]) @ (u / lu)
            b = (pts - q[0]) @ (v / lv)
            inside = (a > -2) & (a < lu + 2) & (b > -2) & (b < lv + 2)
            assert inside.any(), (s.sample_id, quad)
            claimed |= inside
            gaps = (a[inside].min(), lu - a[inside].max(), b[inside].min(), lv - b[inside].max())
            assert max(abs(g) for g in gaps) <= 2.5, (s.sample_id, s.box_texts, gaps)
            checked += 1
        assert claimed.all(), f"{s.sample_id}: ink outside every box"
    assert checked >= 30


def test_contact_sheet_preview(samples: list[EmbeddedSample]) -> None:
    sheet = E.render_preview(samples[:24])
    sheet.save(PREVIEW_PATH)
    assert PREVIEW_PATH.stat().st_size > 10_000
    assert sheet.size[0] >= 6 * 200


# --------------------------------------------------------------------------- ground truth table


def test_ground_truth_table(samples: list[EmbeddedSample]) -> None:
    base = "http://127.0.0.1:8710/"
    table = ground_truth_table(samples, base)
    assert table.num_rows == len(samples)
    assert table.column_names == [
        "url", "caption", "caption_kind", "has_text", "words", "boxes", "box_texts",
        "object_class", "background", "width", "height", "text_class",
    ]
    assert table.schema.field("boxes").type == pa.list_(pa.list_(pa.list_(pa.float64())))
    assert table.schema.field("words").type == pa.list_(pa.string())
    rows = table.to_pylist()
    for s, row in zip(samples, rows):
        assert row["url"] == f"http://127.0.0.1:8710/images/{s.sample_id}.jpg"
        assert row["caption"] == s.caption and row["words"] == list(s.words)
        assert row["boxes"] == [[list(p) for p in quad] for quad in s.boxes]
        assert (row["width"], row["height"]) == (s.width, s.height)
        assert row["text_class"] == s.text_class
    assert len(set(table.column("url").to_pylist())) == len(samples)


# --------------------------------------------------------------------------- HTTP server


def _get(url: str, timeout: float = 5.0) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), err.read()


def test_server_serves_images_and_failure_modes(samples: list[EmbeddedSample], capfd: pytest.CaptureFixture) -> None:
    subset = samples[:6]
    with EmbeddedServer(subset, slow_seconds=3.0) as srv:
        assert srv.base_url.startswith("http://127.0.0.1:")
        rows = srv.url_rows()
        assert rows == srv.url_rows()
        assert len(rows) == len(subset) + 2 * len(BROKEN_KINDS)
        assert [r["url"] for r in rows[: len(subset)]] == [
            f"{srv.base_url}/images/{s.sample_id}.jpg" for s in subset]
        assert all(r["caption"] for r in rows)
        assert [r["caption"] for r in rows[: len(subset)]] == [s.caption for s in subset]
        broken = [r["url"] for r in rows[len(subset):]]
        assert broken == [f"{srv.base_url}/broken/{p}-{i}.jpg" for p in ("missing", "slow", "corrupt", "page")
                          for i in range(2)]

        status, ctype, body = _get(rows[2]["url"])
        assert (status, ctype, body) == (200, "image/jpeg", subset[2].image)

        assert _get(f"{srv.base_url}/broken/missing-0.jpg")[0] == 404
        assert _get(f"{srv.base_url}/images/s999999.jpg")[0] == 404
        assert _get(f"{srv.base_url}/nothing/here")[0] == 404

        status, ctype, body = _get(f"{srv.base_url}/broken/corrupt-1.jpg")
        real = subset[1].image
        assert status == 200 and ctype == "image/jpeg"
        assert 0 < len(body) < len(real) and real.startswith(body)
        with pytest.raises(OSError):
            Image.open(io.BytesIO(body)).load()

        status, ctype, body = _get(f"{srv.base_url}/broken/page-0.jpg")
        assert status == 200 and ctype.startswith("text/html") and b"<html" in body

        t0 = time.perf_counter()
        with pytest.raises((socket.timeout, TimeoutError, urllib.error.URLError)):
            _get(f"{srv.base_url}/broken/slow-0.jpg", timeout=0.5)
        assert time.perf_counter() - t0 < 2.0

    out, err = capfd.readouterr()
    assert err == ""  # the server logs nothing


def test_slow_url_eventually_delivers_a_jpeg(samples: list[EmbeddedSample]) -> None:
    with EmbeddedServer(samples[:2], slow_seconds=0.4) as srv:
        t0 = time.perf_counter()
        status, ctype, body = _get(f"{srv.base_url}/broken/slow-1.jpg", timeout=5.0)
        assert time.perf_counter() - t0 >= 0.35
    assert status == 200 and ctype == "image/jpeg"
    Image.open(io.BytesIO(body)).load()


def test_server_shutdown_is_prompt_with_slow_request_in_flight(samples: list[EmbeddedSample]) -> None:
    srv = EmbeddedServer(samples[:2], slow_seconds=30.0).__enter__()
    url = f"{srv.base_url}/broken/slow-0.jpg"
    result: dict[str, object] = {}

    def fetch() -> None:
        try:
            result["resp"] = _get(url, timeout=10.0)
        except Exception as exc:  # noqa: BLE001 - any failure is fine, we only time shutdown
            result["exc"] = exc

    t = threading.Thread(target=fetch, daemon=True)
    t.start()
    time.sleep(0.3)  # request is now sleeping inside the handler
    t0 = time.perf_counter()
    srv.__exit__(None, None, None)
    assert time.perf_counter() - t0 < 1.5
    t.join(timeout=5.0)
    assert not t.is_alive()
    assert "resp" not in result or result["resp"][0] != 200  # type: ignore[index]


def test_url_rows_need_only_an_address(samples: list[EmbeddedSample]) -> None:
    """Callers may plan rows for a fixed port before the server runs (no live socket needed)."""
    srv = EmbeddedServer(samples[:3], port=8710)
    with pytest.raises(RuntimeError):
        srv.url_rows()
    srv.base_url = "http://127.0.0.1:8710"
    rows = srv.url_rows()
    assert rows[0] == {"url": f"http://127.0.0.1:8710/images/{samples[0].sample_id}.jpg", "caption": samples[0].caption}
    assert len(rows) == 3 + 2 * len(BROKEN_KINDS)


def test_busy_port_raises_oserror(samples: list[EmbeddedSample]) -> None:
    with EmbeddedServer(samples[:1]) as first:
        with pytest.raises(OSError):
            EmbeddedServer(samples[:1], port=first.port).__enter__()
