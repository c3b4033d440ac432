"""``aejob clean`` reading and writing ``s3://`` through a real HTTP S3 endpoint (moto)."""

from __future__ import annotations

import io

import boto3
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.clean import CleanConfig, build_spec
from pipeline import runner
from tests.conftest import encode, make_image, make_tar

pytestmark = [pytest.mark.s3, pytest.mark.usefixtures("ray_local")]


def test_clean_s3_to_s3(s3_server: dict[str, str], tiny_checkpoint: str) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    s3.create_bucket(Bucket="photos")
    s3.put_object(Bucket="photos", Key="in/loose/a.png", Body=encode(make_image(40, 30, 1)))
    s3.put_object(Bucket="photos", Key="in/loose/B.JPEG", Body=encode(make_image(17, 33, 2), "JPEG"))
    s3.put_object(Bucket="photos", Key="in/loose/bad.png", Body=b"\x89PNG\r\n\x1a\ntruncated")
    s3.put_object(Bucket="photos", Key="in/shards/000.tar", Body=make_tar([
        ("k1.jpg", encode(make_image(24, 24, 3), "JPEG")), ("k1.json", b"{}"),
        ("k2.webp", encode(make_image(16, 8, 4), "WEBP")), ("k2.txt", b"caption"),
    ]))
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"key": ["pq/x", "pq/y"],
                             "image": [encode(make_image(12, 12, 5)), encode(make_image(9, 7, 6))]}), sink)
    s3.put_object(Bucket="photos", Key="in/tables/part-0.parquet", Body=sink.getvalue().to_pybytes())

    for src in ("s3://photos/in", "s3://photos/in/"):  # with or without a trailing slash
        cfg = CleanConfig(src=src, dst="s3://photos/out", checkpoint=tiny_checkpoint, format="webp")
        res = runner.run_job(build_spec(cfg, runner.RayOptions()), progress=False)
        assert res.ok, res.manifest

    fs = pafs.S3FileSystem(endpoint_override=s3_server["AWS_ENDPOINT_URL"].split("//")[1], scheme="http",
                           access_key="testing", secret_key="testing", region="us-east-1")
    rows = pads.dataset("photos/out", filesystem=fs, format="parquet").to_table().to_pylist()
    keys = [r["key"] for r in rows]
    assert sorted(keys) == sorted([
        "loose/a.png", "loose/B.JPEG", "loose/bad.png", "shards/000.tar/k1.jpg",
        "shards/000.tar/k2.webp", "pq/x", "pq/y",
    ])
    assert len(keys) == len(set(keys))
    by = {r["key"]: r for r in rows}
    assert by["loose/bad.png"]["status"] == "error" and "truncated" in by["loose/bad.png"]["error"].lower()
    assert (by["loose/B.JPEG"]["width"], by["loose/B.JPEG"]["height"]) == (17, 33)
    img = Image.open(io.BytesIO(by["shards/000.tar/k2.webp"]["image"]))
    assert img.format == "WEBP" and img.size == (16, 8)
    assert by["pq/y"]["source_uri"].startswith("s3://photos/in/tables/part-0.parquet")
    listing = [o["Key"] for o in s3.list_objects_v2(Bucket="photos", Prefix="out/")["Contents"]]
    assert "out/_manifest.json" in listing and not any("_tmp/" in k for k in listing)
    # second run (trailing slash) found everything done: nothing rewritten
    body = s3.get_object(Bucket="photos", Key="out/_manifest.json")["Body"].read().decode()
    assert '"shards_published": 0' in body and "testing" not in body  # no credentials in manifests
