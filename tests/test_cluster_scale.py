"""Scale-out on a real multi-node Ray cluster (``ray.cluster_utils.Cluster``): a head that runs no
tasks, worker nodes that do, and the unchanged ``aejob clean`` command line as a separate driver
process. Checks that the data is written by the workers (the driver's own write bytes stay a small
fraction of DST) and that killing a worker node mid-job keeps every key exactly once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from tests.conftest import encode, make_image

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.cluster


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Any:
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # head, nodes and driver alike
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    yield c
    c.shutdown()


def make_photos(src: Path, n: int, size: tuple[int, int] = (160, 120)) -> list[str]:
    src.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (src / f"p{i:03d}.png").write_bytes(encode(make_image(size[0], size[1], seed=i, noise=12)))
    return sorted(f"p{i:03d}.png" for i in range(n))


def driver(args: list[str], address: str, record: Path, timeout: float = 600) -> subprocess.Popen[bytes]:
    """``aejob ARGS`` as its own process, connected to the cluster, its I/O recorded."""
    env = {**os.environ, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "jobs.driver_io", str(record), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def dst_bytes(dst: Path) -> int:
    return sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())


def keys_of(dst: Path) -> list[str]:
    return sorted(pads.dataset(str(dst), format="parquet").to_table(columns=["key"]).column("key").to_pylist())


def test_workers_write_the_data_driver_only_commits(cluster: Any, tmp_path: Path, tiny_checkpoint: str) -> None:
    worker = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    keys = make_photos(tmp_path / "src", 40)
    dst, rec = tmp_path / "dst", tmp_path / "driver.json"
    p = driver(["clean", str(tmp_path / "src"), "--out", str(dst), "--format", "png",
                "--checkpoint", tiny_checkpoint, "--shard-size", "8"], cluster.address, rec)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out.decode()[-3000:]
    assert keys_of(dst) == keys
    io = json.loads(rec.read_text())
    total = dst_bytes(dst)
    ratio = io["wchar"] / total
    print(f"\ndriver wchar {io['wchar']} B / DST {total} B = {ratio:.3%}")
    assert ratio <= 0.05, (io, total)
    manifest = json.loads((dst / "_manifest.json").read_text())
    # every part and data file was written on the worker node, none on the head (the driver's)
    assert set(manifest["writers"]) == {worker.node_id}, manifest["writers"]
    assert manifest["counts"]["shards_published"] == 5
    for m in (dst / "_markers").glob("*.json"):
        assert json.loads(m.read_text())["written_on"] == worker.node_id


def test_killing_a_worker_node_mid_job_keeps_every_key_exactly_once(cluster: Any, tmp_path: Path,
                                                                    tiny_checkpoint: str) -> None:
    first = cluster.add_node(num_cpus=2)
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    keys = make_photos(tmp_path / "src", 48, size=(200, 150))
    dst = tmp_path / "dst"
    args = ["clean", str(tmp_path / "src"), "--out", str(dst), "--format", "png",
            "--checkpoint", tiny_checkpoint, "--shard-size", "4", "--batch-size", "2"]
    partial: list[str] = []
    stop = threading.Event()

    def watch() -> None:  # no partial or unreadable data file is ever visible at DST's top level
        while not stop.is_set():
            for f in dst.glob("*.parquet") if dst.exists() else []:
                try:
                    pq.read_metadata(f)
                except FileNotFoundError:
                    continue
                except Exception as e:
                    partial.append(f"{f.name}: {e}")
            time.sleep(0.05)

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    p = driver(args, cluster.address, tmp_path / "run1.json")
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and len(list((dst / "_markers").glob("*.json"))
                                                              if (dst / "_markers").exists() else []) < 2:
        time.sleep(0.2)
    assert p.poll() is None, "the job ended before the node could be killed"
    cluster.remove_node(first)  # the node dies with its actors, tasks and objects
    out1, _ = p.communicate(timeout=600)
    # the job either rode it out on the other node or failed; a rerun finishes it either way
    p2 = driver(args, cluster.address, tmp_path / "run2.json")
    out2, _ = p2.communicate(timeout=600)
    stop.set()
    w.join(5)
    assert p2.returncode == 0, out1.decode()[-2000:] + out2.decode()[-2000:]
    assert keys_of(dst) == keys  # every source key exactly once
    assert partial == []
    assert not list(dst.glob("_tmp/*")), "leftovers under _tmp"
    v = subprocess.run([sys.executable, "-m", "jobs.cli", "verify", str(dst), "--against", str(tmp_path / "src")],
                       cwd=ROOT, capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr
    print(f"\nnode kill: first run exit {p.returncode}, rerun exit {p2.returncode}, {len(keys)} keys once each")


SECRET = "aejob-test-secret-7f3k2q"


@pytest.fixture
def s3_secret(s3_server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # moto takes any; this one is easy to find
    return {**s3_server, "AWS_SECRET_ACCESS_KEY": SECRET}


@pytest.mark.s3
def test_s3_in_and_out_on_the_cluster_with_no_secret_in_rays_logs(s3_secret: dict[str, str], cluster: Any,
                                                                  tiny_checkpoint: str, tmp_path: Path) -> None:
    import boto3

    # the nodes start from this environment (as a cluster's pods carry their own credentials);
    # the driver hands them only the endpoint and region, never the secret
    worker = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    s3 = boto3.client("s3", endpoint_url=s3_secret["AWS_ENDPOINT_URL"], region_name="us-east-1")
    s3.create_bucket(Bucket="aejob-cl")
    for i in range(10):
        s3.put_object(Bucket="aejob-cl", Key=f"in/{i}.png", Body=encode(make_image(48, 40, seed=i)))
    p = driver(["clean", "s3://aejob-cl/in", "--out", "s3://aejob-cl/out", "--checkpoint", tiny_checkpoint,
                "--shard-size", "4"], cluster.address, tmp_path / "rec.json")
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out.decode()[-3000:]
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="aejob-cl", Prefix="out/")["Contents"])
    assert [k for k in keys if k.count("/") == 1 and k.endswith(".parquet")] and not [k for k in keys if "_tmp" in k]
    manifest = json.loads(s3.get_object(Bucket="aejob-cl", Key="out/_manifest.json")["Body"].read())
    assert manifest["dataset"]["rows"] == 10 and set(manifest["writers"]) == {worker.node_id}
    secret = SECRET.encode()
    logs = [f for f in Path(cluster.head_node.get_session_dir_path(), "logs").rglob("*") if f.is_file()]
    assert logs and not [f for f in logs if secret in f.read_bytes()]


def test_a_one_cpu_worker_node_does_not_hang(cluster: Any, tmp_path: Path, tiny_checkpoint: str) -> None:
    """Every stage fits beside the model actor on a single CPU (no task asks a whole one)."""
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    keys = make_photos(tmp_path / "src", 6, size=(40, 30))
    p = driver(["clean", str(tmp_path / "src"), "--out", str(tmp_path / "dst"), "--checkpoint", tiny_checkpoint,
                "--shard-size", "3"], cluster.address, tmp_path / "rec.json")
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out.decode()[-3000:]
    assert keys_of(tmp_path / "dst") == keys
