"""Issue 6, "never lose or duplicate a row": verify, crash and resume, leases, bad inputs,
and the local security checks (export paths, checkpoints, secrets in what a run writes).

Real things only: jobs run on Ray (in-process ``ray_local``, or the CLI in a subprocess with its
own local Ray), Parquet is read back with pyarrow, the crash is a SIGKILL of the driver's
process group.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from jobs import verify
from jobs.clean import CleanConfig, build_spec
from jobs.cli import app as cli_app
from models import checkpoint
from pipeline import layout, runner
from pipeline.export import export_images
from pipeline.sources import shard_name_for
from tests.conftest import encode, make_image, race_leases
from tests.corpus import write_corpus

ROOT = Path(__file__).resolve().parents[1]
N_LOOSE = 20  # with shard size 2: 10 loose-file shards, + one tar and one Parquet shard
SHARDS = N_LOOSE // 2 + 2


# ---- helpers -----------------------------------------------------------------------------


def make_source(src: Path) -> list[str]:
    """Loose PNGs of a few sizes, a tar of 3 images, a Parquet file of 2: returns the keys."""
    src.mkdir(parents=True, exist_ok=True)
    keys = []
    for i in range(N_LOOSE):
        (src / f"im{i:02d}.png").write_bytes(encode(make_image(48 + 8 * (i % 3), 40, i % 5, noise=10)))
        keys.append(f"im{i:02d}.png")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for j in range(3):
            data = encode(make_image(32, 24, j), "JPEG", quality=90)
            info = tarfile.TarInfo(f"m/{j}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (src / "pack.tar").write_bytes(buf.getvalue())
    keys += [f"pack.tar/m/{j}.jpg" for j in range(3)]
    pq.write_table(pa.table({"key": ["pq/a", "pq/b"],
                             "image": [encode(make_image(20, 20, 7)), encode(make_image(16, 28, 8))]}),
                   src / "table.parquet")
    keys += ["pq/a", "pq/b"]
    return sorted(keys)


def run_inproc(src: Path, dst: Path, ck: str, **kw: Any) -> runner.JobResult:
    kw.setdefault("shard_size", 2)
    cfg = CleanConfig(src=str(src), dst=str(dst), checkpoint=ck, **kw)
    return runner.run_job(build_spec(cfg, runner.RayOptions()), progress=False)


def rows(dst: Path) -> dict[str, dict[str, Any]]:
    table = pads.dataset(str(dst), format="parquet").to_table()
    out: dict[str, dict[str, Any]] = {}
    for r in table.to_pylist():
        assert r["key"] not in out, f"duplicate key {r['key']}"
        out[r["key"]] = r
    return out


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTEST"))}
    env.update(RAY_ADDRESS="local", PYTHONUNBUFFERED="1", **extra)
    return env


def clean_cmd(src: Path | str, dst: Path | str, ck: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "clean", str(src), "--out", str(dst),
            "--checkpoint", ck, "--shard-size", "2", *extra]


def session_pids(sid: int) -> list[int]:
    """Processes still in the session that a subprocess started (start_new_session=True)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[3]) == sid:  # field 6 of stat: session id
                    out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def kill_session(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the subprocess's process group, then any straggler of its session, by PID."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    end = time.time() + 20
    while (left := session_pids(proc.pid)) and time.time() < end:
        time.sleep(0.5)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def verify_app() -> typer.Typer:
    """``aejob`` itself once jobs/cli.py registers ``verify``; until then a CLI that does."""
    if any(c.name == "verify" for c in cli_app.registered_commands):
        return cli_app
    app = typer.Typer()

    @app.callback()
    def _main() -> None:
        pass

    verify.register(app)
    return app


def decoded(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    src = tmp_path_factory.mktemp("rel") / "src"
    return src, make_source(src)


@pytest.fixture(scope="module")
def reference(source: tuple[Path, list[str]], tiny_checkpoint: str, ray_local: Any,
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run over the source (in-process Ray)."""
    dst = tmp_path_factory.mktemp("rel") / "reference"
    res = run_inproc(source[0], dst, tiny_checkpoint)
    assert res.ok, res.manifest
    return dst


# ---- aejob verify ------------------------------------------------------------------------


def test_verify_clean_dataset_and_each_finding(source: tuple[Path, list[str]], reference: Path,
                                               tmp_path: Path) -> None:
    src, keys = source
    cli = CliRunner()
    rep = verify.verify(str(reference), str(src))
    assert rep.ok, rep.text()
    assert (rep.data_files, rep.markers, rep.rows, rep.keys, rep.source_units) == (SHARDS, SHARDS, 25, 25, 22)
    res = cli.invoke(verify_app(), ["verify", str(reference), "--against", str(src)])
    assert res.exit_code == 0, res.output
    assert "OK: every row once" in res.output

    markers = layout.read_markers(str(reference))
    loose = sorted(s for s, m in markers.items() if s.startswith("files-"))

    # 1. a data file deleted: its marker has no data, its units are missing from the source view
    d1 = tmp_path / "deleted"
    shutil.copytree(reference, d1)
    gone = loose[0]
    (d1 / f"{gone}.parquet").unlink()
    res = cli.invoke(verify_app(), ["verify", str(d1), "--against", str(src), "--json"])
    assert res.exit_code == 1, res.output
    out = json.loads(res.output)
    assert out["counts"]["marker_without_data"] == 1
    assert out["counts"]["missing_unit"] == len(markers[gone]["units"]) == 2
    assert out["counts"]["duplicate_key"] == out["counts"]["extra_key"] == 0
    no_src = verify.verify(str(d1))  # without --against: still found from the markers
    assert [f.kind for f in no_src.findings] == ["marker_without_data"]

    # 2. a data file duplicated under another name: duplicate keys + a file without marker
    d2 = tmp_path / "duplicated"
    shutil.copytree(reference, d2)
    shutil.copy(d2 / f"{shard_name_for(['pack.tar'], 'tar')}.parquet", d2 / "copy-of-pack.parquet")
    res = cli.invoke(verify_app(), ["verify", str(d2), "--against", str(src)])
    assert res.exit_code == 1, res.output
    assert "duplicate_key: 3 keys appear more than once" in res.output
    assert "data_without_marker" in res.output and "copy-of-pack.parquet" in res.output
    rep2 = verify.verify(str(d2), str(src))
    assert rep2.counts()["duplicate_key"] == 3 and rep2.counts()["data_without_marker"] == 1
    assert rep2.counts()["missing_unit"] == 0

    # 3. a source file removed after the run: its row is an extra key
    s3 = tmp_path / "src-less"
    shutil.copytree(src, s3)
    (s3 / "im05.png").unlink()
    res = cli.invoke(verify_app(), ["verify", str(reference), "--against", str(s3)])
    assert res.exit_code == 1, res.output
    assert "extra_key: 1 rows come from no unit of the source" in res.output
    assert "im05.png" in res.output and "source file removed" in res.output
    rep3 = verify.verify(str(reference), str(s3))
    assert rep3.counts() == {**dict.fromkeys(verify.KINDS, 0), "extra_key": 1}

    # 4. a new source file not processed yet: a missing unit
    (s3 / "new.png").write_bytes(encode(make_image(8, 8, 1)))
    rep4 = verify.verify(str(reference), str(s3))
    assert rep4.counts()["missing_unit"] == 1 and "new.png" in rep4.text()

    # 5. a marker whose counts do not match its file
    d5 = tmp_path / "miscounted"
    shutil.copytree(reference, d5)
    mf = d5 / "_markers" / f"{loose[1]}.json"
    m = json.loads(mf.read_text())
    m["rows"] += 1
    mf.write_text(json.dumps(m))
    rep5 = verify.verify(str(d5))
    assert [f.kind for f in rep5.findings] == ["row_count_mismatch"]
    assert "rows 3 in marker vs 2 in file" in rep5.findings[0].detail

    # unreadable DST: exit 2
    res = cli.invoke(verify_app(), ["verify", str(tmp_path / "nope")])
    assert res.exit_code == 2


# ---- crash and resume --------------------------------------------------------------------


@pytest.mark.slow  # ~45 s: a subprocess with its own Ray, a SIGKILL, a TTL wait, a resume
def test_crash_then_resume_redoes_only_unfinished_shards(
        source: tuple[Path, list[str]], reference: Path, tiny_checkpoint: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    src, keys = source
    dst = tmp_path / "out"
    ttl = 6.0
    env = cli_env(AEJOB_LEASE_TTL_S=str(ttl))
    log1 = open(tmp_path / "run1.log", "wb")
    proc = subprocess.Popen(clean_cmd(src, dst, tiny_checkpoint), cwd=ROOT, env=env, stdout=log1,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if list((dst / "_markers").glob("*.json")):
                break
            time.sleep(0.02)
        assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
        assert list((dst / "_markers").glob("*.json")), "no shard finished within 240 s"
    finally:
        kill_session(proc)  # SIGKILL: no cleanup code runs in the driver
        log1.close()
    before = layout.read_markers(str(dst))
    assert 1 <= len(before) < SHARDS, f"kill landed after {len(before)} of {SHARDS} shards"
    first_run = {m["run_id"] for m in before.values()}
    assert len(first_run) == 1
    mtimes = {s: (dst / f"{s}.parquet").stat().st_mtime_ns for s in before}
    assert not list((dst / "_runs").glob("*.json"))  # the killed driver wrote no run record
    lease = json.loads((dst / "_lease.json").read_text())
    assert lease["ttl_s"] == ttl and lease["owner"] in first_run

    # while the crashed run's lease is still live, a rerun is refused with a clear message
    if lease["expires_at"] > time.time() + 1:
        refused = CliRunner().invoke(cli_app, ["clean", str(src), "--out", str(dst),
                                               "--checkpoint", tiny_checkpoint, "--shard-size", "2"])
        assert refused.exit_code == 2, refused.output
        assert "refused: another run" in refused.output and "holds the lease" in refused.output
        assert "AEJOB_LEASE_TTL_S" in refused.output

    # once the lease lapsed the same command takes over without any manual cleanup (run in this
    # process, on the session's Ray, to save a second Ray start)
    time.sleep(max(0.0, lease["expires_at"] + 0.2 - time.time()))
    with caplog.at_level(logging.WARNING, logger="pipeline.layout"):
        res = CliRunner().invoke(cli_app, ["clean", str(src), "--out", str(dst),
                                           "--checkpoint", tiny_checkpoint, "--shard-size", "2"])
    assert res.exit_code == 0, res.output
    assert "took over the expired lease" in caplog.text
    records = [json.loads(p.read_text()) for p in (dst / "_runs").glob("*.json")]
    assert len(records) == 1 and records[0]["status"] == "succeeded"
    assert records[0]["counts"]["shards_published"] == SHARDS - len(before)
    after = layout.read_markers(str(dst))
    assert len(after) == SHARDS
    for s in before:  # finished shards were not redone
        assert after[s]["run_id"] in first_run
        assert (dst / f"{s}.parquet").stat().st_mtime_ns == mtimes[s]
    assert not (dst / "_lease.json").exists() and not (dst / "_tmp").exists()

    # the dataset equals the uninterrupted run's: same keys, statuses, sizes and pixels
    got, ref = rows(dst), rows(reference)
    assert sorted(got) == sorted(ref) == keys
    worst = 0
    for k, r in ref.items():
        g = got[k]
        assert (g["status"], g["error"], g["width"], g["height"]) == \
            (r["status"], r["error"], r["width"], r["height"]), k
        assert g["source_sha256"] == r["source_sha256"]
        if r["status"] == "ok":
            worst = max(worst, int(np.abs(decoded(g["image"]) - decoded(r["image"])).max()))
    assert worst <= 1, f"decoded images differ by up to {worst}"
    print(f"\ncrash/resume: killed after {len(before)}/{SHARDS} shards; rerun published "
          f"{records[0]['counts']['shards_published']}; max pixel difference vs uninterrupted: {worst}")
    rep = verify.verify(str(dst), str(src))
    assert rep.ok, rep.text()


def test_second_run_refused_while_lease_is_live(source: tuple[Path, list[str]], tiny_checkpoint: str,
                                                tmp_path: Path) -> None:
    dst = tmp_path / "busy"
    holder = layout.Lease(str(dst), ttl_s=30, run_id="holder-run")
    holder.acquire()
    try:
        res = CliRunner().invoke(cli_app, ["clean", str(source[0]), "--out", str(dst),
                                           "--checkpoint", tiny_checkpoint])
        assert res.exit_code == 2, res.output
        assert "refused: another run (holder-run" in res.output and "holds the lease" in res.output
        assert not list(dst.glob("*.parquet")) and not (dst / "_markers").exists()
    finally:
        holder.release()
    assert not (dst / "_lease.json").exists()


def test_lease_create_only_takeover_and_ttl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dst = str(tmp_path / "d")
    # racing runs: exactly one wins a fresh lease
    leases = [layout.Lease(dst, ttl_s=30) for _ in range(8)]
    results = race_leases(leases)
    assert sorted(results) == ["refused"] * 7 + ["won"]
    winner = next(lease for lease in leases if lease._thread is not None)
    # a crashed holder (heartbeat stopped) lapses; the next run takes over; the old one notices
    winner._stop.set()
    monkeypatch.setenv("AEJOB_LEASE_TTL_S", "0.5")
    nxt = layout.Lease(dst)
    assert nxt.ttl_s == 0.5
    with pytest.raises(layout.DstError, match="holds the lease"):
        nxt.acquire()  # the first lease (30 s) is still live
    body = json.loads(Path(dst, "_lease.json").read_text())
    body["expires_at"] = time.time() - 1  # as if its 30 s had passed
    Path(dst, "_lease.json").write_text(json.dumps(body))
    nxt.acquire()
    assert nxt.took_over is not None and nxt.took_over["owner"] == winner.owner
    assert winner.renew() is False and winner.lost
    nxt.release()
    assert not Path(dst, "_lease.json").exists()
    monkeypatch.setenv("AEJOB_LEASE_TTL_S", "soon")
    with pytest.raises(layout.DstError, match="AEJOB_LEASE_TTL_S"):
        layout.Lease(dst)


# ---- bad inputs through the whole job ------------------------------------------------------


@pytest.mark.usefixtures("ray_local")
def test_bad_input_corpus_through_the_job(tmp_path: Path, tiny_checkpoint: str) -> None:
    src = tmp_path / "src"
    cases = write_corpus(src)
    for i in range(3):
        (src / f"good{i}.png").write_bytes(encode(make_image(24 + i, 20, i)))
    res = run_inproc(src, tmp_path / "out", tiny_checkpoint, shard_size=8)
    assert res.ok, res.manifest
    got = rows(tmp_path / "out")
    # sources.IMAGE_EXTENSIONS has no .ico: the listing skips (and counts) icon.ico instead of
    # giving it an error row; either is accepted here
    listed = {c.name for c in cases} - ({"icon.ico"} if "icon.ico" not in got else set())
    assert set(got) == listed | {f"good{i}.png" for i in range(3)}
    assert res.manifest["counts"]["skipped_files"] == len(cases) - len(listed)
    for c in cases:
        if c.name not in got:
            continue
        r = got[c.name]
        assert r["status"] == c.expect, (c.name, r["status"], r["error"])
        if c.expect == "error":
            assert c.error_contains and c.error_contains.lower() in r["error"].lower(), (c.name, r["error"])
            assert r["image"] is None
        else:
            img = Image.open(io.BytesIO(r["image"]))
            assert (img.width, img.height) == (r["width"], r["height"]) == c.size, c.name
            if c.note_contains:
                assert c.note_contains.lower() in (r["note"] or "").lower(), (c.name, r["note"])
    n_err = sum(c.expect == "error" for c in cases if c.name in got)
    assert res.manifest["counts"]["rows_error"] == n_err

    # the same inputs with --max-error-rate 0.1: fails loudly, keeps what it wrote
    out2 = tmp_path / "strict"
    res2 = CliRunner().invoke(cli_app, ["clean", str(src), "--out", str(out2), "--checkpoint", tiny_checkpoint,
                                        "--shard-size", "8", "--max-error-rate", "0.1"])
    assert res2.exit_code == 1, res2.output
    assert "FAILED: error rate" in res2.output and "exceeds --max-error-rate 0.1" in res2.output
    m = json.loads((out2 / "_manifest.json").read_text())
    assert m["status"] == "failed" and "error rate" in m["reason"] and "rows already written are kept" in m["reason"]
    kept = rows(out2)
    assert len(kept) == len(got) and m["dataset"]["rows"] == len(kept)
    assert verify.verify(str(out2), str(src)).ok


# ---- security --------------------------------------------------------------------------


def _crafted_dataset(folder: Path, keys: list[str]) -> None:
    folder.mkdir(parents=True)
    png = encode(make_image(4, 4, 1))
    pq.write_table(pa.table({"key": keys, "status": ["ok"] * len(keys), "image": [png] * len(keys),
                             "image_format": ["png"] * len(keys)}), folder / "crafted.parquet")


def test_export_never_escapes_the_output_dir(tmp_path: Path) -> None:
    evil = ["../escape.png", "../../etc/evil.png", "/tmp/abs-evil.png", "a/../../up.png",
            "..\\win-escape.png", "C:\\temp\\drive.png", "//server/share.png", "a/./../../x.png",
            "", ".", "link/inside.png", "fine/ok.png"]
    dst, out = tmp_path / "dst", tmp_path / "deep" / "out"
    _crafted_dataset(dst, evil)
    out.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (out / "link").symlink_to(outside, target_is_directory=True)  # a link planted in OUT
    before = {p for p in tmp_path.rglob("*")}
    counts = export_images(str(dst), str(out))
    new = {p for p in tmp_path.rglob("*")} - before
    assert {p.relative_to(out).as_posix() for p in new if p.is_file()} == {"fine/ok.png"}
    assert counts["written"] == 1 and counts["unsafe_keys"] == len(evil) - 1
    assert not list(outside.iterdir())
    assert not Path("/tmp/abs-evil.png").exists()


def test_checkpoints_verified_and_never_unpickled(tmp_path: Path, tiny_checkpoint: str) -> None:
    canary = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self) -> tuple[Any, tuple[str, str]]:
            return (open, (str(canary), "w"))  # creates the canary if anything unpickles this

    payload = pickle.dumps({"state_dict": Evil()})
    pt = tmp_path / "model.pt"
    pt.write_bytes(payload)
    with pytest.raises(checkpoint.CheckpointError, match="not found"):
        checkpoint.load(pt)  # a .pt is not a checkpoint aejob reads
    with pytest.raises(checkpoint.CheckpointError):
        build_spec(CleanConfig(src=str(tmp_path), dst=str(tmp_path / "o"), checkpoint=str(pt)),
                   runner.RayOptions())
    # the pickle renamed to .safetensors with a sidecar that matches its sha256: still refused
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(payload)
    meta = json.loads(Path(tiny_checkpoint).with_suffix(".json").read_text())
    meta["sha256"] = checkpoint.sha256_file(fake)
    fake.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(Exception) as e:
        checkpoint.load(fake)
    assert not isinstance(e.value, (AssertionError, pickle.UnpicklingError))
    # a real checkpoint whose bytes changed after its sidecar was written
    bad = tmp_path / "tampered.safetensors"
    data = bytearray(Path(tiny_checkpoint).read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    shutil.copy(Path(tiny_checkpoint).with_suffix(".json"), bad.with_suffix(".json"))
    with pytest.raises(checkpoint.CheckpointError, match="sha256 mismatch"):
        checkpoint.load(bad)
    assert not canary.exists()


def test_no_secrets_in_what_a_local_run_writes(reference: Path) -> None:
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    texts = [p.read_text() for p in reference.rglob("*.json")]
    assert texts and any('"status": "succeeded"' in t for t in texts)
    for t in texts:
        assert "X-Amz-Signature" not in t and "Signature=" not in t and "AWS_SECRET" not in t
        if len(secret) >= 8:
            assert secret not in t
