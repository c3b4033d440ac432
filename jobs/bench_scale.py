"""``aejob bench scale``: what the driver costs as the input grows.

Each measurement runs the unchanged CLI as its own driver process (``jobs.driver_io``) and reads
that process's ``wchar`` (every byte it wrote) and peak RSS:

- write share: ``aejob clean SRC --out DST --format png`` of photos on a two-node
  ``ray.cluster_utils.Cluster`` (a head with 0 CPUs, one 2-CPU worker node): driver wchar / DST bytes;
- memory per key: full clean runs over 10,000 and 100,000 small PNGs (64x64):
  (peak RSS at 100k − peak RSS at 10k) / 90,000, listing time, rows/s;
- planning only: ``--dry-run`` over a 1,000,000-key Parquet key list: peak RSS and listing time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]


def _driver(args: list[str], work: Path, name: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    rec = work / f"{name}.json"
    t = time.time()
    p = subprocess.run([sys.executable, "-m", "jobs.driver_io", str(rec), *args], cwd=ROOT,
                       env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{name} failed ({p.returncode}): {p.stdout[-2000:]}{p.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(rec.read_text())
    out["wall_s"] = round(time.time() - t, 2)
    out["stdout"] = p.stdout
    return out


def _dst_bytes(dst: Path) -> int:
    return sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())


def small_pngs(folder: Path, n: int, size: int = 64) -> None:
    """n distinct small PNGs in folders of 1,000 (a smooth pattern + noise: a realistic size)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    base = np.linspace(0, 200, size, dtype=np.float32)
    for i in range(n):
        d = folder / f"d{i // 1000:04d}"
        if i % 1000 == 0:
            d.mkdir(parents=True, exist_ok=True)
        img = (base[None, :, None] + base[:, None, None] * 0.2 + (i % 50)
               + rng.normal(0, 8, (size, size, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"{i:07d}.png", compress_level=1)


def write_share(photos: str, work: Path, checkpoint: str, limit: int) -> dict[str, Any]:
    from ray.cluster_utils import Cluster

    src = work / "photos"
    src.mkdir()
    files = sorted(p for p in Path(photos).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:limit]
    for p in files:
        shutil.copy(p, src / p.name)
    env = {"RAY_AUTH_MODE": "disabled"}
    os.environ.update(env)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        dst = work / "photos-dst"
        r = _driver(["clean", str(src), "--out", str(dst), "--format", "png", "--checkpoint", checkpoint],
                    work, "write-share", {**env, "RAY_ADDRESS": cluster.address})
    finally:
        cluster.shutdown()
    total = _dst_bytes(dst)
    return {"images": len(files), "driver_wchar": r["wchar"], "dst_bytes": total,
            "driver_share": r["wchar"] / total, "seconds": r["wall_s"]}


def memory_per_key(work: Path, sizes: tuple[int, int], checkpoint: str) -> dict[str, Any]:
    runs = {}
    for n in sizes:
        src = work / f"small-{n}"
        t = time.time()
        small_pngs(src, n)
        gen_s = time.time() - t
        dst = work / f"small-{n}-dst"
        # tiny images: 64 per model call, so the run measures the driver, not per-call overhead
        r = _driver(["clean", str(src), "--out", str(dst), "--format", "png", "--checkpoint", checkpoint,
                     "--batch-size", "64"], work, f"clean-{n}")
        manifest = json.loads((dst / "_manifest.json").read_text())
        runs[n] = {"inputs": n, "peak_rss_bytes": r["peak_rss_bytes"],
                   "peak_rss_private_bytes": r["peak_rss_private_bytes"],
                   "peak_rss_shmem_bytes": r["peak_rss_shmem_bytes"], "driver_wchar": r["wchar"],
                   "dst_bytes": _dst_bytes(dst), "list_s": manifest["timings"]["list_s"],
                   "rows_per_s": manifest["timings"]["rows_per_s"], "seconds": r["wall_s"],
                   "rows_ok": manifest["counts"]["rows_ok"], "generate_s": round(gen_s, 1)}
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)
    a, b = sizes
    per_key = (runs[b]["peak_rss_bytes"] - runs[a]["peak_rss_bytes"]) / (b - a)
    # the same without the object-store (/dev/shm) pages the driver touched: node memory, not its own
    private = (runs[b]["peak_rss_private_bytes"] - runs[a]["peak_rss_private_bytes"]) / (b - a)
    return {"runs": list(runs.values()), "bytes_per_key": per_key, "private_bytes_per_key": private}


def _key_list(path: Path, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    w = pq.ParquetWriter(path, pa.schema([("uri", pa.string()), ("size", pa.int64())]))
    step = 100_000
    for i in range(0, n, step):
        uris = [f"s3://huge-bucket/images/{j // 1000:06d}/{j:09d}.jpg" for j in range(i, min(n, i + step))]
        w.write_table(pa.table({"uri": uris, "size": [250_000] * len(uris)}))
    w.close()


def planning_only(work: Path, n: int, checkpoint: str) -> dict[str, Any]:
    """``--dry-run`` over key lists of n/100 and n keys: the driver's memory stays flat."""
    runs = []
    for keys in (max(1, n // 100), n):
        path = work / f"keys-{keys}.parquet"
        _key_list(path, keys)
        r = _driver(["clean", str(path), "--out", str(work / "plan-dst"), "--checkpoint", checkpoint, "--dry-run"],
                    work, f"plan-{keys}")
        plan = json.loads(r["stdout"])
        runs.append({"keys": keys, "pending_units": plan["pending_units"], "shards": plan["shards"],
                     "listing_s": plan["listing_seconds"], "peak_rss_bytes": r["peak_rss_bytes"],
                     "seconds": r["wall_s"], "estimated_seconds": plan["estimated_seconds"]})
    a, b = runs
    return {**b, "runs": runs, "bytes_per_key": (b["peak_rss_bytes"] - a["peak_rss_bytes"]) / (b["keys"] - a["keys"])}


PARTS = ("write_share", "memory", "planning")


def bench_scale(photos: str, out: str, checkpoint: str, sizes: tuple[int, int], plan_keys: int,
                photo_limit: int, parts: tuple[str, ...] = PARTS) -> dict[str, Any]:
    """Runs the chosen parts; a part not run keeps its entry from an earlier bench_scale.json in
    ``out`` (each part records when it was measured)."""
    path = Path(out) / "bench_scale.json"
    report: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    work = Path(tempfile.mkdtemp(prefix="aejob-scale-"))
    runs = {"write_share": lambda: write_share(photos, work, checkpoint, photo_limit),
            "memory": lambda: memory_per_key(work, sizes, checkpoint),
            "planning": lambda: planning_only(work, plan_keys, checkpoint)}
    try:
        for part in parts:
            report[part] = {**runs[part](), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["machine"] = {"cpus": os.cpu_count()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return report


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("scale")
    def scale_cmd(
        data: Annotated[str, typer.Option(help="Folder of photos for the write-share run.")] = "../shared/data/photos",
        out: Annotated[str, typer.Option(help="Folder for bench_scale.json.")] = "bench-results",
        checkpoint: Annotated[str, typer.Option(help="Denoiser checkpoint.")] = "denoiser-base",
        small: Annotated[int, typer.Option(help="Inputs of the smaller memory run.")] = 10_000,
        large: Annotated[int, typer.Option(help="Inputs of the larger memory run.")] = 100_000,
        plan_keys: Annotated[int, typer.Option(help="Keys in the planning-only run.")] = 1_000_000,
        photos: Annotated[int, typer.Option(help="Photos in the write-share run.")] = 40,
        only: Annotated[str, typer.Option(help="Comma-separated parts to run (write_share, memory, planning); "
                                               "the others keep their entries from OUT/bench_scale.json.")] = "",
    ) -> None:
        """Driver write share on a two-node cluster, driver memory per key, planning at 1M keys."""
        from rich.console import Console
        from rich.table import Table

        parts = tuple(p.strip() for p in only.split(",") if p.strip()) or PARTS
        bad = [p for p in parts if p not in PARTS]
        if bad:
            raise typer.BadParameter(f"unknown part(s) {bad}; choose from {', '.join(PARTS)}")
        r = bench_scale(data, out, checkpoint, (small, large), plan_keys, photos, parts)
        t = Table(title="aejob driver at scale")
        for c in ("measure", "value"):
            t.add_column(c)
        if "write_share" in r:
            ws = r["write_share"]
            t.add_row(f"driver wchar / DST bytes ({ws['images']} photos, 2-node cluster)",
                      f"{ws['driver_wchar']:,} / {ws['dst_bytes']:,} = {ws['driver_share']:.2%}")
        if "memory" in r:
            for run in r["memory"]["runs"]:
                t.add_row(f"{run['inputs']:,} inputs: driver peak RSS / list s / rows/s",
                          f"{run['peak_rss_bytes'] / 2**20:.0f} MiB / {run['list_s']:.1f} / {run['rows_per_s']:.0f}")
            t.add_row("driver bytes per key (peak RSS growth)", f"{r['memory']['bytes_per_key']:.1f}")
            if "private_bytes_per_key" in r["memory"]:
                t.add_row("  the same without object-store pages (RssAnon + RssFile)",
                          f"{r['memory']['private_bytes_per_key']:.1f}")
        if "planning" in r:
            for p in r["planning"]["runs"]:
                t.add_row(f"--dry-run over {p['keys']:,} keys: peak RSS / listing s",
                          f"{p['peak_rss_bytes'] / 2**20:.0f} MiB / {p['listing_s']:.1f}")
            t.add_row("planning bytes per key (peak RSS growth)", f"{r['planning']['bytes_per_key']:.1f}")
        Console().print(t)
