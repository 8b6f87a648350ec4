"""A static, self-contained HTML report of a run: ``<root>/report/index.html``.

Everything a person would rather look at than query: counts per stage and failures by reason,
the parrot statistics, histograms of the scores, kept/dropped counts per policy, and grids of kept
and dropped images per policy with the OCR boxes drawn and captions shown. Images and plots are
inlined as data URIs, so the one file can be mailed or opened from a bucket.
"""

from __future__ import annotations

import base64
import html
import io
import tarfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import duckdb

from manifests.catalog import connect
from manifests.store import RunLayout, read_bytes, tar_key, write_bytes_atomic

GRID_SIZE = 8  # images per kept / dropped grid
THUMB = 200  # longest side of a grid thumbnail, px


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _histograms(con: duckdb.DuckDBPyConnection, columns: list[str]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [c for c in columns if c in _columns(con)]
    if not present:
        return ""
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3), squeeze=False)
    for ax, column in zip(axes[0], present):
        values = [v for (v,) in con.execute(f"select {column} from samples where {column} is not null").fetchall()]
        ax.hist(values, bins=30, color="#3b6ea5")
        ax.set_title(column)
        ax.set_ylabel("samples")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return f'<img class="plot" alt="histograms" src="{_data_uri(buf.getvalue(), "image/png")}">'


def _columns(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {r[0] for r in con.execute("select column_name from (describe samples)").fetchall()}


def _table(headers: list[str], rows: list[tuple[Any, ...]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _fetch_images(layout: RunLayout, wanted: list[tuple[str, str]]) -> dict[tuple[str, str], bytes]:
    """JPEG bytes of (shard, key) pairs, scanning each needed tar once."""
    by_shard: dict[str, set[str]] = defaultdict(set)
    for shard, key in wanted:
        by_shard[shard].add(key)
    found: dict[tuple[str, str], bytes] = {}
    for shard, keys in by_shard.items():
        path = layout.shards_dir / f"{shard}.tar"
        if not path.exists():
            continue
        with tarfile.open(fileobj=io.BytesIO(read_bytes(path))) as tar:
            for member in tar:
                key, ext = tar_key(member.name)
                if ext == "jpg" and key in keys:
                    found[(shard, key)] = tar.extractfile(member).read()
    return found


def _thumbnail(data: bytes, quads: list | None) -> str:
    """The image with its OCR boxes drawn; a grey tile saying so when the bytes do not decode
    (a report must render whatever the shards hold: the failure is already a row with its reason)."""
    from PIL import Image, ImageDraw

    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
    except Exception:  # noqa: BLE001 - any undecodable bytes
        image = Image.new("RGB", (THUMB, THUMB), (200, 200, 200))
        ImageDraw.Draw(image).text((10, THUMB // 2 - 6), "image does not decode", fill=(90, 0, 0))
        quads = None
    draw = ImageDraw.Draw(image)
    for quad in quads or []:
        draw.polygon([tuple(p) for p in quad], outline=(255, 0, 0), width=3)
    image.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return _data_uri(buf.getvalue(), "image/jpeg")


def _grid(layout: RunLayout, rows: list[dict[str, Any]]) -> str:
    images = _fetch_images(layout, [(r["shard"], r["key"]) for r in rows])
    cells = []
    for r in rows:
        data = images.get((r["shard"], r["key"]))
        if data is None:
            continue
        label = html.escape(r["caption"][:90])
        detail = html.escape(
            f"parrot {_fmt(r.get('parrot_score'))} · clip {_fmt(r.get('clip_score'))} · "
            f"masked {_fmt(r.get('clip_score_masked'))} · ocr: {r.get('ocr_text') or '—'}"[:160]
        )
        reason = html.escape(r.get("reason") or "")
        cells.append(
            f'<figure><img alt="{label}" src="{_thumbnail(data, r.get("quads"))}">'
            f"<figcaption><b>{label}</b><br><small>{detail}</small><br><i>{reason}</i></figcaption></figure>"
        )
    return '<div class="grid">' + "".join(cells) + "</div>" if cells else "<p>(none)</p>"


MATCH_LIMIT = 24  # matched pairs shown in the report


def _decontamination(layout: RunLayout, con: duckdb.DuckDBPyConnection) -> str:
    """Counts by tier and set, then each match (up to MATCH_LIMIT, nearest first) beside its evaluation image."""
    from sources.eval_sets import image_files
    from stages.decontaminate import eval_images

    counts = con.execute("select eval_match.set, eval_match.tier, count(*) from decontaminate where eval_match is not null "
                         "group by all order by 1, 2").fetchall()
    if not counts:
        return "<p>No sample matches an evaluation image.</p>"
    rows = _rows(con, "select d.uid, d.eval_match.set as eval_set, d.eval_match.image as eval_image, d.eval_match.tier as tier, "
                      "d.eval_match.distance as distance, s.shard, s.key, s.caption from decontaminate d join samples s using (uid) "
                      f"where d.eval_match is not null order by distance, uid limit {MATCH_LIMIT}")
    pool = _fetch_images(layout, [(r["shard"], r["key"]) for r in rows])
    wanted: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        wanted[r["eval_set"]].add(r["eval_image"])
    evals = {(label, name): data for label, names in wanted.items() for name, data in eval_images(label, names, image_files).items()}
    cells = []
    for r in rows:
        mine, theirs = pool.get((r["shard"], r["key"])), evals.get((r["eval_set"], r["eval_image"]))
        pictures = "".join(f'<img alt="{alt}" src="{_thumbnail(data, None)}">' for alt, data in (("pool", mine), ("eval", theirs))
                           if data is not None)
        detail = html.escape(f"{r['tier']} {_fmt(r['distance'])} · {r['eval_set']} {r['eval_image']}")
        cells.append(f'<figure class="pair">{pictures}<figcaption><b>{html.escape((r["caption"] or "")[:90])}</b>'
                     f"<br><small>{detail}</small></figcaption></figure>")
    return (_table(["evaluation set", "tier", "samples"], counts)
            + "<p>Pool sample (left) and the evaluation image it matches (right), nearest first.</p>"
            + '<div class="grid">' + "".join(cells) + "</div>")


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    result = con.execute(sql, params or [])
    names = [d[0] for d in result.description]
    return [dict(zip(names, row)) for row in result.fetchall()]


CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f0f3f7}pre{background:#f7f7f7;padding:1em;overflow-x:auto}
.grid{display:flex;flex-wrap:wrap;gap:10px}figure{width:220px;margin:0;font-size:12px}
figure img{max-width:200px;max-height:200px;display:block;border:1px solid #ddd}
figure.pair{width:430px}figure.pair img{display:inline-block;margin-right:6px}
.plot{max-width:100%}h2{border-bottom:2px solid #3b6ea5;padding-bottom:.2em}
"""

# After load, the page records on <body> how many images failed to decode and any script errors,
# so a headless browser's DOM dump tells whether the report rendered completely.
SELF_CHECK = """<script>
window.addEventListener('error', function (e) { document.body.dataset.jsErrors = (e.message || 'error'); });
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  document.body.dataset.images = imgs.length;
  document.body.dataset.brokenImages = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; }).length;
  document.body.dataset.loaded = 'yes';
});
</script>"""


def write_report(layout: RunLayout, extra_sections: list[tuple[str, str]] | None = None) -> Path:
    """Render the report from the catalog; returns the path of index.html."""
    from pipeline.stats import parrot_stats

    if "download" not in layout.stages_present():  # no shard finished (e.g. the disk was full)
        target = layout.report_dir / "index.html"
        write_bytes_atomic(b"<!doctype html><meta charset='utf-8'><title>Curation report</title>"
                           b"<h1>Curation report</h1><p>No shard has finished downloading yet.</p>", target)
        return target
    con = connect(layout.catalog_path, layout)
    try:
        columns = _columns(con)
        sections: list[tuple[str, str]] = []
        status = con.execute("select status, count(*) from download group by 1 order by 1 desc").fetchall()
        failures = con.execute(
            "select error_kind, count(*), min(url), min(error) from download where status <> 'ok' group by 1 order by 2 desc"
        ).fetchall()
        stage_rows = []
        for stage in [s for s in ("ocr", "parrot", "clip_score") if s in layout.stages_present()]:
            col = f"{stage.split('_')[0]}_status"
            ok, failed = con.execute(
                f"select count(*) filter (where {col} = 'ok'), count(*) filter (where {col} <> 'ok') from {stage}"
            ).fetchone()
            stage_rows.append((stage, ok, failed))
        body = _table(["download status", "samples"], status)
        body += _table(["failure reason", "samples", "example url", "example error"], failures)
        if stage_rows:
            body += _table(["stage", "ok", "failed"], stage_rows)
        sections.append(("Counts per stage", body))
        if "parrot_score" in columns:
            sections.append(("Parrot statistics", f"<pre>{html.escape(parrot_stats(layout).format())}</pre>"))
        plots = _histograms(con, ["text_area_ratio", "parrot_score", "clip_score", "clip_score_masked"])
        if plots:
            sections.append(("Score distributions", plots))
        try:
            policies = con.execute(
                "select policy, count(*) filter (where kept), count(*) filter (where not kept) from selections "
                "group by 1 order by 1"
            ).fetchall()
        except duckdb.CatalogException:
            policies = []
        if policies:
            body = _table(["policy", "kept", "dropped"], policies)
            for policy, _, _ in policies:
                for kept in (True, False):
                    rows = _rows(
                        con,
                        "select s.*, sel.reason from samples s join selections sel using (uid) "
                        f"where sel.policy = ? and sel.kept = ? order by hash(uid) limit {GRID_SIZE}",
                        [policy, kept],
                    )
                    body += f"<h3>{html.escape(policy)}: {'kept' if kept else 'dropped'}</h3>" + _grid(layout, rows)
            sections.append(("Policies", body))
        if "decontaminate" in layout.stages_present():
            sections.append(("Decontamination: pool samples that copy an evaluation image", _decontamination(layout, con)))
        ablation = layout.root / "ablation" / "section.html"  # written by `python -m pipeline ablation`
        if ablation.exists():
            sections.append(("Ablation: CLIP trained on each policy's samples", ablation.read_text(encoding="utf-8")))
        for title, content in extra_sections or []:
            sections.append((title, content))
    finally:
        con.close()
    nav = "".join(f'<li><a href="#s{i}">{html.escape(t)}</a></li>' for i, (t, _) in enumerate(sections))
    content = "".join(f'<h2 id="s{i}">{html.escape(t)}</h2>{c}' for i, (t, c) in enumerate(sections))
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Curation report: {html.escape(str(layout.root))}"
        f"</title><style>{CSS}</style></head><body><h1>Curation report</h1><p>{html.escape(str(layout.root))}"
        f"</p><ul>{nav}</ul>{content}{SELF_CHECK}</body></html>"
    )
    target = layout.report_dir / "index.html"
    write_bytes_atomic(page.encode("utf-8"), target)
    if layout.remote:  # beside the run too, for whoever reads the bucket (the page is self-contained)
        write_bytes_atomic(page.encode("utf-8"), layout.root / "report" / "index.html")
    return target
