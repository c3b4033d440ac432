"""Rate control of ``aejob compress``: ``--target-psnr`` and ``--max-bpp`` pick the quality rung
per image. The search is checked against a brute force over every rung of the shipped codecs on
small generated images, then end to end through the pipeline with real Parquet read back."""

from __future__ import annotations

import itertools
import json
import math
import operator
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from models.codec import CodecEngine, rung_search
from models.metrics import psnr_uint8
from tests.conftest import encode, make_image

INF = float("inf")


@pytest.fixture(scope="module", params=["codec-ctx", "codec-small"])
def engine(request: pytest.FixtureRequest) -> CodecEngine:
    """A shipped codec: checkerboard/hyperprior (ctx) and factorized (small) coding paths."""
    return CodecEngine(request.param, threads=1)


# images whose ladders rise monotonically in bpp and PSNR (asserted: the brute force's premise)
Spec = tuple[int, int, int, float]
IMAGES: list[Spec] = [(64, 48, 1, 0.0), (96, 64, 2, 8.0)]  # width, height, seed, noise


def image(spec: Spec) -> np.ndarray:
    w, h, seed, noise = spec
    return make_image(w, h, seed, noise=noise)


def brute_force(engine: CodecEngine, img: np.ndarray) -> dict[int, tuple[float, float]]:
    """quality -> (bpp, PSNR) of every rung, each coded on its own (plain compress)."""
    out = {}
    for q in engine.qualities:
        data = engine.compress(img, q)
        out[q] = (len(data) * 8 / (img.shape[0] * img.shape[1]), psnr_uint8(engine.decompress(data), img, INF))
    return out


def probes(values: list[float]) -> list[float]:
    """Targets below, at, between and above the rungs' values."""
    v = sorted(values)
    mids = [(a + b) / 2 for a, b in itertools.pairwise(v)]
    return [v[0] / 2, *v, *mids, v[-1] * 1.5]


def expected(rd: dict[int, tuple[float, float]], target_psnr: float | None, max_bpp: float | None) -> int:
    """The definition, by brute force over all rungs."""
    qs = sorted(rd)
    top = qs[-1]
    if max_bpp is not None:
        fit = [q for q in qs if rd[q][0] <= max_bpp]
        top = max(fit) if fit else qs[0]
    if target_psnr is None:
        return top
    reach = [q for q in qs if q <= top and rd[q][1] >= target_psnr]
    return min(reach) if reach else top


# ---------------------------------------------------------------------------- the search itself
@pytest.mark.parametrize("n", range(1, 9))
def test_rung_search_equals_a_linear_scan_on_monotone_predicates(n: int) -> None:
    budget = math.ceil(math.log2(n + 1))
    calls: list[int] = []

    def counted(pred: Callable[[int], bool]) -> Callable[[int], bool]:
        def f(r: int) -> bool:
            calls.append(r)
            return pred(r)
        return f

    for edge in range(1, n + 2):  # rungs >= edge are true (edge = n+1: none)
        calls.clear()
        first = rung_search(counted(partial(operator.le, edge)), 1, n)  # true where edge <= r
        assert first == (edge if edge <= n else None)
        assert len(calls) <= budget and len(set(calls)) == len(calls)
        calls.clear()
        last = rung_search(counted(partial(operator.gt, edge)), 1, n, last=True)  # true where r < edge
        assert last == (edge - 1 if edge > 1 else None)
        assert len(calls) <= budget
    assert rung_search(lambda r: True, 3, 2) is None


def test_rung_search_on_a_non_monotone_predicate_returns_a_boundary() -> None:
    """A ladder whose PSNR dips (seen at the top of noisy images): the answer still qualifies
    and the rung below it does not."""
    for bits in itertools.product([False, True], repeat=6):
        pred = lambda r, b=bits: b[r - 1]  # noqa: E731
        q = rung_search(pred, 1, 6)
        if q is not None:
            assert pred(q) and (q == 1 or not pred(q - 1))
        q = rung_search(pred, 1, 6, last=True)
        if q is not None:
            assert pred(q) and (q == 6 or not pred(q + 1))


# ---------------------------------------------------------------------------- the engine
@pytest.mark.parametrize("spec", IMAGES)
def test_target_psnr_picks_the_smallest_rung_reaching_it(engine: CodecEngine, spec: Spec) -> None:
    img = image(spec)
    rd = brute_force(engine, img)
    psnrs = [rd[q][1] for q in engine.qualities]
    assert psnrs == sorted(psnrs), psnrs  # premise of the brute-force comparison
    for p in probes(psnrs):
        coded = engine.compress_controlled(img, target_psnr=p)
        assert coded.quality == expected(rd, p, None), (p, rd)
        assert coded.psnr >= p or coded.quality == engine.qualities[-1]
        # the stream is exactly what a plain compress at that rung writes (shared analysis)
        assert coded.data == engine.compress(img, coded.quality)
        assert np.array_equal(coded.image, engine.decompress(coded.data))
        assert coded.psnr == pytest.approx(rd[coded.quality][1])
        assert coded.bpp == pytest.approx(len(coded.data) * 8 / (img.shape[0] * img.shape[1]))
        assert len(coded.tried) <= math.ceil(math.log2(len(engine.qualities) + 1))


@pytest.mark.parametrize("spec", IMAGES)
def test_max_bpp_respects_the_cap(engine: CodecEngine, spec: Spec) -> None:
    img = image(spec)
    rd = brute_force(engine, img)
    rates = [rd[q][0] for q in engine.qualities]
    assert rates == sorted(rates), rates
    for b in probes(rates):
        coded = engine.compress_controlled(img, max_bpp=b)
        assert coded.quality == expected(rd, None, b), (b, rd)
        if b >= rates[0]:
            assert coded.bpp <= b
        else:  # no rung fits: the lowest
            assert coded.quality == engine.qualities[0]
        assert coded.data == engine.compress(img, coded.quality)


@pytest.mark.parametrize("spec", IMAGES[:1])
def test_target_psnr_under_a_bpp_cap(engine: CodecEngine, spec: Spec) -> None:
    img = image(spec)
    rd = brute_force(engine, img)
    rates, psnrs = [v[0] for v in rd.values()], [v[1] for v in rd.values()]
    for p, b in itertools.product(probes(psnrs)[::2], probes(rates)[::2]):
        coded = engine.compress_controlled(img, target_psnr=p, max_bpp=b)
        assert coded.quality == expected(rd, p, b), (p, b, rd)
        assert coded.bpp <= b or coded.quality == engine.qualities[0]
        # never more than the cap allows, never more than the target needs
        assert coded.quality <= expected(rd, None, b) and coded.quality <= expected(rd, p, None)


def test_analysis_runs_once_per_image_and_fixed_quality_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    eng = CodecEngine("codec-ctx", threads=1)
    img = make_image(64, 48, 1)
    assert eng.compress_controlled(img).data == eng.compress(img)  # default: the checkpoint's quality
    assert eng.compress_controlled(img, quality=2).quality == 2
    calls: list[int] = []
    real = eng.model.analysis

    def analysis(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return real(x)

    monkeypatch.setattr(eng.model, "analysis", analysis)
    coded = eng.compress_controlled(img, target_psnr=31.0, max_bpp=1.2)
    assert len(calls) == 1 and len(coded.tried) >= 3
    with pytest.raises(ValueError, match="fixed quality"):
        eng.compress_controlled(img, quality=3, target_psnr=30.0)
    for bad in (0.0, -1.0, float("nan"), INF):
        with pytest.raises(ValueError):
            eng.compress_controlled(img, max_bpp=bad)
    with pytest.raises(ValueError, match="analysis of a"):
        eng.model.compress(img, 3, analysed=eng.model.analyse(make_image(32, 32)))


# ---------------------------------------------------------------------------- the job
def test_fixed_quality_fingerprint_is_unchanged_and_settings_are_checked(tmp_path: Path) -> None:
    from jobs.compress import CompressConfig, build_spec
    from pipeline import runner

    spec = build_spec(CompressConfig(src=str(tmp_path), dst=str(tmp_path / "z")), runner.RayOptions())
    assert "rate_control" not in spec.fingerprint and spec.fingerprint["quality"] == 5  # default codec's rung
    assert spec.resolved["rate_control"] is None and spec.actor_kwargs["target_psnr"] is None
    spec = build_spec(CompressConfig(src=str(tmp_path), dst=str(tmp_path / "z"), target_psnr=33.0, max_bpp=1.5),
                      runner.RayOptions())
    rc = spec.fingerprint["rate_control"]
    assert rc["mode"] == "target_psnr+max_bpp" and rc["target_psnr"] == 33.0 and rc["max_bpp"] == 1.5
    assert spec.fingerprint["quality"] is None and spec.resolved["rate_control"] == rc
    assert spec.actor_kwargs["target_psnr"] == 33.0 and spec.actor_kwargs["max_bpp"] == 1.5
    from jobs.cli import app

    cli = CliRunner()
    for args in (["--quality", "3", "--target-psnr", "30"], ["--max-bpp", "0"], ["--target-psnr", "-2"]):
        res = cli.invoke(app, ["compress", str(tmp_path), "--out", str(tmp_path / "z"), *args])
        assert res.exit_code == 2, res.output
    help_text = cli.invoke(app, ["compress", "--help"], env={"COLUMNS": "200"}).output
    assert "--target-psnr" in help_text and "--max-bpp" in help_text


@pytest.mark.usefixtures("ray_local")
def test_compress_with_target_psnr_end_to_end(tmp_path: Path) -> None:
    from jobs.cli import app
    from jobs.compress import DEFAULT_CODEC

    src = tmp_path / "src"
    src.mkdir()
    imgs = {"flat.png": make_image(48, 40, 1), "noisy.png": make_image(64, 48, 2, noise=8),
            "small.png": make_image(33, 17, 3), "rough.png": make_image(40, 32, 4, noise=25)}
    for name, img in imgs.items():
        (src / name).write_bytes(encode(img))
    (src / "broken.png").write_bytes(b"\x89PNG not really")
    dst, target = tmp_path / "z", 30.0
    cli = CliRunner()
    dry = cli.invoke(app, ["compress", str(src), "--out", str(dst), "--target-psnr", str(target), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.output[dry.output.index("{"):])
    assert plan["pending_units"] == 5 and plan["estimated_seconds"] > 0
    assert not (dst / "_manifest.json").exists()

    res = cli.invoke(app, ["compress", str(src), "--out", str(dst), "--target-psnr", str(target),
                           "--max-bpp", "3.0"])
    assert res.exit_code == 0, res.output
    rows = {r["key"]: r for r in pads.dataset(str(dst), format="parquet").to_table().to_pylist()}
    assert set(rows) == {*imgs, "broken.png"}
    assert rows["broken.png"]["status"] == "error" and rows["broken.png"]["quality"] is None
    eng = CodecEngine(DEFAULT_CODEC, threads=1)  # what the command ran
    for key, img in imgs.items():
        r = rows[key]
        assert r["status"] == "ok" and r["codec"] == "aejob"
        rd = brute_force(eng, img)
        assert r["quality"] == expected(rd, target, 3.0), (key, rd)
        assert r["psnr"] == pytest.approx(rd[r["quality"]][1])
        assert r["bpp"] == pytest.approx(len(r["latent"]) * 8 / (img.shape[0] * img.shape[1]))
        assert r["bpp"] <= 3.0 or r["quality"] == 1
        assert r["latent"] == eng.compress(img, r["quality"])
    assert any(r["quality"] != rows["flat.png"]["quality"] for r in rows.values() if r["status"] == "ok")
    manifest = json.loads((dst / "_manifest.json").read_text())
    assert manifest["config"]["target_psnr"] == target and manifest["config"]["max_bpp"] == 3.0
    assert manifest["config"]["rate_control"]["mode"] == "target_psnr+max_bpp"
    assert json.loads((dst / "_config.json").read_text())["rate_control"]["target_psnr"] == target

    # the archive decodes and verifies as ever; a rerun with another target is refused
    res = cli.invoke(app, ["decompress", str(dst), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    for key, img in imgs.items():
        back = np.asarray(Image.open(tmp_path / "o" / key).convert("RGB"))
        assert psnr_uint8(back, img, INF) == pytest.approx(rows[key]["psnr"])
    res = cli.invoke(app, ["verify", str(dst), "--against", str(src)])
    assert res.exit_code == 0, res.output
    res = cli.invoke(app, ["compress", str(src), "--out", str(dst), "--target-psnr", "35"])
    assert res.exit_code == 2 and "rate_control" in res.output
