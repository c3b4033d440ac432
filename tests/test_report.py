"""``aejob report`` on datasets made by the real ``aejob clean`` / ``aejob compress`` (local and
s3://), checked as HTML and as rendered by headless Chromium (DOM dump + screenshot).

Without a ``chromium`` binary the browser tests skip, except under CI (``CI=true``), where
they fail: .ci/run installs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from jobs.cli import app
from jobs.report import build_report
from pipeline import storage
from tests.conftest import encode, make_image

pytestmark = pytest.mark.usefixtures("ray_local")

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _aejob(*argv: str) -> str:
    res = CliRunner().invoke(app, list(argv))
    assert res.exit_code == 0, f"aejob {' '.join(argv)}:\n{res.output}"
    return res.output


def _add_broken(src: Path) -> None:
    (src / "broken2.jpg").write_bytes(b"\xff\xd8\xff\xe0 another truncated jpeg")


@pytest.fixture
def clean_dst(image_folder: Path, tmp_path: Path, tiny_checkpoint: str) -> Path:
    _add_broken(image_folder)
    dst = tmp_path / "clean"
    _aejob("clean", str(image_folder), "--out", str(dst), "--checkpoint", tiny_checkpoint)
    return dst


@pytest.fixture
def compress_dst(image_folder: Path, tmp_path: Path, tiny_codec: str) -> Path:
    dst = tmp_path / "packed"
    _aejob("compress", str(image_folder), "--out", str(dst), "--checkpoint", tiny_codec)
    return dst


class _Page(HTMLParser):
    """Text, tags and attributes of a page, for checks that do not depend on formatting."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    @property
    def plain(self) -> str:
        return " ".join(" ".join(self.text).split())


def _parse(html_text: str) -> _Page:
    page = _Page()
    page.feed(html_text)
    return page


def _assert_self_contained(html_text: str) -> None:
    page = _parse(html_text)
    for tag, attrs in page.tags:
        for name in ("src", "href"):
            value = attrs.get(name) or ""
            assert not value or value.startswith("data:"), f"<{tag} {name}={value[:60]}>"
    assert not re.search(r"url\((?!data:)", html_text)
    assert "<script" not in html_text


def _images(html_text: str) -> list[Image.Image]:
    import base64
    import io

    out: list[Image.Image] = []
    for _, attrs in _parse(html_text).tags:
        src = attrs.get("src") or ""
        if src.startswith("data:image/png;base64,"):
            out.append(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))
    return out


# ---- content (no browser)


def test_report_of_a_clean_dst(clean_dst: Path, image_folder: Path) -> None:
    out = _aejob("report", str(clean_dst))
    target = clean_dst / "_report" / "report.html"
    assert str(target) in out.splitlines()
    html_text = target.read_text()
    _assert_self_contained(html_text)
    text = _parse(html_text).plain
    run = json.loads(next((clean_dst / "_runs").glob("*.json")).read_text())
    assert run["run_id"] in text and "aejob clean report" in text
    assert "7 in 1 files" in text  # five images + two broken ones
    # both broken files share one message: grouped once, with both example keys
    rows = re.findall(r"<tr><td class=\"l\">([^<]*)</td><td>(\d+)</td><td class=\"l\">([^<]*)</td></tr>", html_text)
    assert len(rows) == 1, rows
    msg, n, keys = rows[0]
    assert int(n) == 2 and set(keys.split(", ")) == {"broken.jpg", "broken2.jpg"}
    assert f"{run['run_id']}: " in text  # its throughput line (rows/s, or a chart when recorded)
    # before/after: 4 sampled rows, each with its source beside the cleaned image
    assert html_text.count("<figcaption>before</figcaption>") == 4
    assert html_text.count("<figcaption>after</figcaption>") == 4
    imgs = _images(html_text)
    assert len(imgs) == 8 and all(max(i.size) <= 192 for i in imgs)
    assert "source not readable" not in text
    # the source gone: the report still renders, saying so
    shutil.rmtree(image_folder)
    html2 = Path(build_report(str(clean_dst), str(clean_dst / "gone.html"))).read_text()
    assert len(_images(html2)) == 4 and "source not readable" in html2


def test_report_renders_sync_counts_and_progress(clean_dst: Path) -> None:
    """Runs that record the sync counts and progress points (the incremental-sync runs) get
    those columns and a throughput chart; older runs in the same DST degrade gracefully."""
    run = {"job": "clean", "run_id": "20990101T000000Z-sync01", "status": "succeeded",
           "finished_at": "2099-01-01T00:01:00Z", "reason": None,
           "counts": {"new": 3, "changed": 2, "unchanged": 40, "deleted": 1, "failed": 1,
                      "rows_ok": 4, "rows_error": 1, "shards_published": 2},
           "progress": [[0, 0], [10.0, 2], [20.0, 4], [30.0, 5]],
           "timings": {"total_s": 31.0, "rows_per_s": 0.16}}
    legacy = {"job": "clean", "run_id": "19990101T000000Z-old001", "status": "succeeded",
              "finished_at": "1999-01-01T00:01:00Z", "counts": {"rows_ok": 1, "rows_error": 0},
              "timings": {"total_s": 2.0, "rows_per_s": 0.5}}  # before progress points existed
    for r in (run, legacy):
        (clean_dst / "_runs" / f"{r['run_id']}.json").write_text(json.dumps(r))
    records = [json.loads(f.read_text()) for f in (clean_dst / "_runs").glob("*.json")]
    with_points = sum(len(r.get("progress") or []) >= 2 for r in records)
    html_text = Path(build_report(str(clean_dst))).read_text()
    table = html_text[html_text.index('<table id="runs">'):]
    table = table[:table.index("</table>")]
    for col in ("new", "changed", "unchanged", "deleted", "failed"):
        assert f">{col}</th>" in table
    assert "<td>40</td>" in table and "<td>3</td>" in table
    assert html_text.count('class="chart progress"') == with_points >= 1
    assert "5 rows in 30 s" in _parse(html_text).plain
    assert "run 19990101T000000Z-old001: 0.5 rows/s over the run (no progress points recorded)" in html_text
    assert html_text.index("old001") < html_text.index("sync01")  # runs oldest first
    (clean_dst / "_runs" / "garbage.json").write_text("{not json")
    assert "sync01" in Path(build_report(str(clean_dst))).read_text()  # a bad record is skipped


def test_report_of_a_compress_dst(compress_dst: Path, tiny_codec: str) -> None:
    html_text = Path(build_report(str(compress_dst))).read_text()
    _assert_self_contained(html_text)
    text = _parse(html_text).plain
    assert "aejob compress report" in text and "Rate-distortion" in text
    assert html_text.count('class="chart rd"') == 1
    rd = html_text[html_text.index('class="chart rd"'):]
    rd = rd[:rd.index("</svg>")]
    assert len(re.findall(r'<circle [^>]*class="dot"', rd)) == 5  # one point per ok row
    (decoded,) = _images(html_text)
    assert decoded.size[0] > 1 and np.asarray(decoded).std() > 0  # a real decoded picture
    assert "could not decode" not in text and "bpp" in text


def test_report_of_an_s3_dst(s3_server: dict[str, str], tiny_checkpoint: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    s3.create_bucket(Bucket="reports")
    s3.put_object(Bucket="reports", Key="in/a.png", Body=encode(make_image(30, 20, 1, noise=8)))
    s3.put_object(Bucket="reports", Key="in/b.jpg", Body=encode(make_image(16, 16, 2), "JPEG"))
    s3.put_object(Bucket="reports", Key="in/bad.png", Body=b"\x89PNG\r\n\x1a\ntruncated")
    _aejob("clean", "s3://reports/in", "--out", "s3://reports/out", "--checkpoint", tiny_checkpoint)
    out = _aejob("report", "s3://reports/out")
    assert "s3://reports/out/_report/report.html" in out.splitlines()
    html_text = storage.read_bytes("s3://reports/out/_report/report.html").decode()
    _assert_self_contained(html_text)
    assert len(_images(html_text)) == 4  # two samples, each with its source read from S3
    assert "bad.png" in html_text
    # the report's folder starts with "_": DST still reads as exactly its rows
    import pyarrow.dataset as pads

    fs, path = storage.resolve("s3://reports/out")
    assert pads.dataset(path, filesystem=fs, format="parquet").count_rows() == 3


def test_report_refuses_a_folder_that_is_no_dataset(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2 and "no aejob dataset" in res.output
    assert "--samples" in CliRunner().invoke(app, ["report", "--help"]).output


# ---- headless Chromium


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("chromium is missing under CI: .ci/run installs it (apt-get install chromium)")
    pytest.skip("no chromium on this machine (apt-get install chromium)")


def _render(html_path: Path, tmp_path: Path) -> tuple[str, np.ndarray]:
    browser = _chromium()
    profile = tmp_path / "chromium-profile"
    flags = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    url = html_path.resolve().as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    png = tmp_path / "shot.png"
    shot = subprocess.run([*flags, "--window-size=1000,1400", f"--screenshot={png}", url],
                          capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0 and png.exists(), shot.stderr[-2000:]
    return dom.stdout, np.asarray(Image.open(png).convert("RGB")).astype(np.int16)


def _assert_not_blank(pixels: np.ndarray) -> None:
    assert pixels.shape[0] >= 600 and pixels.shape[1] >= 600
    ink = (np.abs(pixels - 255).sum(axis=2) > 60).mean()  # share of non-white pixels
    assert 0.01 < ink < 0.9, ink
    colour = np.abs(pixels[..., 0] - pixels[..., 2]) > 60  # thumbnails and chart dots are colourful
    assert colour.sum() > 500


def test_chromium_renders_the_clean_report(clean_dst: Path, tmp_path: Path) -> None:
    target = Path(build_report(str(clean_dst)))
    dom, pixels = _render(target, tmp_path)
    assert "aejob clean report" in dom and "truncated" in dom.lower()
    assert dom.count("data:image/png;base64,") == 8  # the browser kept every thumbnail
    _assert_not_blank(pixels)


def test_chromium_renders_the_compress_report(compress_dst: Path, tmp_path: Path) -> None:
    target = Path(build_report(str(compress_dst)))
    dom, pixels = _render(target, tmp_path)
    assert "Rate-distortion" in dom and "<svg" in dom and "Decoded sample" in dom
    _assert_not_blank(pixels)
