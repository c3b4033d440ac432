"""Unit tests of the pieces around the pipeline: resources, export names, layout, batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import layout, runner
from pipeline.batch import normalize
from pipeline.export import UnsafeKey, output_names, safe_relpath
from pipeline.infer import DenoiseEngine, pick_device
from pipeline.sources import Unit, plan_shards, shard_name_for


def test_actor_resources_leave_room_for_cpu_stages() -> None:
    cpus, threads = runner.actor_resources(runner.RayOptions(num_actors=1), cluster_cpus=2)
    assert cpus == 1.0 and threads == 2
    cpus, threads = runner.actor_resources(runner.RayOptions(num_actors=2), cluster_cpus=2)
    assert cpus * 2 <= 1.0 and threads == 1
    cpus, threads = runner.actor_resources(runner.RayOptions(num_actors=4), cluster_cpus=64)
    assert cpus == 1.0 and threads == 16
    # GPU actors: one CPU each unless asked, torch threads follow
    cpus, threads = runner.actor_resources(runner.RayOptions(num_actors=2, num_gpus=1), cluster_cpus=16)
    assert (cpus, threads) == (1.0, 1)


def test_gpu_path_with_fakes(tiny_checkpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    eng = DenoiseEngine(tiny_checkpoint, device="cpu")
    assert eng.amp is False  # AMP only on CUDA
    # pretend the engine sits on a GPU: autocast must be requested for CUDA in float16
    eng.amp = True
    ctx = eng._autocast()
    assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == torch.float16


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
    assert st.done_units == set()
    (tmp_path / "d" / "orphan.parquet").write_bytes(b"x")  # a file whose marker never came
    layout.write_json(layout.marker_file(dst, "s1"), {"shard": "s1", "units": ["a", "b"]})
    (tmp_path / "d" / "s1.parquet").write_bytes(b"x")
    st = layout.prepare(dst, {"format": "png"}, overwrite=False)
    assert st.removed_orphans == ["orphan"] and st.done_units == {"a", "b"}
    assert not (tmp_path / "d" / "orphan.parquet").exists()
    with pytest.raises(layout.DstError, match="format: 'png' -> 'webp'"):
        layout.prepare(dst, {"format": "webp"}, overwrite=False)
    st = layout.prepare(dst, {"format": "webp"}, overwrite=True)
    assert st.done_units == set() and not (tmp_path / "d" / "s1.parquet").exists()


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
