"""The bench's bare loops: the sequential one and the two-thread one do the same work."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from jobs.bench_pipeline import bare_loop, median_pair
from tests.conftest import make_image


def test_two_thread_bare_loop_writes_the_sequential_loops_files(tmp_path: Path) -> None:
    src = tmp_path / "noisy"
    src.mkdir()
    for i in range(4):
        Image.fromarray(make_image(64 + 8 * i, 48, i, noise=20)).save(src / f"{i}.png")
    one = bare_loop(str(src), "denoiser-base", 2, 4, str(tmp_path / "one"))
    two = bare_loop(str(src), "denoiser-base", 2, 4, str(tmp_path / "two"), workers=2)
    assert one["engine"] == two["engine"] and one["seconds"] > 0 and two["seconds"] > 0
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == [f"{i}.png" for i in range(4)] == sorted(p.name for p in (tmp_path / "two").iterdir())
    for n in names:  # same engine, one image per call: the same bytes whatever the threads
        assert (tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes()


def test_median_pair_is_the_middle_ratio() -> None:
    pairs = [{"job_over_bare": r} for r in (0.95, 0.85, 0.9, 1.0)]
    assert median_pair(pairs)["job_over_bare"] == 0.9
