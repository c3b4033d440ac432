"""Classical denoising baselines and the ``aejob bench denoise`` benchmark (small and fast)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs import bench
from models import baselines
from models.baselines import METHOD_NAMES, Method, get_method
from models.noise import add_awgn_uint8
from tests.conftest import make_image


@pytest.fixture(scope="module")
def natural() -> np.ndarray:
    """A 96x96 crop of a real photo at its native scale (face and background)."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[40:136, 176:272])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    import torch

    from models import checkpoint, registry

    torch.manual_seed(0)
    cfg = registry.make_config("resunet-denoiser", "tiny")
    path = tmp_path_factory.mktemp("bench-ck") / "tiny.safetensors"
    checkpoint.save(path, "resunet-denoiser", cfg, registry.build("resunet-denoiser", cfg),
                    {"kind": "denoiser"})
    return str(path)


def test_registry_of_methods() -> None:
    assert set(METHOD_NAMES) == {"noisy", "gaussian", "median", "nlm", "bm3d", "aejob", "aejob-blind",
                                 "aejob-sigma", "aejob-x2", "aejob-x4", "aejob-x8"}
    for name in ("noisy", "gaussian", "median", "nlm"):
        m = get_method(name, checkpoint="ignored")
        assert isinstance(m, Method) and m.name == name and not m.blind
    with pytest.raises(KeyError, match="unknown method"):
        get_method("wiener")


def test_parameter_rules() -> None:
    assert baselines.gaussian_width(0) == 0 and baselines.median_size(0) == 1
    widths = [baselines.gaussian_width(s) for s in (5, 15, 25, 50)]
    sizes = [baselines.median_size(s) for s in (5, 15, 25, 50, 75)]
    assert widths == sorted(widths) and widths[2] == pytest.approx(0.95)
    assert sizes == [1, 3, 5, 7, 9]


@pytest.mark.parametrize("name", ["gaussian", "median", "nlm"])
@pytest.mark.parametrize("image", ["natural", "smooth"])
def test_classical_methods_improve_psnr(name: str, image: str, natural: np.ndarray) -> None:
    clean = natural if image == "natural" else make_image(64, 64)
    noisy = add_awgn_uint8(clean, 25, seed=1)
    m = get_method(name)
    base = bench.psnr(clean, noisy)
    for sigma in (25.0, None):  # true σ, and σ estimated from the image
        out = m.denoise(noisy, sigma)
        assert out.dtype == np.uint8 and out.shape == clean.shape
        assert bench.psnr(clean, out) > base + 1.0, (name, sigma)
    # nothing to remove: the input comes back unchanged
    np.testing.assert_array_equal(m.denoise(clean, 0.0), clean)


def test_noisy_is_identity_and_input_is_checked(natural: np.ndarray) -> None:
    out = get_method("noisy").denoise(natural, 25.0)
    np.testing.assert_array_equal(out, natural)
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        get_method("gaussian").denoise(natural.astype(np.float32), 25.0)


def test_bm3d_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bm3d", None)  # import bm3d -> ImportError
    assert not baselines.bm3d_available()
    with pytest.raises(ImportError, match=r"pip install aejob\[bm3d\]"):
        get_method("bm3d")


@pytest.mark.slow
def test_bm3d_improves_psnr() -> None:
    pytest.importorskip("bm3d")
    clean = make_image(48, 48)
    noisy = add_awgn_uint8(clean, 25, seed=2)
    out = get_method("bm3d").denoise(noisy, 25.0)
    assert out.dtype == np.uint8 and bench.psnr(clean, out) > bench.psnr(clean, noisy) + 3


def _folder(tmp_path: Path, n: int) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(n):
        Image.fromarray(make_image(48 + 8 * i, 40, seed=i)).save(d / f"img{i}.png")
    return d


def test_bench_denoise_writes_json_and_html(tmp_path: Path, tiny_model: str) -> None:
    data = _folder(tmp_path, 2)
    out = tmp_path / "out"
    doc = bench.bench_denoise(str(data), [0, 25], ["noisy", "gaussian", "aejob"], limit=0,
                              out_dir=str(out), checkpoint=tiny_model, bm3d_limit=1, seed=3,
                              threads=1, show=False)
    on_disk = json.loads((out / "bench_denoise.json").read_text())
    assert on_disk == json.loads(json.dumps(doc))
    assert [im["name"] for im in doc["images"]] == ["img0.png", "img1.png"]
    assert doc["checkpoint"]["sha256"] and len(doc["checkpoint"]["sha256"]) == 64
    assert doc["machine"]["torch_threads"] == 1 and doc["machine"]["cpu_count"]
    assert doc["config"]["sigma_given"]["aejob"].startswith("none")
    assert set(doc["estimated_sigma"]) == {"0", "25"}
    for m in ("noisy", "gaussian", "aejob"):
        for k in ("0", "25"):
            e = doc["results"][m]["sigmas"][k]
            assert len(e["per_image"]) == 2 and e["all"]["n"] == 2
            assert "subset" not in e  # no bm3d: no subset rows
            r = e["per_image"][0]
            assert {"psnr", "ssim", "seconds", "psnr_vs_input"} <= set(r)
    res = doc["results"]
    # σ=0: the input is the clean image; identity scores the cap
    assert res["noisy"]["sigmas"]["0"]["all"]["psnr"] == bench.PSNR_CAP
    assert res["gaussian"]["sigmas"]["0"]["all"]["psnr"] == bench.PSNR_CAP
    assert res["gaussian"]["sigmas"]["25"]["all"]["psnr"] > res["noisy"]["sigmas"]["25"]["all"]["psnr"]
    # same seeded noise as add_awgn_uint8 with the documented seed rule
    clean = np.asarray(Image.open(data / "img1.png").convert("RGB"))
    noisy = add_awgn_uint8(clean, 25, seed=bench.noise_seed(3, 1, 25))
    assert res["noisy"]["sigmas"]["25"]["per_image"][1]["psnr"] == pytest.approx(bench.psnr(clean, noisy))
    assert {(r["method"], r["sigma"], r["set"]) for r in doc["summary"]} == {
        (m, s, "all") for m in ("noisy", "gaussian", "aejob") for s in (0.0, 25.0)}
    page = (out / "bench_denoise.html").read_text()
    assert page.count("data:image/png;base64,") == 2 * 2 * 4  # 2 images x 2 σ x (clean, noisy, 2)
    assert "σ=25" in page and "aejob" in page and doc["checkpoint"]["sha256"] in page


def test_bench_bm3d_subset_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """BM3D runs on the first ``bm3d_limit`` images; every method gets a row on that subset."""

    class FakeBM3D(Method):
        name = "bm3d"

        def _run(self, img: np.ndarray, sigma: float) -> np.ndarray:
            return get_method("gaussian").denoise(img, sigma)

    monkeypatch.setitem(baselines._FACTORIES, "bm3d", lambda **kw: FakeBM3D())
    monkeypatch.setattr(baselines, "bm3d_available", lambda: True)
    data = _folder(tmp_path, 3)
    doc = bench.bench_denoise(str(data), [25], ["noisy", "gaussian", "bm3d"], limit=0,
                              out_dir=str(tmp_path / "o"), checkpoint="missing-checkpoint",
                              bm3d_limit=2, threads=1, examples=3, show=False)
    assert doc["subset"]["n"] == 2 and doc["subset"]["images"] == ["img0.png", "img1.png"]
    rows = {(r["method"], r["set"]): r for r in doc["summary"]}
    assert set(rows) == {("noisy", "all"), ("gaussian", "all"), ("noisy", "subset"),
                         ("gaussian", "subset"), ("bm3d", "subset")}
    assert rows[("bm3d", "subset")]["n"] == 2 and rows[("noisy", "all")]["n"] == 3
    # like for like: the fake bm3d is gaussian, so their subset rows agree
    assert rows[("bm3d", "subset")]["psnr"] == pytest.approx(rows[("gaussian", "subset")]["psnr"])
    assert doc["checkpoint"]["sha256"] is None  # no model asked for, none needed
    table = bench._table_rows(doc)[1]
    assert [label for label, _ in table] == ["noisy (all 3)", "gaussian (all 3)",
                                             "noisy (first 2)", "gaussian (first 2)",
                                             "bm3d (first 2)"]
    page = (tmp_path / "o" / "bench_denoise.html").read_text()
    assert "not run" in page  # the third image has no bm3d crop


def test_cli_help_and_run(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()
    bench_app = typer.Typer()
    app.add_typer(bench_app, name="bench")
    bench.register(bench_app)
    runner = CliRunner()
    res = runner.invoke(app, ["bench", "denoise", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for opt in ("--data", "--sigma", "--methods", "--limit", "--bm3d-limit", "--checkpoint",
                "--out", "--threads"):
        assert opt in res.output
    data = _folder(tmp_path, 1)
    out = tmp_path / "cli-out"
    res = runner.invoke(app, ["bench", "denoise", "--data", str(data), "--sigma", "15",
                              "--methods", "noisy,median", "--out", str(out), "--threads", "1"],
                        env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "median" in res.output and (out / "bench_denoise.json").exists()
    bad = runner.invoke(app, ["bench", "denoise", "--data", str(data), "--methods", "wiener"])
    assert bad.exit_code != 0
