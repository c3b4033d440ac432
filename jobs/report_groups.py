"""The report's "Groups" section: a few near-duplicate groups (``aejob dedup`` → ``DST/_dedup``)
and content groups (``aejob groups`` → ``DST/_groups``) as small inline thumbnails.

Which groups: the largest near-duplicate groups first (ties by group id), each with its kept
member first and then its members by score (cosine to the kept member); the largest k-means
groups, each with its most central members (cosine to the centroid). Up to ``--groups`` groups of
each kind and :data:`MEMBERS` members per group.

Reading: the groups tables are read column by column (the ``group`` column, then the rows of
the chosen groups). The images are read for the shown members only: each data file's row groups
are pruned by their ``key`` statistics (files are sorted by key, row groups are small), and the
remaining rows are filtered by key, one batch at a time; a member's bytes are turned into a
thumbnail as soon as they are read. ``clean`` DSTs store the cleaned image; ``compress`` DSTs
store a latent stream, decoded through the codec only within a budget (:data:`CODEC_BUDGET_PX`,
:data:`CODEC_BUDGET_S`); members beyond it are shown by key, and the section says so. Rows that
the codec kept as the source's bytes (``codec = original``) need no codec.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pipeline import index as vindex
from pipeline import storage

logger = logging.getLogger(__name__)

DEFAULT_GROUPS = 6  # groups shown of each kind (aejob report --groups)
MEMBERS = 8  # members shown per group
THUMB_PX = 96
JPEG_QUALITY = 80
CODEC_BUDGET_PX = 4_000_000  # ~2-4 s of CPU decoding (768x512 on 2 threads: codec-ctx ~4.5 images/s, codec-avif ~2.5)
CODEC_BUDGET_S = 10.0  # and never more than this, codec loading included

CSS = """
.groups .group{margin:10px 0 16px}.groups .ghead{font-size:13px;margin:4px 0}
.groups figure{display:inline-block;margin:0 6px 6px 0;vertical-align:top;width:100px}
.groups figure img{min-width:0;width:96px;height:96px;object-fit:contain;background:#f4f6fa;image-rendering:auto}
.groups figure .missing{width:96px;height:64px;overflow:hidden;word-break:break-all}
.groups figcaption{font-size:11px;word-break:break-all}.groups .keep{outline:2px solid #1b7f3b}
.groups .tag{color:#1b7f3b;font-weight:600}.groups .more{font-size:12px;color:#6b7385;vertical-align:middle}
"""


@dataclass
class Member:
    key: str
    score: float | None
    keep: bool = False
    thumb: str | None = None  # data URI
    note: str = ""  # why there is no thumbnail


@dataclass
class Group:
    group: int
    size: int
    members: list[Member]


@dataclass
class Groups:
    """What one groups folder holds, limited to the groups and members shown."""

    kind: str  # "dedup" | "kmeans"
    total: int  # groups in the table
    summary: dict[str, Any]
    shown: list[Group] = field(default_factory=list)


@dataclass
class ReadStats:
    rows: int = 0
    row_groups_read: int = 0
    row_groups_total: int = 0
    not_decoded: int = 0  # compress members beyond the codec budget
    codec_error: str = ""


# ---- the groups tables


def _summary(folder: str) -> dict[str, Any]:
    import json

    try:
        return dict(json.loads(storage.read_bytes(storage.join(folder, "summary.json"))))
    except (OSError, ValueError):
        return {}


def read_groups(dst: str, kind: str, n: int, members: int = MEMBERS) -> Groups | None:
    """The ``n`` largest groups of ``DST/_dedup`` (kind ``dedup``) or ``DST/_groups`` (``kmeans``),
    ``members`` members each; None when that folder has no groups table."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    folder = storage.join(dst, vindex.DEDUP_DIR if kind == "dedup" else vindex.GROUPS_DIR)
    uri = storage.join(folder, "groups.parquet")
    if not storage.exists(uri):
        return None
    fs, path = storage.resolve(uri)
    ds = pads.dataset(path, filesystem=fs, format="parquet")
    counts = pc.value_counts(ds.to_table(columns=["group"]).column("group")).to_pylist()
    sizes = {int(c["values"]): int(c["counts"]) for c in counts if c["values"] is not None}
    out = Groups(kind, len(sizes), _summary(folder))
    chosen = sorted(sizes, key=lambda g: (-sizes[g], g))[:n]
    if not chosen:
        return out
    cols = [c for c in ("group", "key", "score", "keep") if c in ds.schema.names]
    rows = ds.to_table(columns=cols, filter=pc.field("group").isin(chosen)).to_pylist()
    by_group: dict[int, list[dict[str, Any]]] = {g: [] for g in chosen}
    for r in rows:
        by_group[int(r["group"])].append(r)
    for g in chosen:
        rs = sorted(by_group[g], key=lambda r: (not r.get("keep"), -(r.get("score") or 0.0), r["key"]))
        out.shown.append(Group(g, sizes[g], [
            Member(r["key"], None if r.get("score") is None else float(r["score"]), bool(r.get("keep")))
            for r in rs[:members]]))
    return out


# ---- thumbnails of the shown members


def thumb(img: Any) -> str:
    """A PIL image or uint8 array as a JPEG data URI, at most THUMB_PX on a side."""
    from PIL import Image

    if not isinstance(img, Image.Image):
        img = Image.fromarray(img)
    img = img.convert("RGB")
    img.thumbnail((THUMB_PX, THUMB_PX))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def thumb_of_bytes(data: bytes) -> str:
    """Thumbnail of encoded image bytes (a JPEG is decoded at a reduced size: cheap)."""
    from PIL import Image, ImageOps

    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (THUMB_PX * 2, THUMB_PX * 2))
    img.load()
    return thumb(ImageOps.exif_transpose(img))


def member_rows(ds: Any, keys: set[str], columns: list[str], stats: ReadStats) -> Iterator[dict[str, Any]]:
    """DST's rows of ``keys``, a batch at a time: only row groups whose key statistics may hold
    one of them are read, and only their rows with one of the keys are kept."""
    import pyarrow.compute as pc

    if not keys:
        return
    cols = [c for c in columns if c in ds.schema.names]
    flt = pc.field("key").isin(sorted(keys))
    for frag in ds.get_fragments():
        stats.row_groups_total += frag.num_row_groups
        for rg in frag.split_by_row_group(filter=flt):
            stats.row_groups_read += 1
            for batch in rg.to_batches(columns=cols, filter=flt, batch_size=64):
                for row in batch.to_pylist():
                    stats.rows += 1
                    yield row


class _Codec:
    """The compress DST's codec, loaded at the first row that needs it, within the budget."""

    def __init__(self, manifest: dict[str, Any]) -> None:
        self.manifest = manifest
        self.engines: dict[str, Any] = {}
        self.t0 = time.monotonic()
        self.px = 0

    def affordable(self, px: int) -> bool:
        return self.px + px <= CODEC_BUDGET_PX and time.monotonic() - self.t0 <= CODEC_BUDGET_S

    def decode(self, latent: bytes, sha: str | None, px: int) -> Any:
        from jobs.compress import checkpoint_for
        from models.codec import CodecEngine

        key = sha or ""
        if key not in self.engines:
            self.engines[key] = CodecEngine(checkpoint_for(self.manifest, {sha} if sha else set()))
        self.px += px
        return self.engines[key].decompress(latent)


def fill_thumbs(ds: Any, job: str, manifest: dict[str, Any], sections: list[Groups]) -> ReadStats:
    """Set each shown member's thumbnail (or the note saying why it has none)."""
    members: dict[str, list[Member]] = {}
    order: list[str] = []  # display order: the budget goes to the first groups shown
    for sec in sections:
        for g in sec.shown:
            for m in g.members:
                if m.key not in members:
                    order.append(m.key)
                members.setdefault(m.key, []).append(m)
    stats = ReadStats()
    found: dict[str, str | None] = {}
    notes: dict[str, str] = {}
    pending: dict[str, dict[str, Any]] = {}  # compress rows that need the codec
    column = "latent" if job == "compress" else "image"
    for row in member_rows(ds, set(members), ["key", "status", column, "codec", "width", "height",
                                              "checkpoint_sha256"], stats):
        key = row["key"]
        data = row.get(column)
        if row.get("status") != "ok" or not data:
            notes[key] = "error row"
            continue
        if job == "compress" and row.get("codec") != "original":
            pending[key] = row  # a latent stream: small; decoded below, in display order
            continue
        try:  # clean: the cleaned image; compress, codec "original": the source's bytes
            found[key] = thumb_of_bytes(data)
        except Exception as e:  # a report never fails on one image
            notes[key] = f"not decodable: {e}"
    if pending:
        codec = _Codec(manifest)
        for key in order:
            stream = pending.get(key)
            if stream is None:
                continue
            px = int(stream.get("width") or 0) * int(stream.get("height") or 0)
            if stats.codec_error:
                notes[key] = "not decodable"
                continue
            if not codec.affordable(px):
                stats.not_decoded += 1
                notes[key] = "not decoded"
                continue
            try:
                found[key] = thumb(codec.decode(stream["latent"], stream.get("checkpoint_sha256"), px))
            except Exception as e:
                logger.warning("could not decode %s for the groups section: %s", key, e)
                stats.codec_error = stats.codec_error or str(e)
                notes[key] = "not decodable"
    for key, ms in members.items():
        for m in ms:
            m.thumb = found.get(key)
            m.note = "" if m.thumb else notes.get(key, "not in DST")
    logger.info("groups section: %d rows read from %d of %d row groups for %d members",
                stats.rows, stats.row_groups_read, stats.row_groups_total, len(members))
    return stats


# ---- HTML


def _e(v: Any) -> str:
    return html.escape(str(v))


def _member_html(kind: str, m: Member) -> str:
    img = (f'<img src="{m.thumb}" alt="{_e(m.key)}" title="{_e(m.key)}">' if m.thumb
           else f'<div class="missing" title="{_e(m.key)}">{_e(m.note or "no image")}</div>')
    tag = '<span class="tag">keep</span> ' if m.keep else ""
    score = "" if m.score is None else f"{m.score:.3f}"
    cls = "member keep" if m.keep else "member"
    return (f'<figure class="{cls}" data-kind="{kind}" data-key="{_e(m.key)}">{img}'
            f"<figcaption>{tag}{_e(m.key)}<br>{score}</figcaption></figure>")


def _groups_html(sec: Groups, what: str) -> str:
    out = []
    for g in sec.shown:
        more = g.size - len(g.members)
        out.append(f'<div class="group" data-kind="{sec.kind}" data-group="{g.group}">'
                   f'<div class="ghead">{what} {g.group}: {g.size:,} image{"" if g.size == 1 else "s"}</div>'
                   + "".join(_member_html(sec.kind, m) for m in g.members)
                   + (f'<span class="more">+{more:,} more</span>' if more > 0 else "") + "</div>")
    return "".join(out)


def section_html(dst: str, dedup: Groups | None, kmeans: Groups | None, stats: ReadStats | None) -> str:
    cmd_dedup, cmd_groups = f"aejob dedup {dst}", f"aejob groups {dst}"
    out = ['<h2 id="groups">Groups</h2><div class="groups">']
    if dedup is None and kmeans is None:
        out.append(f'<p id="groups-none" class="muted">No groups yet. Near-duplicates: <code>{_e(cmd_dedup)}</code> '
                   f"(writes {_e(vindex.DEDUP_DIR)}/); groups by content: <code>{_e(cmd_groups)} -k 20</code> "
                   f"(writes {_e(vindex.GROUPS_DIR)}/). Then run this report again.</p></div>")
        return "".join(out)
    out.append("<h3>Near-duplicates</h3>")
    if dedup is None:
        out.append(f'<p id="dedup-none" class="muted">No near-duplicate groups: <code>{_e(cmd_dedup)}</code> '
                   f"writes them to {_e(vindex.DEDUP_DIR)}/.</p>")
    elif not dedup.total:
        t = dedup.summary.get("threshold")
        at = f" at threshold {float(t):.3f}" if t is not None else ""
        out.append(f'<p id="dedup-empty" class="ok">No near-duplicates{at}.</p>')
    else:
        s = dedup.summary
        facts = [f"{dedup.total:,} groups"]
        if s.get("threshold") is not None:
            facts.append(f"threshold {float(s['threshold']):.3f}")
        if s.get("rows_in_groups") is not None and s.get("rows") is not None:
            facts.append(f"{int(s['rows_in_groups']):,} of {int(s['rows']):,} images in groups")
        if s.get("removable") is not None:
            facts.append(f"{int(s['removable']):,} removable")
        out.append(f'<p class="muted">{_e(", ".join(facts))}. The {len(dedup.shown)} largest, up to {MEMBERS} '
                   "members each: the member to keep (the largest image) first, then the others by score "
                   "(cosine similarity to the kept one).</p>")
        out.append(_groups_html(dedup, "group"))
    out.append("<h3>Content groups (k-means)</h3>")
    if kmeans is None:
        out.append(f'<p id="kmeans-none" class="muted">No content groups: <code>{_e(cmd_groups)} -k 20</code> '
                   f"writes them to {_e(vindex.GROUPS_DIR)}/.</p>")
    else:
        rows = kmeans.summary.get("rows")
        of = f" over {int(rows):,} images" if rows is not None else ""
        out.append(f'<p class="muted">{kmeans.total:,} groups{of}. The {len(kmeans.shown)} largest, up to '
                   f"{MEMBERS} members each, most central first (score: cosine similarity to the group's "
                   "centroid).</p>")
        out.append(_groups_html(kmeans, "group"))
    if stats and stats.not_decoded:
        out.append(f'<p id="groups-not-decoded" class="muted">{stats.not_decoded:,} members are shown by key '
                   f"only: this DST stores latent streams, and decoding them through the codec on this machine's "
                   f"CPU would pass the report's budget ({CODEC_BUDGET_PX / 1e6:.0f} Mpx, {CODEC_BUDGET_S:.0f} s). "
                   f"<code>aejob decompress</code> writes the images.</p>")
    if stats and stats.codec_error:
        out.append(f'<p class="bad">The codec could not decode some members: {_e(stats.codec_error)}</p>')
    out.append("</div>")
    return "".join(out)


def groups_section(dst: str, ds: Any, job: str, manifest: dict[str, Any], n: int = DEFAULT_GROUPS) -> str:
    """The section's HTML ("" when ``n`` is 0); ``ds`` is DST's data files as a pyarrow dataset."""
    if n <= 0:
        return ""
    dedup = read_groups(dst, "dedup", n)
    kmeans = read_groups(dst, "kmeans", n)
    sections = [s for s in (dedup, kmeans) if s is not None]
    stats = fill_thumbs(ds, job, manifest, sections) if sections else None
    return section_html(dst, dedup, kmeans, stats)
