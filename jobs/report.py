"""``aejob report DST``: one self-contained HTML page about a dataset made by ``aejob clean`` or
``aejob compress`` (local or s3://).

What it shows: every run from ``DST/_runs/*.json`` with its counts (new / changed / unchanged /
deleted / failed where the run recorded them, else ok / error rows), the error messages
grouped with counts and example keys, throughput over each run (an SVG chart of the run's
``progress`` points, or the run's mean rows/s when it has none), and samples: for ``clean``
the cleaned image beside its source (when the source is still readable), for ``compress``
the rate-distortion points (bpp vs PSNR) and one decoded row; and a few near-duplicate and
content groups (``aejob dedup`` / ``aejob groups``) as thumbnails (``jobs/report_groups.py``).

Memory: the data is read with ``pyarrow.dataset`` one file and one batch at a time, only the
small columns; the image/latent column is read for the few sampled rows only, from the file
that holds them. Images are inlined as base64 thumbnails and charts as inline SVG, so the
page references no URL and can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer

from jobs import report_groups
from pipeline import layout, storage

logger = logging.getLogger(__name__)

REPORT_DIR = "_report"
REPORT_FILE = "report.html"
THUMB_PX = 192
MAX_RD_POINTS = 4000  # SVG size bound; a sample of the rows beyond that
EXAMPLE_KEYS = 3
RUN_COUNTS = ("new", "changed", "unchanged", "deleted", "failed")  # written by sync runs
SMALL_COLUMNS = ("key", "status", "error", "bpp", "psnr", "codec")


@dataclass
class Scan:
    """What one streaming pass over DST's small columns found."""

    rows: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    error_keys: dict[str, list[str]] = field(default_factory=dict)
    rd: list[tuple[float, float]] = field(default_factory=list)  # (bpp, psnr), compress only
    samples: dict[str, list[str]] = field(default_factory=dict)  # data file -> sampled ok keys
    files: int = 0


# ---- reading


def read_runs(dst: str) -> list[dict[str, Any]]:
    """The run manifests under DST/_runs, oldest first (unreadable ones are skipped, logged)."""
    runs = []
    for info in storage.list_files(storage.join(dst, layout.RUNS), recursive=False):
        if not info.base_name.endswith(".json"):
            continue
        uri = storage.join(dst, layout.RUNS, info.base_name)
        try:
            runs.append(json.loads(storage.read_bytes(uri)))
        except (OSError, ValueError) as e:
            logger.warning("skipping unreadable run record %s: %s", uri, e)
    return sorted(runs, key=lambda r: (str(r.get("finished_at", "")), str(r.get("run_id", ""))))


def _dataset(dst: str) -> Any:
    import pyarrow.dataset as pads

    fs, root = storage.resolve(dst)
    files = [f"{root}/{shard}{layout.DATA_SUFFIX}" for shard in layout.data_files(dst)]
    return pads.dataset(files, filesystem=fs, format="parquet")


def scan(dst: str, samples: int, job: str) -> Scan:
    """One pass over the small columns of every data file, a batch at a time."""
    import random

    out = Scan()
    ds = _dataset(dst)
    cols = [c for c in SMALL_COLUMNS if c in ds.schema.names]
    rng = random.Random(0)  # the same sample of RD points on every run of the report
    rd_seen = 0
    for frag in ds.get_fragments():
        out.files += 1
        for batch in frag.to_batches(columns=cols, batch_size=8192):
            d = batch.to_pydict()
            out.rows += batch.num_rows
            for i, status in enumerate(d["status"]):
                key = d["key"][i]
                if status != "ok":
                    msg = (d.get("error") or [None] * batch.num_rows)[i] or "(no message)"
                    out.errors[msg] += 1
                    keys = out.error_keys.setdefault(msg, [])
                    if len(keys) < EXAMPLE_KEYS:
                        keys.append(key)
                    continue
                out.ok += 1
                if job == "compress" and d.get("bpp") and d["bpp"][i] is not None and d["psnr"][i] is not None:
                    rd_seen += 1  # reservoir sample: bounded memory, every row equally likely
                    point = (float(d["bpp"][i]), float(d["psnr"][i]))
                    if len(out.rd) < MAX_RD_POINTS:
                        out.rd.append(point)
                    elif (j := rng.randrange(rd_seen)) < MAX_RD_POINTS:
                        out.rd[j] = point
                codec = (d.get("codec") or [None] * batch.num_rows)[i]
                if sum(map(len, out.samples.values())) < samples and codec != "original":
                    out.samples.setdefault(frag.path, []).append(key)
    return out


def _sample_rows(dst: str, sampled: dict[str, list[str]], column: str) -> list[dict[str, Any]]:
    """The sampled rows with their heavy column, read only from the files that hold them."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    fs, _ = storage.resolve(dst)
    rows: list[dict[str, Any]] = []
    for path, keys in sampled.items():
        ds = pads.dataset(path, filesystem=fs, format="parquet")
        cols = [c for c in ("key", "source_uri", column, "bpp", "psnr", "checkpoint_sha256")
                if c in ds.schema.names]
        rows += ds.to_table(columns=cols, filter=pc.field("key").isin(keys)).to_pylist()
    return rows


# ---- images


def _thumb(img: Any) -> str:
    """A PIL image or uint8 array as an inline PNG data URI, at most THUMB_PX on a side."""
    from PIL import Image

    if not isinstance(img, Image.Image):
        img = Image.fromarray(img)
    img = img.convert("RGB")
    img.thumbnail((THUMB_PX, THUMB_PX))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _decode(data: bytes) -> Any:
    from PIL import Image, ImageOps

    img = Image.open(io.BytesIO(data))
    img.load()
    return ImageOps.exif_transpose(img)


def _img_tag(uri: str | None, alt: str) -> str:
    if not uri:
        return f'<div class="missing">{html.escape(alt)}</div>'
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def clean_samples(dst: str, sc: Scan, src: str) -> list[dict[str, str | None]]:
    out = []
    for row in _sample_rows(dst, sc.samples, "image"):
        after = _thumb(_decode(row["image"])) if row.get("image") else None
        before = None
        source = row.get("source_uri") or (storage.join(src, row["key"]) if src else "")
        try:  # the source may be gone, moved, or a member of a tar shard
            before = _thumb(_decode(storage.read_bytes(source))) if source else None
        except Exception as e:
            logger.info("source of %s not readable (%s): no before image", row["key"], e)
        out.append({"key": row["key"], "before": before, "after": after})
    return out


def compress_sample(dst: str, sc: Scan, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """One row decoded with the codec that wrote it."""
    from jobs.compress import checkpoint_for
    from models.codec import CodecEngine

    rows = _sample_rows(dst, {p: k[:1] for p, k in list(sc.samples.items())[:1]}, "latent")
    if not rows:
        return None
    row = rows[0]
    try:
        shas = {row["checkpoint_sha256"]} if row.get("checkpoint_sha256") else set()
        engine = CodecEngine(checkpoint_for(manifest, shas))
        decoded = engine.decompress(row["latent"])
    except Exception as e:  # a report never fails on one row: say why instead
        logger.warning("could not decode %s: %s", row["key"], e)
        return {"key": row["key"], "image": None, "error": str(e), "bpp": row.get("bpp"), "psnr": row.get("psnr")}
    return {"key": row["key"], "image": _thumb(decoded), "error": None, "bpp": row.get("bpp"),
            "psnr": row.get("psnr"), "bytes": len(row["latent"])}


# ---- SVG charts (inline, no scripts)


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        hi = lo + 1
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def _axes(xs: tuple[float, float], ys: tuple[float, float], xlabel: str, ylabel: str,
          w: int, h: int, pad: int) -> tuple[list[str], Any, Any]:
    (x0, x1), (y0, y1) = xs, ys
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def sx(v: float) -> float:
        return pad + (v - x0) / (x1 - x0) * (w - 2 * pad)

    def sy(v: float) -> float:
        return h - pad - (v - y0) / (y1 - y0) * (h - 2 * pad)

    parts = [f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" class="ax"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" class="ax"/>',
             f'<text x="{w / 2}" y="{h - 4}" class="lbl">{html.escape(xlabel)}</text>',
             f'<text x="12" y="{h / 2}" class="lbl" transform="rotate(-90 12 {h / 2})">{html.escape(ylabel)}</text>']
    for t in _ticks(x0, x1):
        parts.append(f'<text x="{sx(t):.1f}" y="{h - pad + 14}" class="tick">{t:.3g}</text>')
    for t in _ticks(y0, y1):
        parts.append(f'<text x="{pad - 4}" y="{sy(t) + 4:.1f}" class="tick" text-anchor="end">{t:.3g}</text>')
    return parts, sx, sy


def svg_progress(points: list[Any], title: str, w: int = 420, h: int = 220, pad: int = 44) -> str:
    """rows done over seconds, and the rate between points as a second line (rows/s)."""
    pts = [(float(t), float(n)) for t, n in points]
    parts, sx, sy = _axes((0.0, max(t for t, _ in pts)), (0.0, max(n for _, n in pts)),
                          "seconds since start", "rows done", w, h, pad)
    line = " ".join(f"{sx(t):.1f},{sy(n):.1f}" for t, n in pts)
    parts.append(f'<polyline points="{line}" class="series"/>')
    parts += [f'<circle cx="{sx(t):.1f}" cy="{sy(n):.1f}" r="2.5" class="dot"/>' for t, n in pts]
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" '
            f'class="chart progress"><title>{html.escape(title)}</title>{"".join(parts)}</svg>')


def svg_scatter(points: list[tuple[float, float]], w: int = 480, h: int = 300, pad: int = 48) -> str:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    parts, sx, sy = _axes((0.0, max(xs) * 1.05), (min(ys) - 1, max(ys) + 1), "bits per pixel",
                          "PSNR (dB)", w, h, pad)
    parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" class="dot"/>' for x, y in points]
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" '
            f'class="chart rd"><title>rate-distortion points</title>{"".join(parts)}</svg>')


# ---- HTML

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1d2433;background:#fff}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #d8dde6}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #d8dde6;padding:3px 8px;text-align:right}
th{background:#eef2f8}td.l,th.l{text-align:left}.muted{color:#6b7385}
.pair{display:inline-block;margin:6px 14px 6px 0;vertical-align:top}.pair figure{display:inline-block;margin:0 4px}
figcaption{font-size:12px;color:#4a5468}img{border:1px solid #c9ced8;image-rendering:pixelated;min-width:96px}
.missing{display:inline-block;width:96px;height:96px;border:1px dashed #c9ced8;font-size:11px;color:#6b7385}
.chart .ax{stroke:#6b7385}.chart .series{fill:none;stroke:#2a62c9;stroke-width:2}.chart .dot{fill:#2a62c9}
.chart .tick{font-size:10px;fill:#4a5468;text-anchor:middle}.chart .lbl{font-size:11px;fill:#1d2433;text-anchor:middle}
.ok{color:#1b7f3b}.bad{color:#b3261e}
""" + report_groups.CSS


def _e(v: Any) -> str:
    return html.escape(str(v))


def _num(v: Any) -> str:
    if v is None or v == "":
        return '<span class="muted">–</span>'
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return _e(f"{v:,}" if isinstance(v, int) else v)


def _runs_table(runs: list[dict[str, Any]]) -> str:
    sync = any(any(k in (r.get("counts") or {}) for k in RUN_COUNTS) for r in runs)
    cols = ["run", "finished", "status"] + (list(RUN_COUNTS) if sync else []) + \
        ["rows ok", "rows error", "shards", "seconds", "rows/s"]
    head = "".join(f'<th class="{"l" if i < 3 else ""}">{_e(c)}</th>' for i, c in enumerate(cols))
    body = []
    for r in runs:
        c, t = r.get("counts") or {}, r.get("timings") or {}
        status = str(r.get("status", ""))
        cls = "ok" if status == "succeeded" else "bad"
        cells = [f'<td class="l">{_e(r.get("run_id", "?"))}</td>', f'<td class="l">{_e(r.get("finished_at", ""))}</td>',
                 f'<td class="l {cls}">{_e(status)}{" – " + _e(r["reason"]) if r.get("reason") else ""}</td>']
        if sync:
            cells += [f"<td>{_num(c.get(k))}</td>" for k in RUN_COUNTS]
        cells += [f"<td>{_num(c.get(k))}</td>" for k in ("rows_ok", "rows_error", "shards_published")]
        cells += [f"<td>{_num(t.get('total_s'))}</td>", f"<td>{_num(t.get('rows_per_s'))}</td>"]
        body.append("<tr>" + "".join(cells) + "</tr>")
    note = "" if sync else '<p class="muted">These runs did not record new/changed/unchanged/deleted counts.</p>'
    return f'<table id="runs"><tr>{head}</tr>{"".join(body)}</table>{note}'


def _errors_table(sc: Scan) -> str:
    if not sc.errors:
        return '<p id="errors" class="ok">No error rows.</p>'
    rows = "".join(
        f'<tr><td class="l">{_e(msg)}</td><td>{n:,}</td><td class="l">{_e(", ".join(sc.error_keys[msg]))}</td></tr>'
        for msg, n in sc.errors.most_common())
    return (f'<table id="errors"><tr><th class="l">error</th><th>rows</th><th class="l">example keys</th></tr>'
            f"{rows}</table>")


def _throughput(runs: list[dict[str, Any]]) -> str:
    charts, plain = [], []
    for r in runs:
        progress = [p for p in r.get("progress") or [] if isinstance(p, list | tuple) and len(p) == 2]
        rid = str(r.get("run_id", "?"))
        if len(progress) >= 2:
            t, n = progress[-1]
            rate = n / t if t else 0.0
            charts.append(f'<figure class="pair">{svg_progress(progress, f"run {rid}")}'
                          f"<figcaption>run {_e(rid)}: {_num(int(n))} rows in {_num(float(t))} s "
                          f"({rate:.3g} rows/s)</figcaption></figure>")
        else:
            rps = (r.get("timings") or {}).get("rows_per_s")
            plain.append(f"<li>run {_e(rid)}: {_num(rps)} rows/s over the run (no progress points recorded)</li>")
    return "".join(charts) + (f'<ul>{"".join(plain)}</ul>' if plain else "")


def render_html(dst: str, manifest: dict[str, Any], runs: list[dict[str, Any]], sc: Scan,
                samples_html: str, groups_html: str = "") -> str:
    job = str(manifest.get("job") or (runs[-1].get("job") if runs else "") or "?")
    model = manifest.get("model") or {}
    summary = (f"<table id=\"summary\"><tr><th class=\"l\">job</th><td class=\"l\">{_e(job)}</td></tr>"
               f"<tr><th class=\"l\">source</th><td class=\"l\">{_e(manifest.get('src', '?'))}</td></tr>"
               f"<tr><th class=\"l\">model</th><td class=\"l\">{_e(model.get('name', '?'))} "
               f"({_e(str(model.get('sha256', ''))[:12])})</td></tr>"
               f"<tr><th class=\"l\">rows</th><td class=\"l\">{sc.rows:,} in {sc.files:,} files: "
               f"<span class=\"ok\">{sc.ok:,} ok</span>, <span class=\"bad\">{sc.rows - sc.ok:,} error</span></td></tr>"
               f"<tr><th class=\"l\">runs</th><td class=\"l\">{len(runs)}</td></tr></table>")
    made = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>aejob report: {_e(dst)}</title>
<style>{CSS}</style></head><body>
<h1>aejob {_e(job)} report: {_e(dst)}</h1>
<p class="muted">made {made} by aejob report</p>
{summary}
<h2>Runs</h2>
{_runs_table(runs) if runs else '<p id="runs" class="muted">No run records under _runs/.</p>'}
<h2>Errors</h2>
{_errors_table(sc)}
<h2>Throughput</h2>
{_throughput(runs) or '<p class="muted">No runs.</p>'}
{samples_html}
{groups_html}
</body></html>
"""


def _clean_samples_html(items: list[dict[str, str | None]]) -> str:
    if not items:
        return '<h2>Samples</h2><p class="muted">No ok rows to show.</p>'
    figs = "".join(
        f'<div class="pair sample"><figure>{_img_tag(i["before"], "source not readable")}'
        f'<figcaption>before</figcaption></figure>'
        f'<figure>{_img_tag(i["after"], "no image")}<figcaption>after</figcaption></figure>'
        f'<figcaption>{_e(i["key"])}</figcaption></div>' for i in items)
    return f"<h2>Samples: before / after</h2>{figs}"


def _compress_html(sc: Scan, sample: dict[str, Any] | None) -> str:
    out = ["<h2>Rate-distortion</h2>"]
    if sc.rd:
        bpp = sum(p[0] for p in sc.rd) / len(sc.rd)
        psnr = sum(p[1] for p in sc.rd) / len(sc.rd)
        note = f" (a sample of {len(sc.rd):,})" if sc.ok > len(sc.rd) else ""
        out.append(f'<figure class="pair">{svg_scatter(sc.rd)}<figcaption>{len(sc.rd):,} rows{note}: '
                   f"mean {bpp:.3f} bpp, {psnr:.2f} dB</figcaption></figure>")
    else:
        out.append('<p class="muted">No bpp/psnr values.</p>')
    out.append("<h2>Decoded sample</h2>")
    if sample is None:
        out.append('<p class="muted">No ok row to decode.</p>')
    elif sample["error"]:
        out.append(f'<p class="bad">{_e(sample["key"])}: could not decode: {_e(sample["error"])}</p>')
    else:
        out.append(f'<div class="pair sample"><figure>{_img_tag(sample["image"], "decoded")}<figcaption>'
                   f'{_e(sample["key"])}: {_num(sample["bpp"])} bpp, {_num(sample["psnr"])} dB, '
                   f'{sample["bytes"]:,} bytes</figcaption></figure></div>')
    return "".join(out)


def build_report(dst: str, out: str | None = None, samples: int = 4,
                 groups: int = report_groups.DEFAULT_GROUPS) -> str:
    """Write the report of ``dst``; returns where it was written."""
    dst = dst.rstrip("/")
    if not layout.data_files(dst) and not storage.exists(storage.join(dst, layout.MANIFEST)):
        raise FileNotFoundError(f"{dst}: no aejob dataset there (no data files, no {layout.MANIFEST})")
    runs = read_runs(dst)
    manifest = layout.read_json(storage.join(dst, layout.MANIFEST)) or (runs[-1] if runs else {})
    job = str(manifest.get("job") or "")
    sc = scan(dst, samples, job)
    logger.info("%s: %d rows in %d files, %d runs", dst, sc.rows, sc.files, len(runs))
    if job == "compress":
        body = _compress_html(sc, compress_sample(dst, sc, manifest))
    else:
        body = _clean_samples_html(clean_samples(dst, sc, str(manifest.get("src") or "")))
    groups_html = report_groups.groups_section(dst, _dataset(dst), job, manifest, groups)
    page = render_html(dst, manifest, runs, sc, body, groups_html)
    target = out or storage.join(dst, REPORT_DIR, REPORT_FILE)
    storage.write_bytes(target, page.encode())
    logger.info("wrote %s (%d bytes)", target, len(page))
    return target


def report_command(
    dst: Annotated[str, typer.Argument(help="A dataset written by aejob clean or aejob compress (folder or s3://).")],
    out: Annotated[str | None, typer.Option(
        "--out", help="Where to write the HTML (default: DST/_report/report.html).")] = None,
    samples: Annotated[int, typer.Option(help="Sampled rows shown as images.", min=0, max=64)] = 4,
    groups: Annotated[int, typer.Option(
        help="Near-duplicate groups (from aejob dedup) and content groups (from aejob groups) shown as "
        "thumbnails, of each kind; 0: no groups section.", min=0, max=50)] = report_groups.DEFAULT_GROUPS,
) -> None:
    """Write an HTML report of DST: runs and their counts, errors grouped, throughput, samples
    (before/after for clean; RD points and a decoded row for compress), and a few near-duplicate and
    content groups as thumbnails. Self-contained: no URLs."""
    try:
        target = build_report(dst, out, samples, groups)
    except FileNotFoundError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(target)


def register(app: typer.Typer) -> None:
    """Add ``report`` to ``app`` (the ``aejob`` typer application)."""
    app.command("report")(report_command)
