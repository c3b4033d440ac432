"""Unit tests of the pieces around the pipeline: resources, export names, layout, batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline import layout, runner
from pipeline.actors import threads_for
from pipeline.batch import normalize
from pipeline.export import UnsafeKey, output_names, safe_relpath
from pipeline.infer import DenoiseEngine, pick_device
from pipeline.sources import Unit, plan_shards, shard_name_for


def test_actor_plan_leaves_room_for_cpu_stages_and_scales_with_the_cluster() -> None:
    # the 2-CPU local default: one 1-CPU actor (the CPU stages keep the other CPU), 2 threads
    ap = runner.actor_plan(runner.RayOptions(), cluster_cpus=2)
    assert (ap.cpus, ap.min_size, ap.max_size, ap.threads) == (1.0, 1, 1, 0)
    assert threads_for(node_cpus=2, actors_on_node=ap.max_size) == 2
    ap = runner.actor_plan(runner.RayOptions(num_actors=2), cluster_cpus=2)
    assert ap.cpus * 2 <= 1.0 and ap.min_size == ap.max_size == 2
    # a 64-CPU cluster scales the pool up to what it holds
    ap = runner.actor_plan(runner.RayOptions(), cluster_cpus=64)
    assert ap.min_size == 1 and ap.max_size == 48 and ap.cpus == 1.0
    ap = runner.actor_plan(runner.RayOptions(max_actors=8), cluster_cpus=64)
    assert ap.max_size == 8
    # GPU actors: one CPU each unless asked; as many as the GPUs hold
    ap = runner.actor_plan(runner.RayOptions(num_gpus=1), cluster_cpus=16, cluster_gpus=4)
    assert (ap.cpus, ap.max_size) == (1.0, 4)
    assert runner.actor_plan(runner.RayOptions(num_gpus=0.5, num_actors=3), 16, 4).max_size == 3


def test_parts_hold_one_model_batch_on_small_object_stores() -> None:
    """The write stage's bundle still holds decoded pixels: 16-row parts only where the smallest
    node's object store is roomy (a 150 MiB store stalled behind 26 MB bundles)."""
    assert runner.part_rows(4, 150 * 2**20) == 4
    assert runner.part_rows(4, 0) == 4  # unknown: the safe choice
    assert runner.part_rows(4, 7 * 2**30) == 16
    assert runner.part_rows(32, 7 * 2**30) == 32  # never below one model batch


def test_threads_come_from_the_node_not_the_cluster() -> None:
    # 4 one-CPU actors on a 64-CPU cluster of 16 four-CPU nodes: the actors' own nodes decide
    ap = runner.actor_plan(runner.RayOptions(num_actors=4), cluster_cpus=64)
    assert ap.threads == 0  # not fixed by the driver: each actor asks its node
    assert threads_for(node_cpus=4, actors_on_node=1) == 4
    assert threads_for(node_cpus=4, actors_on_node=4) == 1
    assert threads_for(node_cpus=64, actors_on_node=4) == 16  # one big node: shared four ways
    assert threads_for(node_cpus=2, actors_on_node=3) == 1  # never 0
    assert runner.actor_plan(runner.RayOptions(threads=3), cluster_cpus=64).threads == 3


def test_engine_device_and_amp(tiny_checkpoint: str) -> None:
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    eng = DenoiseEngine(tiny_checkpoint, device="cpu")
    assert eng.amp is False  # AMP only on CUDA


def test_safe_relpath_refuses_escapes() -> None:
    assert safe_relpath("a/b/../c.png".replace("../", "")) == "a/b/c.png"
    assert safe_relpath("./x//y.jpg") == "x/y.jpg"
    for bad in ("../etc/passwd", "/abs/path.png", "a/../../b.png", "", "C:\\win.png", "..\\x.png"):
        with pytest.raises(UnsafeKey):
            safe_relpath(bad)


def test_output_names_resolve_collisions() -> None:
    names = output_names(["a.jpg", "a.png", "b.tif", "dir/c.webp", "d"], ".png")
    assert names == {"a.jpg": "a.jpg.png", "a.png": "a.png.png", "b.tif": "b.png",
                     "dir/c.webp": "dir/c.png", "d": "d.png"}


def test_shard_names_are_deterministic() -> None:
    units = [Unit(f"k{i}.png", f"/s/k{i}.png", "file", 1) for i in range(5)] + [Unit("t.tar", "/s/t.tar", "tar", 9)]
    a, b = plan_shards(units, 2), plan_shards(list(reversed(units)), 2)
    assert sorted(s.name for s in a) == sorted(s.name for s in plan_shards(units, 2))
    assert shard_name_for(["t.tar"], "tar").startswith("t.tar-")
    assert len(a) == 4 and {len(s.units) for s in a} == {1, 2}
    assert {s.name for s in b if s.units[0].kind == "tar"} == {s.name for s in a if s.units[0].kind == "tar"}


def test_normalize_restores_object_columns() -> None:
    batch = {"key": np.array(["a", "b"]), "error": np.array([np.nan, np.nan]), "width": np.array([1, 2]),
             "emb": np.ones((2, 3), np.float32)}
    out = normalize(batch)
    assert out["key"].dtype == object and out["key"][0] == "a"
    assert list(out["error"]) == [None, None]
    assert out["width"].dtype.kind == "i"
    assert out["emb"][1].shape == (3,)


def test_prepare_refuses_other_settings_and_cleans_orphans(tmp_path: Path) -> None:
    dst = str(tmp_path / "d")
    st = layout.prepare(dst, {"format": "png"}, overwrite=False)
    assert len(st.done) == 0
    (tmp_path / "d" / "orphan.parquet").write_bytes(b"x")  # a file whose marker never came
    layout.write_json(layout.marker_file(dst, "s1"), {"shard": "s1", "units": ["a", "b"], "rows": 2, "ok": 2})
    (tmp_path / "d" / "s1.parquet").write_bytes(b"x")
    st = layout.prepare(dst, {"format": "png"}, overwrite=False)
    assert st.removed_orphans == ["orphan"] and list(st.done.contains(["a", "b", "c"])) == [True, True, False]
    assert st.shards == 1 and st.totals == {"rows": 2, "ok": 2, "error": 0}
    assert not (tmp_path / "d" / "orphan.parquet").exists()
    with pytest.raises(layout.DstError, match="format: 'png' -> 'webp'"):
        layout.prepare(dst, {"format": "webp"}, overwrite=False)
    st = layout.prepare(dst, {"format": "webp"}, overwrite=True)
    assert len(st.done) == 0 and not (tmp_path / "d" / "s1.parquet").exists()


def test_lease_refuses_a_second_live_run(tmp_path: Path) -> None:
    first = layout.Lease(str(tmp_path), ttl_s=30)
    first.acquire()
    try:
        with pytest.raises(layout.DstError, match="holds the lease"):
            layout.Lease(str(tmp_path), ttl_s=30).acquire()
    finally:
        first.release()
    second = layout.Lease(str(tmp_path), ttl_s=30)
    second.acquire()  # released: free again
    second.release()


def test_cpu_stage_functions_do_not_import_torch(tiny_checkpoint: str, tiny_hyper_codec: str) -> None:
    """Ray imports each CPU stage function's module in every CPU worker: none may pull torch."""
    import subprocess
    import sys

    from jobs import clean, compress

    specs = [clean.build_spec(clean.CleanConfig(src="in", dst="out", checkpoint=tiny_checkpoint), runner.RayOptions()),
             compress.build_spec(compress.CompressConfig(src="in", dst="out", checkpoint=tiny_hyper_codec),
                                 runner.RayOptions())]
    funcs = [f for s in specs for f in (s.prepare, s.post)] + [runner.read_plan]
    mods = sorted({getattr(f, "func", f).__module__ for f in funcs} | {"pipeline.sink", "pipeline.sources"})
    code = f"import sys\nfor m in {mods!r}: __import__(m)\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False", mods


def test_noise_estimate_matches_scikit_image_without_importing_it() -> None:
    """The decode stage's wavelet MAD estimate: scikit-image's numbers, PyWavelets' import cost."""
    import subprocess
    import sys

    from skimage.restoration import estimate_sigma as skimage_estimate

    from pipeline.noise_level import estimate_sigma

    rng = np.random.default_rng(0)
    base = np.kron(rng.integers(40, 200, (24, 32, 3)), np.ones((16, 16, 1)))  # 384x512 blocks
    for sigma in (5.0, 15.0, 25.0, 50.0):
        img = np.clip(np.round(base + rng.normal(0, sigma, base.shape)), 0, 255).astype(np.uint8)
        ours = estimate_sigma(img)
        ref = float(skimage_estimate(img.astype(np.float32), channel_axis=-1, average_sigmas=True))
        assert ours == pytest.approx(ref, rel=1e-6)
        assert ours == pytest.approx(sigma, rel=0.15)  # tracks the true level (clipping aside)
    assert 0.0 <= estimate_sigma(np.full((64, 64, 3), 128, np.uint8)) < 1e-6  # flat: ~0, never NaN
    code = ("import sys, numpy as np\nfrom pipeline.noise_level import estimate_sigma\n"
            "estimate_sigma(np.random.default_rng(0).integers(0, 255, (64, 64, 3)).astype(np.uint8))\n"
            "print('skimage' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"


def test_recent_stats_keeps_the_last_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "STATS_BLOCKS_KEPT", 4)
    kept = runner.RecentStats()
    for i in range(50):
        kept.append(i)
        assert len(kept) <= 8
    kept.extend(range(50, 53))
    assert kept[-4:] == [49, 50, 51, 52] and len(kept) <= 8


def test_ray_data_block_stats_are_bounded_in_the_driver(ray_local: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real Ray Data run after cap_block_stats: every map operator's per-block stats stay bounded
    (Ray Data would keep one per output block), and the run and its stats summary still work."""
    import ray
    from ray.data._internal.execution.operators.map_operator import MapOperator

    monkeypatch.setattr(runner, "STATS_BLOCKS_KEPT", 3)
    runner.cap_block_stats()
    runner.cap_block_stats()  # idempotent: not wrapped twice
    lengths: list[int] = []
    get_stats = MapOperator.get_stats

    def spy(self: MapOperator) -> Any:
        lengths.append(len(self._output_blocks_stats))
        return get_stats(self)

    monkeypatch.setattr(MapOperator, "get_stats", spy)
    ds = ray.data.range(60, override_num_blocks=30).map_batches(lambda b: {"id": b["id"] * 2}, batch_size=2)
    rows = ds.take_all()
    assert sorted(r["id"] for r in rows) == [2 * i for i in range(60)]
    assert "MapBatches" in ds.stats()
    assert lengths and 1 <= max(lengths) <= 6


def test_driver_malloc_tuning_applies_on_glibc() -> None:
    import platform
    import subprocess
    import sys

    from pipeline import malloc

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    # in a fresh process, so this test run's own arenas are left alone
    code = ("from pipeline import malloc; import threading; assert malloc.limit_arenas(); "
            "ts = [threading.Thread(target=lambda: [bytearray(1000) for _ in range(1000)]) for _ in range(8)]; "
            "[t.start() for t in ts]; [t.join() for t in ts]; assert malloc.release(); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "ok", out.stderr
    assert malloc.release()


def test_driver_io_peak_sampler_sees_private_memory() -> None:
    from jobs import driver_io

    if not driver_io.rss_parts():
        pytest.skip("no /proc/self/status")
    peaks = driver_io.PeakSampler(every_s=0.05)
    before = peaks.private
    block = bytearray(64 << 20)
    block[::4096] = b"x" * len(block[::4096])  # touch every page
    peaks.sample()
    assert peaks.private >= before + (60 << 20)
    assert peaks.shmem >= 0 and driver_io.read_io()["wchar"] >= 0
