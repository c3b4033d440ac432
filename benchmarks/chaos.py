"""Chaos runs of ``aejob clean``: crash model actors (and worker processes) mid-job.

Each run cleans the same small source (loose PNGs, one corrupt file, one tar) into a fresh DST
on a local Ray while a background thread crashes the model actor at seeded moments:

- ``ray.kill``: ``ray.kill(handle, no_restart=False)``, i.e. a crash that Ray may restart
  (``ray.kill`` defaults to ``no_restart=True``, which removes the actor for good);
- ``sigkill-actor``: ``SIGKILL`` of the actor's worker process by PID (what an OOM kill or a
  lost process looks like on a single machine);
- ``sigkill-task``: ``SIGKILL`` of a raylet-started worker running a CPU-stage task
  (read/decode or encode).

Afterwards the dataset must hold every input key exactly once, with the same statuses as an
uninterrupted run. Actors are found through the GCS actor table (``ray._private.state``): the
``ray.util.state`` API needs the dashboard, which test clusters run without.

    .venv/bin/python benchmarks/chaos.py --runs 20 --seed 0 [--out benchmarks/chaos.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODEL_ACTOR = "MapWorker(MapBatches(DenoiseActor))"
TASK_TITLES = ("MapBatches(read_units)", "MapBatches(encode_batch)")


# ---- source, checkpoint, job ---------------------------------------------------------------


def make_source(folder: Path, n_images: int = 24, seed: int = 0) -> list[str]:
    """Loose PNGs (+1 corrupt JPEG) and a tar of 3 images; returns every expected row key."""
    from tests.conftest import encode, make_image

    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for i in range(n_images):
        name = f"img{i:03d}.png"
        (folder / name).write_bytes(encode(make_image(40 + i % 5 * 4, 32 + i % 3 * 8, seed + i % 7, noise=8)))
        keys.append(name)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    keys.append("corrupt.jpg")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for j in range(3):
            data = encode(make_image(24, 24, seed + j))
            info = tarfile.TarInfo(f"t/{j}.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (folder / "pack.tar").write_bytes(buf.getvalue())
    keys += [f"pack.tar/t/{j}.png" for j in range(3)]
    return sorted(keys)


def make_checkpoint(folder: Path) -> str:
    import torch

    from models import checkpoint, registry

    torch.manual_seed(0)
    cfg = registry.make_config("resunet-denoiser", "tiny")
    model = registry.build("resunet-denoiser", cfg)
    path = folder / "tiny.safetensors"
    checkpoint.save(path, "resunet-denoiser", cfg, model, {"kind": "denoiser", "steps": 0})
    return str(path)


def run_clean(src: Path, dst: Path, ck: str, shard_size: int = 4) -> Any:
    from jobs.clean import CleanConfig, build_spec
    from pipeline import runner

    cfg = CleanConfig(src=str(src), dst=str(dst), checkpoint=ck, shard_size=shard_size)
    return runner.run_job(build_spec(cfg, runner.RayOptions()), progress=False)


def read_rows(dst: Path) -> list[dict[str, Any]]:
    import pyarrow.dataset as pads

    cols = ["key", "status", "error", "width", "height", "image"]
    return pads.dataset(str(dst), format="parquet").to_table(columns=cols).to_pylist()


def compare(rows: list[dict[str, Any]], reference: list[dict[str, Any]]) -> dict[str, Any]:
    """Keys found/duplicated/missing and status differences against an uninterrupted run."""
    expected = {r["key"]: r for r in reference}
    seen: dict[str, int] = {}
    for r in rows:
        seen[r["key"]] = seen.get(r["key"], 0) + 1
    got = {r["key"]: r for r in rows}
    status_diff = sorted(k for k in expected.keys() & got.keys()
                         if (got[k]["status"], got[k]["width"], got[k]["height"])
                         != (expected[k]["status"], expected[k]["width"], expected[k]["height"]))
    return {
        "keys_expected": len(expected),
        "keys_found": len(seen),
        "rows": len(rows),
        "duplicates": sum(n - 1 for n in seen.values() if n > 1),
        "missing": sorted(expected.keys() - seen.keys()),
        "extra": sorted(seen.keys() - expected.keys()),
        "status_differences": status_diff,
    }


# ---- finding and crashing workers --------------------------------------------------------


def model_actors(state: str = "ALIVE") -> list[dict[str, Any]]:
    """The model actors of the current Ray job (GCS actor table; no dashboard needed)."""
    import ray
    from ray._private import state as ray_state

    job = ray.get_runtime_context().get_job_id()
    out = []
    for aid, info in ray_state.actors().items():
        if info.get("ActorClassName") == MODEL_ACTOR and info.get("State") == state:
            if str(info.get("JobID", job)) in (job, ""):
                out.append({"actor_id": aid, "pid": int(info.get("Pid") or 0),
                            "restarts": int(info.get("NumRestarts") or 0)})
    return out


def _raylet_pid() -> int:
    import ray

    node: Any = ray._private.worker._global_node
    return int(node.all_processes["raylet"][0].process.pid)


def task_worker_pids(titles: tuple[str, ...] = TASK_TITLES) -> list[int]:
    """PIDs of this cluster's raylet-started workers whose process title shows a CPU-stage task."""
    raylet = _raylet_pid()
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != raylet:
                continue
            with open(f"/proc/{d}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if title.startswith("ray::") and any(t in title for t in titles):
            pids.append(int(d))
    return pids


@dataclass
class Kill:
    how: str
    at_s: float = 0.0  # seconds after the job started
    target: str = ""
    landed: bool = False  # the job was still running when the kill happened
    error: str = ""


class Chaos(threading.Thread):
    """Crashes workers at seeded moments while the job runs (a daemon thread).

    ``plan``: (how, seconds to wait once a model actor is alive) per kill, in order.
    """

    def __init__(self, plan: list[tuple[str, float]], timeout_s: float = 120.0) -> None:
        super().__init__(name="aejob-chaos", daemon=True)
        self.plan = plan
        self.timeout_s = timeout_s
        self.done = threading.Event()
        self.kills: list[Kill] = []
        self.t0 = time.time()

    def _wait_alive(self, deadline: float) -> list[dict[str, Any]]:
        while time.time() < deadline and not self.done.is_set():
            actors = model_actors()
            if actors:
                return actors
            time.sleep(0.1)
        return []

    def run(self) -> None:
        import ray

        deadline = self.t0 + self.timeout_s
        for how, delay in self.plan:
            actors = self._wait_alive(deadline)
            if not actors or self.done.wait(delay):
                return
            k = Kill(how=how, at_s=round(time.time() - self.t0, 2))
            try:
                if how == "ray.kill":
                    worker: Any = ray._private.worker.global_worker
                    handle = worker.core_worker.get_actor_handle(
                        ray.ActorID.from_hex(actors[0]["actor_id"]))
                    ray.kill(handle, no_restart=False)
                    k.target = f"actor {actors[0]['actor_id'][:8]}"
                elif how == "sigkill-actor":
                    if actors[0]["pid"] <= 1:  # never signal a process group or init
                        raise RuntimeError(f"no PID for actor {actors[0]['actor_id'][:8]}")
                    os.kill(actors[0]["pid"], signal.SIGKILL)
                    k.target = f"actor pid {actors[0]['pid']}"
                elif how == "sigkill-task":
                    pids: list[int] = []
                    while not pids and not self.done.is_set() and time.time() < deadline:
                        pids = task_worker_pids()
                        time.sleep(0.05)
                    if not pids:
                        return
                    os.kill(pids[0], signal.SIGKILL)
                    k.target = f"task worker pid {pids[0]}"
                else:
                    raise ValueError(how)
                k.landed = not self.done.is_set()
            except Exception as e:  # a worker that exited on its own in between
                k.error = f"{type(e).__name__}: {e}"
            self.kills.append(k)
            if how != "sigkill-task":  # the next kill waits for the restarted actor
                end = time.time() + 30
                while time.time() < end and not self.done.is_set():
                    if any(a["restarts"] > actors[0]["restarts"] for a in model_actors()):
                        break
                    time.sleep(0.1)


def chaos_run(src: Path, dst: Path, ck: str, plan: list[tuple[str, float]],
              reference: list[dict[str, Any]], shard_size: int = 4) -> dict[str, Any]:
    chaos = Chaos(plan=plan)
    t0 = time.time()
    chaos.start()
    try:
        res = run_clean(src, dst, ck, shard_size)
    finally:
        chaos.done.set()
        chaos.join(timeout=10)
    out = compare(read_rows(dst), reference)
    out.update(ok=bool(res.ok), seconds=round(time.time() - t0, 1),
               duplicates_dropped=res.manifest["counts"]["duplicates_dropped"],
               kills=[asdict(k) for k in chaos.kills])
    return out


def plan_for(rng: random.Random, run: int, runs: int) -> list[tuple[str, float]]:
    """1–2 seeded actor crashes per run; the last run also SIGKILLs a task worker process and
    the one before it the actor's process, so both 'process died' cases appear once."""
    plan = [("ray.kill", round(rng.uniform(0.0, 1.5), 2)) for _ in range(rng.choice((1, 1, 2)))]
    if run == runs - 2:
        plan = [("sigkill-actor", round(rng.uniform(0.0, 1.5), 2))]
    if run == runs - 1:
        plan = [("sigkill-task", round(rng.uniform(0.0, 0.5), 2))] + plan
    return plan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "chaos.json"))
    args = ap.parse_args(argv)

    import ray

    work = Path(tempfile.mkdtemp(prefix="aejob-chaos-"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        src = work / "src"
        keys = make_source(src, args.images, args.seed)
        ck = make_checkpoint(work)
        t = time.time()
        ref = run_clean(src, work / "reference", ck)
        assert ref.ok, ref.manifest
        reference = read_rows(work / "reference")
        ref_s = time.time() - t
        assert sorted(r["key"] for r in reference) == keys
        rng = random.Random(args.seed)
        results = []
        for i in range(args.runs):
            plan = plan_for(rng, i, args.runs)
            r = chaos_run(src, work / f"run{i:02d}", ck, plan, reference)
            r["run"] = i
            r["plan"] = plan
            results.append(r)
            print(json.dumps({k: r[k] for k in ("run", "ok", "seconds", "keys_found", "duplicates",
                                                "duplicates_dropped")}
                             | {"kills": [(k["how"], k["at_s"], k["landed"]) for k in r["kills"]]}),
                  flush=True)
        kills = [k for r in results for k in r["kills"]]
        summary = {
            "runs": args.runs,
            "seed": args.seed,
            "kills_planned": sum(len(r["plan"]) for r in results),
            "kills": len(kills),
            "kills_landed_mid_job": sum(k["landed"] for k in kills),
            "kills_by_kind": {h: sum(k["how"] == h for k in kills)
                              for h in ("ray.kill", "sigkill-actor", "sigkill-task")},
            "keys_expected": len(keys) * args.runs,
            "keys_found": sum(r["keys_found"] for r in results),
            "duplicates": sum(r["duplicates"] for r in results),
            "missing": sum(len(r["missing"]) for r in results),
            "extra": sum(len(r["extra"]) for r in results),
            "status_differences": sum(len(r["status_differences"]) for r in results),
            "runs_failed": sum(not r["ok"] for r in results),
            "retried_rows_dropped_by_writer": sum(r["duplicates_dropped"] for r in results),
            "reference_run_s": round(ref_s, 1),
            "mean_run_s": round(sum(r["seconds"] for r in results) / max(1, len(results)), 1),
            "ray": ray.__version__,
            "per_run": results,
        }
        Path(args.out).write_text(json.dumps(summary, indent=2))
        print(json.dumps({k: v for k, v in summary.items() if k != "per_run"}, indent=2))
        clean = (summary["duplicates"] == summary["missing"] == summary["extra"]
                 == summary["status_differences"] == summary["runs_failed"] == 0)
        return 0 if clean else 1
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
