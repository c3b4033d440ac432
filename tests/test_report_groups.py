"""``aejob report``'s groups section: near-duplicate groups (``aejob dedup``) and content groups
(``aejob groups``) as thumbnails, on DSTs made by the real ``aejob clean`` / ``aejob compress``
(local, and the same DST copied to S3), read for the shown members only; rendered by headless
Chromium (every thumbnail decodes: ``naturalWidth > 0``)."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import report_groups
from jobs.report import _dataset, build_report
from pipeline import storage
from tests.conftest import encode, make_image
from tests.test_report import CHROMIUM_FLAGS, _aejob, _assert_self_contained, _chromium

DUPES = {"a.png": "a-copy.png", "c.png": "c-copy.png"}  # byte-identical copies: always near-duplicates


def _source(folder: Path) -> Path:
    """Six distinct pictures, two of them also under a second name."""
    folder.mkdir(parents=True)
    for i, (name, w, h) in enumerate([("a.png", 40, 32), ("b.png", 33, 17), ("c.png", 64, 48),
                                      ("d.png", 20, 24), ("e.png", 48, 40), ("f.png", 30, 30)]):
        data = encode(make_image(w, h, 10 + 7 * i, noise=6))
        (folder / name).write_bytes(data)
        if name in DUPES:
            (folder / DUPES[name]).write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def grouped_clean(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: str, ray_local) -> Path:  # type: ignore[no-untyped-def]
    base = tmp_path_factory.mktemp("groups-clean")
    dst = base / "clean"
    _aejob("clean", str(_source(base / "src")), "--out", str(dst), "--checkpoint", tiny_checkpoint)
    _aejob("dedup", str(dst))
    _aejob("groups", str(dst), "-k", "3")
    return dst


@pytest.fixture(scope="module")
def grouped_compress(tmp_path_factory: pytest.TempPathFactory, tiny_codec: str, ray_local) -> Path:  # type: ignore[no-untyped-def]
    base = tmp_path_factory.mktemp("groups-compress")
    dst = base / "packed"
    _aejob("compress", str(_source(base / "src")), "--out", str(dst), "--checkpoint", tiny_codec)
    _aejob("dedup", str(dst))
    _aejob("groups", str(dst), "-k", "3")
    return dst


class _Members(HTMLParser):
    """kind, group, key, img src (None: no thumbnail), keep and caption of each member figure."""

    def __init__(self) -> None:
        super().__init__()
        self.members: list[dict[str, object]] = []
        self._group: str | None = None
        self._in_caption = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "div" and "group" in (a.get("class") or "").split():
            self._group = a.get("data-group")
        elif tag == "figure" and a.get("data-key") is not None:
            self.members.append({"kind": a.get("data-kind"), "group": self._group, "key": a["data-key"],
                                 "src": None, "keep": "keep" in (a.get("class") or "").split(), "caption": ""})
        elif tag == "img" and self.members and self.members[-1]["src"] is None:
            self.members[-1]["src"] = a.get("src")
        elif tag == "figcaption":
            self._in_caption = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "figcaption":
            self._in_caption = False

    def handle_data(self, data: str) -> None:
        if self._in_caption and self.members:
            self.members[-1]["caption"] = str(self.members[-1]["caption"]) + data


def _members(html_text: str) -> list[dict[str, object]]:
    section = html_text[html_text.index('<h2 id="groups">'):]
    p = _Members()
    p.feed(section)
    return p.members


def _decode_uri(uri: str) -> Image.Image:
    assert uri.startswith("data:image/jpeg;base64,"), uri[:40]
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")


def _stored_images(dst: Path, column: str = "image") -> dict[str, Image.Image]:
    t = pq.read_table(str(dst), columns=["key", "status", column])  # test DSTs are tiny
    return {r["key"]: Image.open(io.BytesIO(r[column])).convert("RGB") for r in t.to_pylist() if r["status"] == "ok"}


def _same_picture(thumb: Image.Image, full: Image.Image) -> bool:
    ref = full.copy()
    ref.thumbnail((report_groups.THUMB_PX, report_groups.THUMB_PX))
    if ref.size != thumb.size:
        return False
    return float(np.abs(np.asarray(ref, np.int16) - np.asarray(thumb, np.int16)).mean()) < 12


def _expected(dst: Path, folder: str) -> dict[int, list[dict[str, object]]]:
    by: dict[int, list[dict[str, object]]] = {}
    for r in pq.read_table(str(dst / folder / "groups.parquet")).to_pylist():
        by.setdefault(int(r["group"]), []).append(r)
    return by


# ---- content (no browser)


def test_report_shows_dedup_and_kmeans_groups_as_thumbnails(grouped_clean: Path) -> None:
    dst = grouped_clean
    dedup = _expected(dst, "_dedup")
    pairs = {frozenset(str(r["key"]) for r in rows) for rows in dedup.values()}
    for a, b in DUPES.items():  # the copies were found (a group may hold more look-alikes)
        assert any({a, b} <= p for p in pairs), pairs
    out = _aejob("report", str(dst))
    html_text = (dst / "_report" / "report.html").read_text()
    assert str(dst / "_report" / "report.html") in out
    _assert_self_contained(html_text)
    members = _members(html_text)
    stored = _stored_images(dst)
    # near-duplicates: every group (there are fewer than 6), largest first, kept member first
    shown = [m for m in members if m["kind"] == "dedup"]
    order = sorted(dedup, key=lambda g: (-len(dedup[g]), g))
    assert [int(str(m["group"])) for m in shown] == [g for g in order for _ in dedup[g][:8]]
    for g in order:
        got = [m for m in shown if m["group"] == str(g)]
        keeper = [r["key"] for r in dedup[g] if r["keep"]]
        assert got[0]["key"] == keeper[0] and got[0]["keep"] and "keep" in str(got[0]["caption"])
        assert {m["key"] for m in got} == {r["key"] for r in dedup[g]}
        for m in got[1:]:
            score = next(float(str(r["score"])) for r in dedup[g] if r["key"] == m["key"])
            assert f"{score:.3f}" in str(m["caption"]) and not m["keep"]
    # k-means: the three groups, each one's most central members first
    kmeans = _expected(dst, "_groups")
    km = [m for m in members if m["kind"] == "kmeans"]
    assert {str(m["group"]) for m in km} == {str(g) for g in kmeans}
    for g, rows in kmeans.items():
        want = [r["key"] for r in sorted(rows, key=lambda r: (-float(str(r["score"])), str(r["key"])))][:8]
        assert [m["key"] for m in km if m["group"] == str(g)] == want
    # every member is a thumbnail of its own stored (cleaned) image
    for m in members:
        img = _decode_uri(str(m["src"]))
        assert max(img.size) <= report_groups.THUMB_PX
        assert _same_picture(img, stored[str(m["key"])]), m["key"]
    assert "group" in html_text and 'id="groups-none"' not in html_text


def test_report_groups_flag(grouped_clean: Path, tmp_path: Path) -> None:
    _aejob("report", str(grouped_clean), "--out", str(tmp_path / "one.html"), "--groups", "1")
    members = _members((tmp_path / "one.html").read_text())
    assert len({(m["kind"], m["group"]) for m in members}) == 2  # one group of each kind
    _aejob("report", str(grouped_clean), "--out", str(tmp_path / "none.html"), "--groups", "0")
    assert 'id="groups"' not in (tmp_path / "none.html").read_text()


def test_report_says_how_to_make_groups(grouped_clean: Path, tmp_path: Path) -> None:
    dst = tmp_path / "copy"
    shutil.copytree(grouped_clean, dst)
    shutil.rmtree(dst / "_groups")
    html_text = Path(build_report(str(dst))).read_text()
    assert 'id="kmeans-none"' in html_text and f"aejob groups {dst}" in html_text
    assert any(m["kind"] == "dedup" for m in _members(html_text))
    shutil.rmtree(dst / "_dedup")
    html_text = Path(build_report(str(dst))).read_text()
    assert 'id="groups-none"' in html_text
    assert f"aejob dedup {dst}" in html_text and f"aejob groups {dst}" in html_text
    assert _members(html_text) == []


def test_group_thumbnails_read_only_the_shown_rows(tmp_path: Path) -> None:
    """200 rows in row groups of 8 (sorted by key, as aejob writes them): the section reads
    only the row groups that hold a shown member, and each thumbnail is that member's image."""
    dst = tmp_path / "dst"
    dst.mkdir()
    keys = [f"k{i:03d}" for i in range(200)]
    colour = {k: (i % 7 * 36, i * 13 % 256, 255 - i) for i, k in enumerate(keys)}
    table = pa.table({"key": keys, "status": ["ok"] * 200,
                      "image": pa.array([encode(np.full((20, 30, 3), colour[k], np.uint8)) for k in keys],
                                        pa.large_binary())})
    pq.write_table(table, str(dst / "shard-0.parquet"), row_group_size=8)
    (dst / "_dedup").mkdir()
    shown = ["k010", "k011", "k150", "k199"]
    pq.write_table(pa.table({"group": pa.array([0, 0, 1, 1], pa.int32()), "key": shown,
                             "score": pa.array([1.0, 0.97, 1.0, 0.96], pa.float32()),
                             "keep": [True, False, True, False]}), str(dst / "_dedup" / "groups.parquet"))
    sections = [s for s in (report_groups.read_groups(str(dst), "dedup", 6),) if s is not None]
    stats = report_groups.fill_thumbs(_dataset(str(dst)), "clean", {}, sections)
    assert stats.row_groups_total == 25 and stats.row_groups_read == 3 and stats.rows == 4
    html_text = Path(build_report(str(dst), samples=0)).read_text()
    members = _members(html_text)
    assert [m["key"] for m in members] == ["k010", "k011", "k150", "k199"]
    for m in members:
        px = np.asarray(_decode_uri(str(m["src"]))).reshape(-1, 3).mean(0)
        assert np.abs(px - np.array(colour[str(m["key"])])).max() < 8, (m["key"], px)
    # a key that left DST since the dedup ran: shown by key, saying so
    pq.write_table(table.slice(0, 150), str(dst / "shard-0.parquet"), row_group_size=8)
    gone = [m for m in _members(Path(build_report(str(dst), samples=0)).read_text()) if m["key"] == "k199"]
    assert gone[0]["src"] is None


def test_report_groups_of_a_compress_dst(grouped_compress: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dst = grouped_compress
    html_text = Path(build_report(str(dst))).read_text()
    _assert_self_contained(html_text)
    members = _members(html_text)
    assert {m["kind"] for m in members} == {"dedup", "kmeans"}
    for a, b in DUPES.items():
        assert {a, b} <= {m["key"] for m in members if m["kind"] == "dedup"}
    for m in members:  # decoded through the (tiny, cheap) codec
        assert max(_decode_uri(str(m["src"])).size) <= report_groups.THUMB_PX
    assert 'id="groups-not-decoded"' not in html_text
    # decoding would cost too much: keys without thumbnails, and the page says why
    monkeypatch.setattr(report_groups, "CODEC_BUDGET_PX", 0)
    html_text = Path(build_report(str(dst))).read_text()
    members = _members(html_text)
    assert members and all(m["src"] is None for m in members)
    assert 'id="groups-not-decoded"' in html_text and "shown by key only" in html_text


@pytest.mark.s3
def test_report_groups_of_an_s3_dst(grouped_clean: Path, s3_server: dict[str, str]) -> None:
    """The local DST copied to S3 as is: the groups and the thumbnails are read through S3."""
    s3 = storage.s3_client()
    s3.create_bucket(Bucket="report-groups")
    for f in grouped_clean.rglob("*"):
        rel = f.relative_to(grouped_clean).as_posix()
        if f.is_file() and not rel.startswith(("_report/", "_index/")):
            s3.put_object(Bucket="report-groups", Key=f"clean/{rel}", Body=f.read_bytes())
    _aejob("report", "s3://report-groups/clean", "--groups", "2")
    html_text = storage.read_bytes("s3://report-groups/clean/_report/report.html").decode()
    _assert_self_contained(html_text)
    members = _members(html_text)
    stored = _stored_images(grouped_clean)
    assert members and {m["kind"] for m in members} == {"dedup", "kmeans"}
    for m in members:
        assert _same_picture(_decode_uri(str(m["src"])), stored[str(m["key"])])
    assert "aejob dedup s3://" not in html_text


# ---- headless Chromium

_PROBE = """<script>addEventListener("load", () => { for (const i of document.images)
  i.setAttribute("data-natural-width", String(i.naturalWidth)); document.body.setAttribute("data-probed", "1"); });
</script>"""


def test_chromium_renders_the_group_thumbnails(grouped_clean: Path, tmp_path: Path) -> None:
    browser = _chromium()
    html_text = Path(build_report(str(grouped_clean), str(tmp_path / "report.html"))).read_text()
    n = len(_members(html_text))
    assert n >= 6
    probe = tmp_path / "probe.html"  # the report plus a probe script (the report itself has none)
    probe.write_text(html_text.replace("</body>", _PROBE + "</body>"))
    flags = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    dom = subprocess.run([*flags, "--dump-dom", probe.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-probed="1"' in dom.stdout
    group_imgs = re.findall(r'<img src="data:image/jpeg;base64,[^"]*"[^>]*data-natural-width="(\d+)"', dom.stdout)
    assert len(group_imgs) == n
    assert all(int(w) > 0 for w in group_imgs), group_imgs
    all_imgs = re.findall(r'data-natural-width="(\d+)"', dom.stdout)
    assert len(all_imgs) > n and all(int(w) > 0 for w in all_imgs)  # the samples render too
