"""Tests for ``aejob submit`` (jobs/submit.py) and the README's "Run on a cluster" commands.

The ``cluster`` tests start their own Ray head on loopback (unique temp dir, free ports,
token auth on with a token of their own, or auth disabled for the README's commands) with a
PATH that does not contain the venv, as from a fresh shell, and stop exactly the processes
they started. The KubeRay manifests are tested in test_infra.py.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from jobs import submit as sub
from jobs.submit import SubmitError, SubmitOptions, build_entrypoint, register

# Ray's own job SDK (sdk.py) passes ssl=None to aiohttp; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------- entrypoint


def test_build_entrypoint_quotes_every_argument():
    args = ["clean", "s3://b/in dir", "--out", "s3://b/out;rm -rf /", "--name", "$(whoami)", "it's"]
    ep = build_entrypoint(args)
    assert ep.startswith(sub.CLUSTER_PYTHON_SH)
    assert sub.entrypoint_args(ep) == args
    assert "'$(whoami)'" in ep  # no shell expansion on the cluster


def test_build_entrypoint_round_trips_plain_args():
    args = ["clean", "s3://b/in", "--out", "s3://b/out", "--format", "webp"]
    assert sub.entrypoint_args(build_entrypoint(args)) == args
    assert sub.entrypoint_args("python -m jobs.cli clean x") is None


@pytest.mark.parametrize("args", [(), ("submit", "--", "clean", "x")])
def test_build_entrypoint_rejects_empty_and_recursive(args):
    with pytest.raises(ValueError):
        build_entrypoint(args)


def _run_entrypoint_under(parent_python: str, entrypoint: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Run ``entrypoint`` with ``sh -c`` from a ``parent_python`` process, as Ray's job
    supervisor (a Ray worker) does, with a PATH that has no venv on it."""
    code = textwrap.dedent("""
        import subprocess, sys
        try:
            import ray  # noqa: F401 - the supervisor has Ray loaded; a bare Python has not
        except ImportError:
            pass
        sys.exit(subprocess.run(sys.argv[1], shell=True).returncode)
    """)
    return subprocess.run(
        [parent_python, "-c", code, entrypoint], cwd=cwd, capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), **env},
    )


def test_entrypoint_runs_with_the_python_that_runs_ray(tmp_path):
    """The parent process has Ray loaded from the venv: the entrypoint finds that venv's Python
    although no `python` on PATH has aejob (or exists at all)."""
    probe = sub.cluster_python_command(["-c", "import sys, jobs; print('PREFIX', sys.prefix)"])
    out = _run_entrypoint_under(sys.executable, probe, tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"PREFIX {sys.prefix}" in out.stdout
    out = _run_entrypoint_under(sys.executable, build_entrypoint(["clean", "--help"]), tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Usage: aejob clean" in " ".join(out.stdout.split())


def test_entrypoint_without_aejob_says_so_and_names_working_dir(tmp_path):
    """A parent Python without Ray and aejob: the job exits 1 with a clear message."""
    bare = shutil.which("python3", path="/usr/bin:/bin")
    if not bare or subprocess.run([bare, "-c", "import jobs"], cwd=tmp_path, capture_output=True).returncode == 0:
        pytest.skip("needs a system python3 without aejob")
    out = _run_entrypoint_under(bare, build_entrypoint(["clean", "x", "--out", "y"]), tmp_path)
    assert out.returncode == 1
    assert "aejob is not importable with" in out.stderr and "--working-dir" in out.stderr
    assert "Traceback" not in out.stderr
    # AEJOB_PYTHON pins the interpreter whatever the parent is
    out = _run_entrypoint_under(sys.executable, build_entrypoint(["clean", "x"]), tmp_path, AEJOB_PYTHON=bare)
    assert out.returncode == 1 and "--working-dir" in out.stderr


# --------------------------------------------------------------------------- env rules

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEID",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-super-secret",
    "AWS_SESSION_TOKEN": "FwoGZXIvYXdzE-session-token",
    "AWS_SECURITY_TOKEN": "legacy-security-token",
}
PLAIN = {
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
    "AWS_REGION": "eu-west-3",
    "AWS_DEFAULT_REGION": "eu-west-3",
    "AWS_PROFILE": "batch",
}


def test_default_forwarding_is_an_allow_list_without_secrets():
    environ = {**SECRETS, **PLAIN, "HOME": "/root", "RAY_AUTH_TOKEN": "t0k"}
    env = sub.resolve_env({}, environ)
    assert env == PLAIN
    for name in SECRETS:
        assert name not in env


def test_default_forwarding_skips_unset_and_can_be_turned_off():
    assert sub.resolve_env({}, {"AWS_REGION": "", "AWS_PROFILE": "p"}) == {"AWS_PROFILE": "p"}
    assert sub.resolve_env({}, PLAIN, forward_defaults=False) == {}


def test_explicit_env_forwards_secrets_and_wins():
    env = sub.resolve_env({"AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-2"}, PLAIN)
    assert env["AWS_SECRET_ACCESS_KEY"] == "s"
    assert env["AWS_REGION"] == "us-east-2"


def test_parse_env_items():
    environ = {"AWS_SECRET_ACCESS_KEY": "from-env"}
    got = sub.parse_env_items(["A=1", "B=x=y", "EMPTY=", "AWS_SECRET_ACCESS_KEY"], environ)
    assert got == {"A": "1", "B": "x=y", "EMPTY": "", "AWS_SECRET_ACCESS_KEY": "from-env"}
    with pytest.raises(ValueError):
        sub.parse_env_items(["NOT_SET_ANYWHERE"], {})
    with pytest.raises(ValueError):
        sub.parse_env_items(["1BAD=x"], {})


@pytest.mark.parametrize("name", [*SECRETS, "RAY_AUTH_TOKEN", "DB_PASSWORD", "GH_TOKEN", "API_KEY"])
def test_secret_names_are_masked(name):
    assert sub.is_secret_name(name)
    assert sub.mask_value(name, "value") == sub.MASK


@pytest.mark.parametrize("name", list(PLAIN))
def test_plain_names_are_shown(name):
    assert not sub.is_secret_name(name)
    assert sub.mask_value(name, "eu-west-3") == "eu-west-3"


def test_url_credentials_are_masked():
    masked = sub.mask_value("AWS_ENDPOINT_URL", "https://user:pa55@minio.local:9000/x")
    assert "pa55" not in masked and "user" not in masked
    assert masked == f"https://{sub.MASK}@minio.local:9000/x"


def test_runtime_env_and_its_log_form(tmp_path):
    opts = SubmitOptions(
        address="http://127.0.0.1:8265",
        entrypoint_args=("clean", "s3://b/in", "--out", "s3://b/out"),
        working_dir=str(tmp_path),
        pip=("pillow>=12",),
        env={"AWS_SECRET_ACCESS_KEY": SECRETS["AWS_SECRET_ACCESS_KEY"]},
    )
    rt = sub.build_runtime_env(opts, {**PLAIN, **SECRETS})
    assert rt["working_dir"] == str(tmp_path.resolve())
    assert ".venv/" in rt["excludes"] and ".git/" in rt["excludes"]
    assert rt["pip"] == ["pillow>=12"]
    assert rt["env_vars"] == {**PLAIN, "AWS_SECRET_ACCESS_KEY": SECRETS["AWS_SECRET_ACCESS_KEY"]}
    shown = repr(sub.describe_runtime_env(rt))
    assert SECRETS["AWS_SECRET_ACCESS_KEY"] not in shown
    assert "eu-west-3" in shown
    assert SECRETS["AWS_SECRET_ACCESS_KEY"] not in repr(opts)  # env is left out of repr


def test_runtime_env_rejects_missing_working_dir(tmp_path):
    opts = SubmitOptions(address="x", entrypoint_args=("clean",), working_dir=str(tmp_path / "no"))
    with pytest.raises(ValueError):
        sub.build_runtime_env(opts, {})


def test_secrets_never_reach_the_log(monkeypatch, caplog, tmp_path):
    """Drive submit() with a fake client and check every log line."""
    calls = {}

    class FakeClient:
        def submit_job(self, **kw):
            calls.update(kw)
            return "raysubmit_fake"

        def get_job_status(self, sid):
            return "PENDING"

        def get_job_info(self, sid):
            raise RuntimeError("404")

    monkeypatch.setattr(sub, "_connect", lambda address, token: FakeClient())
    environ = {**PLAIN, **SECRETS, "RAY_AUTH_TOKEN": "tok-" + "9" * 20}
    opts = SubmitOptions(
        address="http://127.0.0.1:8265",
        entrypoint_args=("clean", "s3://b/in", "--out", "s3://b/out"),
        env={"AWS_SESSION_TOKEN": SECRETS["AWS_SESSION_TOKEN"]},
        wait=False,
    )
    with caplog.at_level(logging.DEBUG, logger="jobs.submit"):
        out = sub.submit(opts, environ=environ)
    assert out == {"submission_id": "raysubmit_fake", "status": "PENDING", "logs_tail": ""}
    sent = calls["runtime_env"]["env_vars"]
    assert sent["AWS_SESSION_TOKEN"] == SECRETS["AWS_SESSION_TOKEN"]  # explicit: forwarded
    assert "AWS_SECRET_ACCESS_KEY" not in sent and "AWS_ACCESS_KEY_ID" not in sent
    assert sub.entrypoint_args(calls["entrypoint"]) == ["clean", "s3://b/in", "--out", "s3://b/out"]
    assert "submitting to http://127.0.0.1:8265: aejob clean s3://b/in --out s3://b/out" in caplog.text
    text = caplog.text
    assert "AWS_SESSION_TOKEN" in text  # the name is shown ...
    for value in [*SECRETS.values(), environ["RAY_AUTH_TOKEN"]]:
        assert value not in text  # ... the value never


class _ScriptedClient:
    """Stands in for JobSubmissionClient: statuses are played back in order."""

    def __init__(self, statuses, logs="line 1\nline 2\n", existing=None, fail_status=False):
        self.statuses = list(statuses)
        self.logs = logs
        self.existing = existing
        self.fail_status = fail_status
        self.submitted = []
        self.stopped = []

    def submit_job(self, **kw):
        self.submitted.append(kw)
        return kw.get("submission_id") or "raysubmit_x"

    def get_job_info(self, sid):
        if self.existing is None:
            raise RuntimeError("Request failed with status code 404")
        return type("Info", (), {"status": self.existing})()

    def get_job_status(self, sid):
        if self.fail_status:
            raise ConnectionError("head node gone")
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    def get_job_logs(self, sid):
        return self.logs

    async def tail_job_logs(self, sid):
        for chunk in ("line 1\nli", "ne 2\n"):  # chunks need not end at a newline
            yield chunk

    def stop_job(self, sid):
        self.stopped.append(sid)
        self.statuses = ["STOPPED"]
        return True


def _run_scripted(monkeypatch, client, **kw):
    monkeypatch.setattr(sub, "_connect", lambda address, token: client)
    opts = SubmitOptions(
        address="http://127.0.0.1:8265", raw_entrypoint="true", poll_interval_s=0.01, **kw
    )
    return sub.submit(opts, environ={})


def test_wait_success_collects_streamed_tail(monkeypatch):
    client = _ScriptedClient(["RUNNING", "SUCCEEDED"])
    out = _run_scripted(monkeypatch, client)
    assert out["status"] == "SUCCEEDED" and out["logs_tail"] == "line 1\nline 2"


def test_wait_failure_raises_with_tail(monkeypatch):
    client = _ScriptedClient(["RUNNING", "FAILED"])
    with pytest.raises(SubmitError) as ei:
        _run_scripted(monkeypatch, client)
    assert ei.value.status == "FAILED" and "line 2" in ei.value.logs_tail


def test_existing_submission_id_is_followed_not_resubmitted(monkeypatch):
    client = _ScriptedClient(["SUCCEEDED"], existing="SUCCEEDED")
    out = _run_scripted(monkeypatch, client, submission_id="nightly-1")
    assert out == {"submission_id": "nightly-1", "status": "SUCCEEDED", "logs_tail": "line 1\nline 2"}
    assert client.submitted == []


def test_timeout_stops_the_job(monkeypatch):
    client = _ScriptedClient(["RUNNING"])
    with pytest.raises(SubmitError, match="timed out") as ei:
        _run_scripted(monkeypatch, client, timeout_s=0.2, stream_logs=False)
    assert client.stopped == ["raysubmit_x"] and ei.value.status == "STOPPED"


def test_lost_job_api_becomes_submit_error(monkeypatch):
    monkeypatch.setattr(sub.time, "sleep", lambda s: None)
    client = _ScriptedClient(["RUNNING"], fail_status=True)
    with pytest.raises(SubmitError, match="lost contact"):
        _run_scripted(monkeypatch, client, stream_logs=False)


# --------------------------------------------------------------------------- auth token


def test_auth_token_resolution(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("default-token\n")
    path_tok = tmp_path / "tok"
    path_tok.write_text("path-token\n")
    local, remote = "http://127.0.0.1:8265", "http://ray-head.example:8265"

    def res(addr, environ, explicit=None):
        return sub.resolve_auth_token(addr, explicit, environ, home=home)

    assert res(local, {}, explicit="explicit") == "explicit"
    assert res(remote, {"RAY_AUTH_TOKEN": "env-token"}) == "env-token"
    assert res(remote, {"RAY_AUTH_TOKEN_PATH": str(path_tok)}) == "path-token"
    assert res(local, {}) == "default-token"  # ~/.ray/auth_token for a local cluster ...
    assert res("http://localhost:8265", {}) == "default-token"
    assert res(remote, {}) is None  # ... but not sent to a remote one
    assert res(remote, {"RAY_AUTH_MODE": "token"}) == "default-token"
    assert res(local, {"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "x"}) is None
    assert sub.resolve_auth_token(local, None, {}, home=tmp_path / "nohome") is None


def test_resolve_address():
    assert sub.resolve_address(None, {}) == sub.DEFAULT_ADDRESS
    assert sub.resolve_address(None, {"RAY_ADDRESS": "http://h:8265/"}) == "http://h:8265"
    assert sub.resolve_address("10.0.0.1:8265", {"RAY_ADDRESS": "x"}) == "http://10.0.0.1:8265"
    for bad in ("auto", "ray://h:10001"):
        with pytest.raises(ValueError):
            sub.resolve_address(bad, {})


# --------------------------------------------------------------------------- CLI


def _app(group: bool = True) -> typer.Typer:
    app = typer.Typer(add_completion=False)
    if group:  # like the real aejob app: a callback makes `submit` a sub-command

        @app.callback()
        def _root() -> None:
            pass

    register(app)
    return app


def test_cli_help_single_command_app():
    result = CliRunner().invoke(_app(group=False), ["--help"])
    assert result.exit_code == 0, result.output
    assert "Ray Job" in result.output and "backoffLimit" in result.output


def test_cli_help_as_subcommand():
    result = CliRunner().invoke(_app(), ["submit", "--help"])
    assert result.exit_code == 0, result.output
    for opt in ("--address", "--working-dir", "--pip", "--env", "--no-wait", "--timeout",
                "--submission-id"):
        assert opt in result.output
    assert "retries belong to the submitter" in " ".join(result.output.split())


@pytest.mark.parametrize(
    "argv",
    [
        ["submit"],  # no aejob command
        ["submit", "clean", "s3://b/in", "--out", "s3://b/out"],  # forgot `--`
        ["submit", "--env", "1BAD=x", "--", "clean", "x"],
        ["submit", "--env", "SURELY_NOT_SET_AEJOB_TEST", "--", "clean", "x"],
        ["submit", "--timeout", "-1", "--", "clean", "x"],
        ["submit", "--working-dir", "/nonexistent/aejob", "--", "clean", "x"],
        ["submit", "--address", "auto", "--", "clean", "x"],
        ["submit", "--", "submit", "--", "clean", "x"],
    ],
)
def test_cli_bad_invocation_exits_2(argv, monkeypatch):
    monkeypatch.delenv("SURELY_NOT_SET_AEJOB_TEST", raising=False)
    result = CliRunner().invoke(_app(), argv)
    assert result.exit_code == 2, result.output


def test_cli_unreachable_cluster_exits_1():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["submit", "--address", f"http://127.0.0.1:{port}", "--", "clean", "s3://b/in"]
    result = CliRunner().invoke(_app(), argv)
    assert result.exit_code == 1, result.output
    assert "cannot use the Ray job API" in result.output


# --------------------------------------------------------------------------- real cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _our_pids(marker: str, tmp: str) -> list[int]:
    """Processes started by our cluster: the marker in their environment or our temp dir
    in their command line. Nothing else on the machine can carry either."""
    found = []
    needle_env = f"AEJOB_TEST_CLUSTER={marker}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        if needle_env in environ.split(b"\0") or tmp.encode() in cmdline:
            found.append(int(entry))
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _http_ok(url: str, token: str) -> bool:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _path_without_venv() -> str:
    """PATH as in a shell where the venv was never activated."""
    venv = str(VENV_BIN.parent)
    dirs = [d for d in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
            if d and not d.startswith(venv) and "/.venv/" not in d + "/"]
    return os.pathsep.join(dirs)


def _fresh_shell_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "AWS_")) and k not in {"VIRTUAL_ENV", "PYTHONPATH"}}
    env["PATH"] = _path_without_venv()
    env.update(extra)
    return env


@dataclass
class Cluster:
    address: str
    token_file: Path
    tmp: Path


def _stop_cluster(proc: subprocess.Popen, marker: str, tmp: str) -> list[int]:
    """SIGTERM our process group (`ray start --block` then shuts its node down), then
    SIGKILL whatever of ours is left. Returns pids that survived everything."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
    deadline = time.monotonic() + 20
    sent_term = False
    while time.monotonic() < deadline:
        left = _our_pids(marker, tmp)
        if not left:
            return []
        if not sent_term:
            _signal_all(left, signal.SIGTERM)
            sent_term = True
        elif time.monotonic() > deadline - 10:
            _signal_all(left, signal.SIGKILL)
        time.sleep(0.5)
    return _our_pids(marker, tmp)


@pytest.fixture(scope="module")
def ray_cluster():
    ray_bin = VENV_BIN / "ray"
    if not ray_bin.exists():
        pytest.skip("no ray executable next to the test interpreter")
    # Short path: Ray's unix sockets live under the temp dir (107-byte limit).
    tmp = Path(tempfile.mkdtemp(prefix="aejob-ray-", dir="/tmp"))
    marker = tmp.name
    token = secrets.token_hex(32)
    token_file = tmp / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)

    env = _fresh_shell_env()
    env.update(
        # Token auth explicitly on, with our own token: the cluster behaves the same
        # whether or not ~/.ray/auth_token exists (ray start turns auth on when it does).
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_file),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # SIGTERM: stop now, no 30 s node drain
        AEJOB_TEST_CLUSTER=marker,
        # A fresh shell: the venv is not on PATH, so the raylet's `python` is not the venv's
        # (the job must still run with the Python that runs Ray).
        PATH=_path_without_venv(),
    )
    gcs, dash = _free_port(), _free_port()
    cmd = [
        str(ray_bin), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",  # never beyond loopback
        f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--ray-client-server-port={_free_port()}",
        "--include-dashboard=true",
        "--num-cpus=2", "--num-gpus=0",  # aejob clean needs actor + write tasks at once
        f"--object-store-memory={100 * 1024 * 1024}",
        f"--temp-dir={tmp}",
        "--disable-usage-stats",
    ]
    log_path = tmp / "ray-start.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=tmp,
        )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while not _http_ok(f"{address}/api/jobs/", token):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray head did not come up:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield Cluster(address=address, token_file=token_file, tmp=tmp)
    finally:
        survivors = _stop_cluster(proc, marker, str(tmp))
        shutil.rmtree(tmp, ignore_errors=True)
        assert not survivors, f"processes of the test cluster survived: {survivors}"


def _environ(cluster: Cluster, **extra: str) -> dict[str, str]:
    return {"RAY_AUTH_TOKEN_PATH": str(cluster.token_file), **extra}


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_cluster_job_succeeds_with_working_dir_env_and_token(ray_cluster, tmp_path):
    (tmp_path / "hello.py").write_text(textwrap.dedent("""
        import os
        import ray

        ray.init()  # the driver connects to the token-auth cluster
        print("remote:", ray.get(ray.remote(lambda: 40 + 2).remote()))
        print("hello-aejob", os.environ.get("AWS_REGION"), os.environ.get("AEJOB_VALUE"))
        print("secret-forwarded:", "AWS_SECRET_ACCESS_KEY" in os.environ)
    """))
    opts = SubmitOptions(
        address=ray_cluster.address,
        working_dir=str(tmp_path),
        env={"AEJOB_VALUE": "v-123"},
        raw_entrypoint=sub.cluster_python_command(["hello.py"]),
        timeout_s=240,
        poll_interval_s=0.5,
    )
    t0 = time.monotonic()
    environ = _environ(ray_cluster, AWS_REGION="eu-test-1", AWS_SECRET_ACCESS_KEY="nope")
    out = sub.submit(opts, environ=environ)
    print(f"job SUCCEEDED in {time.monotonic() - t0:.1f} s")
    assert out["status"] == "SUCCEEDED"
    assert out["submission_id"].startswith("raysubmit_")
    assert "remote: 42" in out["logs_tail"]
    assert "hello-aejob eu-test-1 v-123" in out["logs_tail"]
    assert "secret-forwarded: False" in out["logs_tail"]


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_cluster_failed_job_raises_with_log_tail(ray_cluster):
    opts = SubmitOptions(
        address=ray_cluster.address,
        raw_entrypoint=sub.cluster_python_command(["-c", "import sys; print('boom-aejob'); sys.exit(3)"]),
        timeout_s=240,
        poll_interval_s=0.5,
    )
    with pytest.raises(SubmitError) as ei:
        sub.submit(opts, environ=_environ(ray_cluster))
    assert ei.value.status == "FAILED"
    assert "boom-aejob" in ei.value.logs_tail


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_cluster_timeout_stops_the_job(ray_cluster):
    opts = SubmitOptions(
        address=ray_cluster.address,
        raw_entrypoint=sub.cluster_python_command(
            ["-c", "import time; print('sleeping', flush=True); time.sleep(120)"]),
        timeout_s=3,
        poll_interval_s=0.5,
    )
    with pytest.raises(SubmitError) as ei:
        sub.submit(opts, environ=_environ(ray_cluster))
    assert "timed out" in str(ei.value)
    assert ei.value.status == "STOPPED"


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_cluster_without_token_is_refused(ray_cluster):
    opts = SubmitOptions(address=ray_cluster.address, raw_entrypoint="true")
    with pytest.raises(SubmitError) as ei:
        sub.submit(opts, environ={"RAY_AUTH_MODE": "disabled"})
    assert "401" in str(ei.value) or "uthentication" in str(ei.value)


# The `aejob submit` command in a process of its own, as a user runs it (CliRunner's
# stdout swap does not survive pytest's live logging, and a real exit code is the point).
_CLI = """
import logging, typer
from jobs.submit import register
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
app = typer.Typer(add_completion=False)

@app.callback()
def _root() -> None:
    pass

register(app)
app(prog_name="aejob")
"""


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_cluster_cli_runs_real_entrypoint_and_is_idempotent(ray_cluster):
    """`aejob submit --working-dir <repo> -- --help` runs `aejob --help` on the cluster
    from the uploaded repo; a rerun with the same id follows the finished job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    sid = f"aejob-test-{secrets.token_hex(4)}"
    cmd = [
        sys.executable, "-c", _CLI, "submit", "--address", ray_cluster.address,
        "--working-dir", str(REPO), "--auth-token-file", str(ray_cluster.token_file),
        "--submission-id", sid, "--timeout", "240", "--", "--help",
    ]

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)

    first = run()
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.strip() == f"{sid} SUCCEEDED"
    assert f"[{sid}]" in first.stderr and "Usage:" in first.stderr  # streamed job log
    assert f"submitting to {ray_cluster.address}: aejob --help" in first.stderr
    token = ray_cluster.token_file.read_text()
    assert token not in first.stderr + first.stdout

    again = run()
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.strip() == f"{sid} SUCCEEDED"
    assert "already exists" in again.stderr  # followed, not submitted twice


def _dst_rows(dst: Path) -> list[dict]:
    import pyarrow.dataset as pads

    return pads.dataset(str(dst), format="parquet").to_table(columns=["key", "status"]).to_pylist()


@pytest.mark.cluster
@pytest.mark.timeout(420)
def test_cluster_submit_clean_from_a_fresh_shell(ray_cluster, image_folder, tiny_checkpoint, tmp_path):
    """The issue's flow: a head started without the venv on PATH, then `.venv/bin/aejob submit
    --wait -- clean SRC --out DST` from such a shell; the job runs with Ray's own Python."""
    dst = tmp_path / "dst"
    cmd = [
        str(VENV_BIN / "aejob"), "submit", "--address", ray_cluster.address, "--wait",
        "--auth-token-file", str(ray_cluster.token_file), "--timeout", "360",
        "--", "clean", str(image_folder), "--out", str(dst), "--checkpoint", tiny_checkpoint,
        "--num-actors", "1",
    ]
    env = _fresh_shell_env()
    assert shutil.which("aejob", path=env["PATH"]) is None  # really no venv on PATH
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    print(out.stderr[-4000:])
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip().endswith("SUCCEEDED")
    assert "No module named 'typer'" not in out.stderr and "Traceback" not in out.stderr
    rows = _dst_rows(dst)
    assert len(rows) == 6  # five images and the broken one, one row per input
    assert sum(r["status"] == "ok" for r in rows) == 5


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_cluster_job_without_aejob_fails_with_a_clear_message(ray_cluster, tmp_path):
    """A cluster Python without aejob (pinned here with AEJOB_PYTHON to a system python3):
    the job FAILS and its log says aejob is not importable and names --working-dir."""
    bare = shutil.which("python3", path="/usr/bin:/bin")
    if not bare or subprocess.run([bare, "-c", "import jobs"], cwd=tmp_path, capture_output=True).returncode == 0:
        pytest.skip("needs a system python3 without aejob")
    opts = SubmitOptions(
        address=ray_cluster.address, entrypoint_args=("clean", "s3://b/in", "--out", "s3://b/out"),
        env={"AEJOB_PYTHON": bare}, timeout_s=240, poll_interval_s=0.5,
    )
    with pytest.raises(SubmitError) as ei:
        sub.submit(opts, environ=_environ(ray_cluster))
    assert ei.value.status == "FAILED"
    assert "aejob is not importable with" in ei.value.logs_tail
    assert "--working-dir" in ei.value.logs_tail


# --------------------------------------------------------------------------- README


def _readme_blocks(section: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```bash\n(.*?)```", text[start:end if end > 0 else None], flags=re.S)


@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_readme_run_on_a_cluster_commands(image_folder, tmp_path):
    """Runs the README's "Run on a cluster" commands as written, from a shell without the
    venv on PATH, changing only what isolates this test: the dashboard port, the other ports
    and a temp dir of its own on `ray start`, the paths, the submission id, and `ray stop`
    (global: replaced by stopping exactly this cluster's processes)."""
    local, kube = _readme_blocks("Run on a cluster")
    commands = [c.strip() for c in local.splitlines() if c.strip()]
    assert [shlex.split(c, comments=True)[0] for c in commands] == [
        ".venv/bin/ray", ".venv/bin/aejob", ".venv/bin/ray", ".venv/bin/ray", ".venv/bin/ray",
        ".venv/bin/aejob", ".venv/bin/ray"]
    tmp = Path(tempfile.mkdtemp(prefix="aejob-rd-", dir="/tmp"))  # short: unix socket paths
    marker = tmp.name
    dash = _free_port()
    env = _fresh_shell_env(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                           RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", AEJOB_TEST_CLUSTER=marker)
    isolation = [f"--port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
                 f"--ray-client-server-port={_free_port()}", f"--metrics-export-port={_free_port()}",
                 f"--temp-dir={tmp}", "--disable-usage-stats"]
    dst = tmp_path / "clean"
    sid = ""
    outputs: list[subprocess.CompletedProcess] = []
    try:
        for line in commands:
            argv = shlex.split(line.replace("8265", str(dash)), comments=True)
            if argv[:2] == [".venv/bin/ray", "stop"]:
                continue  # below: only this cluster's processes
            argv[0] = str(VENV_BIN / Path(argv[0]).name)
            argv = [{"./photos": str(image_folder), "./clean": str(dst)}.get(a, a) for a in argv]
            argv = [sid if a == "SUBMISSION_ID" else a for a in argv]
            if argv[1:3] == ["start", "--head"]:
                argv += isolation
            out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420)
            outputs.append(out)
            assert out.returncode == 0, f"{line}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
            if argv[1] == "submit":
                sid, status = out.stdout.split()[-2:]
                assert status == "SUCCEEDED"
        assert sid in outputs[2].stdout + outputs[2].stderr  # ray job list
        assert "succeeded" in (outputs[3].stdout + outputs[3].stderr).lower()  # ray job status
        assert outputs[4].stdout.strip()  # ray job logs
        assert (dst / "_report" / "report.html").is_file()
        assert len(_dst_rows(dst)) == 6
    finally:
        left = _our_pids(marker, str(tmp))
        _signal_all(left, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while (left := _our_pids(marker, str(tmp))) and time.monotonic() < deadline:
            time.sleep(0.5)
        _signal_all(left, signal.SIGKILL)
        time.sleep(1)
        survivors = _our_pids(marker, str(tmp))
        shutil.rmtree(tmp, ignore_errors=True)
        assert not survivors, f"processes of the README cluster survived: {survivors}"
    # the Kubernetes commands apply manifests that exist and parse (tests/test_infra.py checks them)
    import yaml

    files = re.findall(r"-f (infra/\S+)", kube)
    assert {"infra/rayjob.yaml", "infra/raycronjob.yaml", "infra/cronjob.yaml"} <= set(files)
    for f in files:
        assert [d for d in yaml.safe_load_all((REPO / f).read_text()) if d], f
