"""S3 under faults and S3 security, over real HTTP (moto), with a fault-injecting proxy.

- the whole job (CLI in a subprocess with its own local Ray, so the Ray workers see the proxy as
  their endpoint) through a proxy answering ~10% of requests ``503 SlowDown`` and resetting ~1%
  of connections: completes through retries, nothing lost or duplicated;
- no secret or signature in anything the run prints or writes (logs at ``-v``, Ray's session
  logs, manifest, run record, markers, config);
- leases on S3 are conditional writes (``If-None-Match: *`` / ``If-Match``), also through faults;
- objects in archive storage classes become clear error rows; SSE and storage class on writes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

from jobs import verify
from jobs.clean import CleanConfig, build_spec
from pipeline import layout, runner, storage
from tests.conftest import encode, make_image, make_tar, race_leases
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.s3

ROOT = Path(__file__).resolve().parents[1]
SEED = 0
SECRET = "aejobTestSecret9f2c41d7Qw"  # the subprocess's AWS_SECRET_ACCESS_KEY (moto accepts any)
LEAKS = ("X-Amz-Signature", "Signature=", "Credential=", "AWS4-HMAC-SHA256", SECRET)


@pytest.fixture(scope="module")
def proxy(s3_server: dict[str, str]) -> Any:
    with FaultProxy(s3_server["AWS_ENDPOINT_URL"], slowdown=0.10, reset=0.01, seed=SEED,
                    lifetime_s=900) as p:
        yield p


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTEST"))}
    env.update(RAY_ADDRESS="local", PYTHONUNBUFFERED="1", **extra)
    return env


def client(s3_server: dict[str, str]) -> Any:
    return boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])


def direct_fs(s3_server: dict[str, str]) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=s3_server["AWS_ENDPOINT_URL"].split("//")[1],
                             scheme="http", access_key="testing", secret_key="testing",
                             region="us-east-1")


@pytest.mark.slow  # ~40 s: the CLI in a subprocess with its own Ray, through the proxy
def test_job_through_slowdowns_and_resets_loses_nothing(s3_server: dict[str, str], proxy: FaultProxy,
                                                        tiny_checkpoint: str, tmp_path: Path) -> None:
    s3 = client(s3_server)
    s3.create_bucket(Bucket="faulty")
    keys = []
    for i in range(12):
        s3.put_object(Bucket="faulty", Key=f"in/img{i:02d}.png", Body=encode(make_image(32, 24 + i, i % 4)))
        keys.append(f"img{i:02d}.png")
    s3.put_object(Bucket="faulty", Key="in/bad.png", Body=b"\x89PNG\r\n\x1a\ntruncated")
    s3.put_object(Bucket="faulty", Key="in/pack.tar", Body=make_tar(
        [(f"t/{j}.jpg", encode(make_image(20, 20, j), "JPEG")) for j in range(3)]))
    keys += ["bad.png"] + [f"pack.tar/t/{j}.jpg" for j in range(3)]

    before = proxy.stats
    env = cli_env(AWS_ENDPOINT_URL=proxy.url, AWS_SECRET_ACCESS_KEY=SECRET, AEJOB_S3_MAX_ATTEMPTS="10")
    cmd = [sys.executable, "-m", "jobs.cli", "-v", "clean", "s3://faulty/in", "--out", "s3://faulty/out",
           "--checkpoint", tiny_checkpoint, "--shard-size", "4"]
    t0 = time.time()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
    took = time.time() - t0
    output = res.stdout + res.stderr
    assert res.returncode == 0, output[-6000:]
    stats = {k: v - before[k] for k, v in proxy.stats.items()}
    print(f"\nfaulty S3: {stats} in {took:.0f} s")
    assert stats["slowdown"] >= 5 and stats["reset"] >= 1, stats
    assert stats["slowdown"] / stats["requests"] > 0.05

    fs = direct_fs(s3_server)
    rows = pads.dataset("faulty/out", filesystem=fs, format="parquet").to_table(
        columns=["key", "status", "error"]).to_pylist()
    assert sorted(r["key"] for r in rows) == sorted(keys)  # every key, once
    by = {r["key"]: r for r in rows}
    assert by["bad.png"]["status"] == "error" and all(
        by[k]["status"] == "ok" for k in keys if k != "bad.png")
    manifest = json.loads(s3.get_object(Bucket="faulty", Key="out/_manifest.json")["Body"].read())
    assert manifest["status"] == "succeeded" and manifest["dataset"]["rows"] == len(keys)
    rep = verify.verify("s3://faulty/out", "s3://faulty/in")  # direct to moto: no faults
    assert rep.ok, rep.text()

    # no secret or request signature in what the run printed (at -v) or wrote
    for leak in LEAKS:
        assert leak not in output, leak
    listing = s3.list_objects_v2(Bucket="faulty", Prefix="out/")["Contents"]
    written = [o["Key"] for o in listing if o["Key"].endswith(".json")]
    assert {"out/_manifest.json", "out/_config.json"} <= set(written)
    assert any(k.startswith("out/_runs/") for k in written) and any(k.startswith("out/_markers/") for k in written)
    assert not any(k.endswith("_lease.json") or "/_tmp/" in k for k in (o["Key"] for o in listing))
    for key in written:
        body = s3.get_object(Bucket="faulty", Key=key)["Body"].read().decode()
        for leak in LEAKS:
            assert leak not in body, (key, leak)
    m = re.search(r"Full logs are in (/\S+?/session_[^/\s]+)/logs", output)
    assert m, "Ray session path not in the job's log"
    n_logs = 0
    for p in Path(m.group(1), "logs").rglob("*"):
        if p.is_file():
            n_logs += 1
            assert SECRET.encode() not in p.read_bytes(), p
    assert n_logs > 5


def test_s3_lease_is_conditional_even_through_faults(s3_server: dict[str, str], proxy: FaultProxy,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    client(s3_server).create_bucket(Bucket="leases")
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # this process's S3 calls go through faults
    before = proxy.stats
    dst = "s3://leases/d"
    leases = [layout.Lease(dst, ttl_s=30) for _ in range(6)]
    results = race_leases(leases, "holds the lease")
    assert sorted(results) == ["refused"] * 5 + ["won"], results
    winner = next(lease for lease in leases if lease._thread is not None)
    winner._stop.set()  # "crashes": no more heartbeats
    raw, etag = storage.read_versioned(dst + "/_lease.json")
    body = json.loads(raw or b"{}")
    body["expires_at"] = time.time() - 1  # as if its TTL had passed
    assert storage.replace_if_match(dst + "/_lease.json", json.dumps(body).encode(), etag or "")
    assert not storage.replace_if_match(dst + "/_lease.json", b"{}", etag or "")  # stale ETag
    nxt = layout.Lease(dst, ttl_s=30)
    nxt.acquire()
    assert nxt.took_over and nxt.took_over["owner"] == winner.owner
    assert winner.renew() is False and winner.lost
    nxt.release()
    assert not storage.exists(dst + "/_lease.json")
    assert proxy.stats["requests"] > before["requests"]


@pytest.mark.usefixtures("ray_local")
def test_archived_inputs_are_error_rows_and_writes_are_encrypted(
        s3_server: dict[str, str], tiny_checkpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    s3 = client(s3_server)
    s3.create_bucket(Bucket="archive")
    for i in range(3):
        s3.put_object(Bucket="archive", Key=f"in/ok{i}.png", Body=encode(make_image(16, 16, i)))
    s3.put_object(Bucket="archive", Key="in/cold.png", Body=encode(make_image(16, 16, 5)), StorageClass="GLACIER")
    s3.put_object(Bucket="archive", Key="in/colder.png", Body=encode(make_image(16, 16, 6)),
                  StorageClass="DEEP_ARCHIVE")
    s3.put_object(Bucket="archive", Key="in/instant.png", Body=encode(make_image(16, 16, 7)),
                  StorageClass="GLACIER_IR")  # instant retrieval: readable
    monkeypatch.setenv("AEJOB_S3_SSE", "AES256")  # the writer runs on the driver (this process)
    monkeypatch.setenv("AEJOB_S3_STORAGE_CLASS", "STANDARD_IA")
    t0 = time.time()
    cfg = CleanConfig(src="s3://archive/in", dst="s3://archive/out", checkpoint=tiny_checkpoint, shard_size=3)
    res = runner.run_job(build_spec(cfg, runner.RayOptions()), progress=False)
    assert res.ok, res.manifest
    assert time.time() - t0 < 120  # no hang on archived objects
    rows = {r["key"]: r for r in pads.dataset("archive/out", filesystem=direct_fs(s3_server),
                                              format="parquet").to_table().to_pylist()}
    assert sorted(rows) == ["cold.png", "colder.png", "instant.png", "ok0.png", "ok1.png", "ok2.png"]
    for k, tier in (("cold.png", "GLACIER"), ("colder.png", "DEEP_ARCHIVE")):
        assert rows[k]["status"] == "error" and rows[k]["image"] is None
        assert f"object is in an archive storage class ({tier}): restore it first" in rows[k]["error"]
    assert all(rows[k]["status"] == "ok" for k in ("instant.png", "ok0.png", "ok1.png", "ok2.png"))

    objs = [o["Key"] for o in s3.list_objects_v2(Bucket="archive", Prefix="out/")["Contents"]]
    data = [k for k in objs if k.endswith(".parquet")]
    control = [k for k in objs if k.endswith(".json")]
    assert len(data) == 2 and control
    for k in data:
        h = s3.head_object(Bucket="archive", Key=k)
        assert (h.get("ServerSideEncryption"), h.get("StorageClass")) == ("AES256", "STANDARD_IA"), k
    for k in control:  # markers, config, run record, manifest: encrypted, STANDARD (readable)
        h = s3.head_object(Bucket="archive", Key=k)
        assert h.get("ServerSideEncryption") == "AES256" and h.get("StorageClass") in (None, "STANDARD"), k


def test_sse_kms_and_bad_settings(s3_server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    s3 = client(s3_server)
    s3.create_bucket(Bucket="kms")
    monkeypatch.setenv("AEJOB_S3_SSE", "aws:kms")
    monkeypatch.setenv("AEJOB_S3_SSE_KMS_KEY_ID", "alias/aejob-test")
    storage.write_bytes("s3://kms/x/_config.json", b"{}")
    assert storage.create_only("s3://kms/x/_lease.json", b"{}")
    for key in ("x/_config.json", "x/_lease.json"):
        h = s3.head_object(Bucket="kms", Key=key)
        assert h["ServerSideEncryption"] == "aws:kms" and h["SSEKMSKeyId"].endswith("alias/aejob-test")
    monkeypatch.setenv("AEJOB_S3_SSE", "rot13")
    with pytest.raises(ValueError, match="AEJOB_S3_SSE must be one of"):
        storage.write_bytes("s3://kms/x/y.json", b"{}")
    monkeypatch.setenv("AEJOB_S3_SSE", "AES256")
    with pytest.raises(ValueError, match="needs AEJOB_S3_SSE=aws:kms"):
        storage.write_options()
    monkeypatch.delenv("AEJOB_S3_SSE_KMS_KEY_ID")
    monkeypatch.setenv("AEJOB_S3_STORAGE_CLASS", "FROZEN")
    with pytest.raises(ValueError, match="not an S3 storage class"):
        storage.write_options(data_file=True)
