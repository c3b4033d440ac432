"""Submit an ``aejob`` command to a running Ray cluster as a Ray Job.

The job runs ``aejob <command...>`` on the cluster through the Ray Jobs API
(``ray.job_submission.JobSubmissionClient``), with **the Python that runs Ray there**. A Ray
Job's entrypoint is a shell command run with the raylet's environment, where ``python`` is
whatever comes first on that PATH (often none, or a system Python without aejob: a head
started as ``.venv/bin/ray start --head`` from a shell without the venv activated). So the
entrypoint first resolves the interpreter (:data:`CLUSTER_PYTHON_SH`): ``$AEJOB_PYTHON`` when
set (``--env AEJOB_PYTHON=/path/to/python``), else the prefix of the ``ray/_raylet.so`` that
the job supervisor (the entrypoint shell's parent, a Ray worker) has loaded, read from
``/proc/$PPID/maps`` (a venv or conda env resolves to its own ``bin/python3``), else that
process's interpreter binary, else ``python3``/``python`` on PATH. It then imports aejob with a
small bootstrap rather than the ``aejob`` console script, so a ``--working-dir`` upload works
where aejob is not installed; when the import fails the job exits 1 with a message that names
the interpreter, the missing module and ``--working-dir``.

Ray Jobs run exactly once: Ray never retries a failed job. Retries belong to the submitter
(KubeRay ``RayJob.spec.backoffLimit``, a CI retry, a cron rerun). ``aejob clean`` resumes
from its done-markers, so a retry redoes only the unfinished part.

Environment forwarding is allow-listed: only ``AWS_ENDPOINT_URL``, ``AWS_REGION``,
``AWS_DEFAULT_REGION`` and ``AWS_PROFILE`` are forwarded by default. Credentials (access
keys, secret keys, session tokens) are forwarded only when passed explicitly with ``--env``
(``--env NAME`` copies the value from the local environment, so it never appears on a
command line), and their values are masked in every log line. Prefer credentials that live
on the cluster (Kubernetes Secret, IAM role) to forwarded ones: the runtime_env of a job is
readable by anyone who can read the cluster's job API.

Token authentication (Ray >= 2.52): the bearer token is taken from, in order, an explicit
token (``SubmitOptions.auth_token`` / ``--auth-token-file``), ``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH``, and ``~/.ray/auth_token`` (the file ``ray start --head`` uses to
turn token auth on) — the last one only for loopback addresses or with
``RAY_AUTH_MODE=token``, so a local default token is not sent to a remote cluster.
``RAY_AUTH_MODE=disabled`` turns the implicit sources off. The token is sent as an
``Authorization: Bearer`` header and never logged.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import os
import re
import shlex
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline import storage

logger = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Non-secret settings forwarded by default when set in the submitter's environment.
DEFAULT_FORWARDED_ENV: tuple[str, ...] = (
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
)
TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
# Never uploaded with a local working_dir (Ray also honours .gitignore and .rayignore).
WORKING_DIR_EXCLUDES: tuple[str, ...] = (
    ".git/",
    ".venv/",
    "**/__pycache__/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".mypy_cache/",
)
MASK = "****"

_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Names whose values are credentials: masked in logs, never forwarded unless explicit.
_SECRET_NAME_RE = storage.SECRET_NAME_RE  # one definition: pipeline.storage


class SubmitError(RuntimeError):
    """The job could not be submitted, or it ended in FAILED/STOPPED, or it timed out."""

    def __init__(
        self,
        message: str,
        *,
        submission_id: str | None = None,
        status: str | None = None,
        logs_tail: str = "",
    ) -> None:
        super().__init__(message)
        self.submission_id = submission_id
        self.status = status
        self.logs_tail = logs_tail


@dataclass(frozen=True)
class SubmitOptions:
    """What to submit, where, and how to wait for it.

    ``env`` holds explicitly forwarded variables; the default allow-list
    (:data:`DEFAULT_FORWARDED_ENV`) is added from the submitter's environment unless
    ``forward_default_env`` is false. Explicit entries win.
    """

    address: str
    entrypoint_args: tuple[str, ...] = ()
    working_dir: str | None = None
    pip: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict, repr=False)
    submission_id: str | None = None
    wait: bool = True
    timeout_s: float = 0
    entrypoint_num_cpus: float = 0
    # --- beyond the basic contract ---
    forward_default_env: bool = True
    auth_token: str | None = field(default=None, repr=False)
    poll_interval_s: float = 2.0
    log_tail_lines: int = 50
    stream_logs: bool = True
    # Internal hook (tests, smoke checks): submit this shell command verbatim instead of
    # ``build_entrypoint(entrypoint_args)`` (see :func:`cluster_python_command`).
    raw_entrypoint: str | None = None


# --------------------------------------------------------------------------- helpers


# POSIX sh that sets $py to the Python running Ray on the node where the entrypoint runs.
# The entrypoint shell's parent ($PPID) is the job supervisor, a Ray worker of that Python;
# setproctitle hides its argv[0], but its memory map names the site-packages of the Ray it
# loaded, and <prefix>/lib/pythonX.Y/site-packages -> <prefix>/bin/python3 (venv, conda, the
# rayproject images). /proc/$PPID/exe is the base interpreter: right for a system or conda
# Python, not for a venv, so it comes second. Without /proc (macOS): python3 on PATH.
CLUSTER_PYTHON_SH = (
    'py="${AEJOB_PYTHON:-}"; '
    'if [ -z "$py" ]; then '
    "so=$(grep -m1 -o '/.*/[a-z]*-packages/ray/_raylet[^/ ]*\\.so' /proc/$PPID/maps 2>/dev/null); "
    'pre="${so%/lib/python*/*-packages/ray/_raylet*}"; '
    'for c in "$pre/bin/python3" "$pre/bin/python"; do '
    'if [ -n "$so" ] && [ -x "$c" ]; then py="$c"; break; fi; done; fi; '
    'if [ -z "$py" ]; then py=$(readlink /proc/$PPID/exe 2>/dev/null) || py=""; '
    'case "$py" in */python*) ;; *) py="";; esac; fi; '
    'if [ -z "$py" ]; then py=$(command -v python3 || command -v python) || py=python3; fi;'
)

# Runs ``aejob`` from sys.argv[1:] with the resolved Python; a failed import says why and how
# to fix it instead of a bare ModuleNotFoundError traceback.
_BOOTSTRAP = """\
import sys
try:
    from jobs.cli import main
except ModuleNotFoundError as e:
    sys.exit(f"aejob is not importable with {sys.executable}, the Python that runs Ray on this node "
             f"(No module named {e.name!r}). Install aejob there (e.g. in the cluster image), or submit "
             "with --working-dir <aejob checkout> to upload it with the job (missing dependencies: --pip).")
sys.argv[0] = "aejob"
main()
"""


def cluster_python_command(argv: Sequence[str]) -> str:
    """A shell command that runs ``<the cluster's Python> argv...`` (see :data:`CLUSTER_PYTHON_SH`)."""
    return f'{CLUSTER_PYTHON_SH} exec "$py" {shlex.join([str(a) for a in argv])}'


def build_entrypoint(args: Sequence[str]) -> str:
    """The job's shell entrypoint: ``aejob <args...>`` run by the cluster's own Python, every
    argument shell-quoted."""
    args = [str(a) for a in args]
    if not args:
        raise ValueError("no aejob command given (e.g. `-- clean SRC --out DST`)")
    if args[0] == "submit":
        raise ValueError("refusing to submit `aejob submit` as a job")
    return cluster_python_command(["-c", _BOOTSTRAP, *args])


def entrypoint_args(entrypoint: str) -> list[str] | None:
    """The aejob arguments of an entrypoint made by :func:`build_entrypoint`, else None."""
    prefix = f'{CLUSTER_PYTHON_SH} exec "$py" '
    if not entrypoint.startswith(prefix):
        return None
    argv = shlex.split(entrypoint[len(prefix):])
    return argv[2:] if argv[:2] == ["-c", _BOOTSTRAP] else None


def is_secret_name(name: str) -> bool:
    """True for variable names that hold credentials (AWS_SECRET_ACCESS_KEY, *_TOKEN, ...)."""
    return bool(_SECRET_NAME_RE.search(name))


def mask_value(name: str, value: str) -> str:
    """The value as it may appear in logs: secrets fully masked, URL passwords masked."""
    if is_secret_name(name):
        return MASK
    if "://" in value and "@" in value:
        try:
            parts = urllib.parse.urlsplit(value)
        except ValueError:
            return MASK
        if parts.password is not None or parts.username is not None:
            host = parts.hostname or ""
            if parts.port is not None:
                host = f"{host}:{parts.port}"
            return urllib.parse.urlunsplit(parts._replace(netloc=f"{MASK}@{host}"))
    return value


def mask_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: mask_value(k, v) for k, v in env.items()}


def parse_env_items(
    items: Iterable[str], environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``K=V`` sets a value; a bare ``K`` copies it from the local environment.

    The bare form keeps secrets off the command line (shell history, ``ps``).
    Raises ValueError on malformed names or a bare name that is not set locally.
    """
    environ = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not _ENV_NAME_RE.match(name):
            raise ValueError(f"bad --env {name!r}: expected NAME=VALUE or NAME")
        if not sep:
            if name not in environ:
                raise ValueError(f"--env {name}: not set in the local environment")
            value = environ[name]
        out[name] = value
    return out


def resolve_env(
    explicit: Mapping[str, str],
    environ: Mapping[str, str] | None = None,
    *,
    forward_defaults: bool = True,
) -> dict[str, str]:
    """The env_vars for the job: the allow-listed defaults that are set, then ``explicit``."""
    environ = os.environ if environ is None else environ
    out: dict[str, str] = {}
    if forward_defaults:
        out.update({k: environ[k] for k in DEFAULT_FORWARDED_ENV if environ.get(k)})
    for k, v in explicit.items():
        if not _ENV_NAME_RE.match(k):
            raise ValueError(f"bad environment variable name {k!r}")
        out[k] = str(v)
    return out


def build_runtime_env(
    opts: SubmitOptions, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    runtime_env: dict[str, Any] = {}
    if opts.working_dir:
        wd = opts.working_dir
        if "://" not in wd:  # a local folder (remote URIs such as s3://.../pkg.zip pass as-is)
            path = Path(wd).expanduser().resolve()
            if not path.is_dir():
                raise ValueError(f"--working-dir {wd!r} is not a directory")
            wd = str(path)
            runtime_env["excludes"] = list(WORKING_DIR_EXCLUDES)
        runtime_env["working_dir"] = wd
    if opts.pip:
        runtime_env["pip"] = list(opts.pip)
    env_vars = resolve_env(opts.env, environ, forward_defaults=opts.forward_default_env)
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return runtime_env


def describe_runtime_env(runtime_env: Mapping[str, Any]) -> dict[str, Any]:
    """A copy that is safe to log (env var values masked)."""
    out = dict(runtime_env)
    if "env_vars" in out:
        out["env_vars"] = mask_env(out["env_vars"])
    return out


def resolve_address(address: str | None, environ: Mapping[str, str] | None = None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else the local dashboard."""
    environ = os.environ if environ is None else environ
    addr = address or environ.get("RAY_API_SERVER_ADDRESS") or environ.get("RAY_ADDRESS")
    addr = (addr or DEFAULT_ADDRESS).strip().rstrip("/")
    if addr == "auto" or addr.startswith("ray://"):
        raise ValueError(
            f"address {addr!r} is not a job API address; pass the dashboard URL, "
            f"e.g. {DEFAULT_ADDRESS}"
        )
    if "://" not in addr:
        addr = f"http://{addr}"
    return addr


def _is_loopback(address: str) -> bool:
    host = urllib.parse.urlsplit(address if "://" in address else f"http://{address}").hostname
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_token_file(path: str | os.PathLike[str]) -> str:
    token = Path(path).expanduser().read_text().strip()
    if not token:
        raise ValueError(f"Ray auth token file {path} is empty")
    return token


def resolve_auth_token(
    address: str,
    explicit: str | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    home: Path | None = None,
) -> str | None:
    """The bearer token to send to ``address``, or None (see the module docstring)."""
    environ = os.environ if environ is None else environ
    if explicit:
        return explicit.strip()
    mode = environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode == "disabled":
        return None
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return environ["RAY_AUTH_TOKEN"].strip()
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        return _read_token_file(environ["RAY_AUTH_TOKEN_PATH"])
    default = (home or Path.home()) / ".ray" / "auth_token"
    if default.is_file() and (mode == "token" or _is_loopback(address)):
        return _read_token_file(default)
    return None


def _connect(address: str, token: str | None):
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    if token and address.startswith("http://") and not _is_loopback(address):
        logger.warning(
            "sending the Ray auth token over plain http to %s; use https or a tunnel "
            "(kubectl port-forward, ssh -L)",
            address,
        )
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as e:  # connection refused, 401/403, version mismatch, ...
        auth_error = "401" in str(e) or "uthentication" in str(e)
        hint = " (no auth token was sent; see --auth-token-file)" if auth_error and not token else ""
        raise SubmitError(f"cannot use the Ray job API at {address}: {e}{hint}") from e


def _status_str(status: Any) -> str:
    return str(getattr(status, "value", status))


def _tail(text: str, n: int) -> str:
    return "\n".join(text.splitlines()[-n:]) if n > 0 else ""


# --------------------------------------------------------------------------- waiting


class _Deadline(Exception):
    pass


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


async def _follow_logs(client, sid: str, tail: collections.deque, deadline: float | None) -> None:
    async def pump() -> None:
        buf = ""
        async for chunk in client.tail_job_logs(sid):
            buf += chunk
            *lines, buf = buf.split("\n")
            for line in lines:
                tail.append(line)
                logger.info("[%s] %s", sid, line)
        if buf:
            tail.append(buf)
            logger.info("[%s] %s", sid, buf)

    remaining = _remaining(deadline)
    if remaining is None:
        await pump()
        return
    try:
        await asyncio.wait_for(pump(), timeout=max(0.0, remaining))
    except asyncio.TimeoutError as e:
        raise _Deadline() from e


def _poll_status(client, sid: str, deadline: float | None, interval: float) -> str:
    failures = 0
    while True:
        try:
            status = _status_str(client.get_job_status(sid))
            failures = 0
        except Exception as e:  # a blip of the head node: retry a few times
            failures += 1
            if failures >= 5:
                raise SubmitError(
                    f"lost contact with the job API while waiting for {sid}: {e}",
                    submission_id=sid,
                ) from e
            logger.warning("status of %s unavailable (%s); retrying", sid, e)
            status = ""
        if status in TERMINAL_STATUSES:
            return status
        remaining = _remaining(deadline)
        if remaining is not None and remaining <= 0:
            raise _Deadline()
        time.sleep(interval if remaining is None else max(0.05, min(interval, remaining)))


def _wait(client, sid: str, opts: SubmitOptions) -> tuple[str, str]:
    """Follow the job until it is terminal; returns (status, logs_tail)."""
    deadline = time.monotonic() + opts.timeout_s if opts.timeout_s > 0 else None
    tail: collections.deque[str] = collections.deque(maxlen=max(1, opts.log_tail_lines))
    streamed = False
    if opts.stream_logs:
        try:
            asyncio.run(_follow_logs(client, sid, tail, deadline))
            streamed = True
        except _Deadline:
            pass  # handled by _poll_status below, which sees the same deadline
        except Exception as e:  # websocket refused by a proxy, running event loop, ...
            logger.warning("log streaming for %s failed (%s); polling status instead", sid, e)
    status = _poll_status(client, sid, deadline, opts.poll_interval_s)
    if streamed and tail:
        return status, "\n".join(tail)
    try:
        return status, _tail(client.get_job_logs(sid), opts.log_tail_lines)
    except Exception as e:
        logger.warning("could not fetch the logs of %s: %s", sid, e)
        return status, "\n".join(tail)


def _stop_after_timeout(client, sid: str, opts: SubmitOptions) -> SubmitError:
    logger.warning("job %s still running after %.0f s: stopping it", sid, opts.timeout_s)
    status = "RUNNING"
    try:
        client.stop_job(sid)
        status = _poll_status(client, sid, time.monotonic() + 30, 1.0)
    except Exception as e:  # best effort: report what we know
        logger.warning("stopping %s: %s", sid, str(e) or "no terminal status within 30 s")
    logs = ""
    try:
        logs = _tail(client.get_job_logs(sid), opts.log_tail_lines)
    except Exception:
        pass
    return SubmitError(
        f"job {sid} timed out after {opts.timeout_s:g} s (status {status})",
        submission_id=sid,
        status=status,
        logs_tail=logs,
    )


# --------------------------------------------------------------------------- submit


def _existing_status(client, sid: str) -> str | None:
    try:
        return _status_str(client.get_job_info(sid).status)
    except RuntimeError:  # the job API answers 404 for unknown ids
        return None


def submit(opts: SubmitOptions, *, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Submit the job; with ``opts.wait`` follow it to a terminal status.

    Returns ``{"submission_id", "status", "logs_tail"}``. Raises :class:`SubmitError` when
    the cluster cannot be reached or refuses the job, when the job ends FAILED or STOPPED
    (the exception carries ``status`` and ``logs_tail``), or on ``timeout_s`` (the job is
    then stopped). Raises ValueError for a bad invocation.

    A ``submission_id`` makes the call idempotent: if that id already exists, the call
    follows the existing job instead of starting a second one (SUCCEEDED returns at once;
    FAILED/STOPPED raise — retry with a new id).
    """
    environ = os.environ if environ is None else environ
    address = resolve_address(opts.address, environ)
    entrypoint = opts.raw_entrypoint or build_entrypoint(opts.entrypoint_args)
    runtime_env = build_runtime_env(opts, environ)
    token = resolve_auth_token(address, opts.auth_token, environ)
    client = _connect(address, token)
    try:
        return _submit_and_follow(client, address, entrypoint, runtime_env, opts)
    except (SubmitError, KeyboardInterrupt):
        raise
    except Exception as e:  # the job API failed mid-way (head node gone, proxy error, ...)
        raise SubmitError(
            f"job API error at {address}: {e}", submission_id=opts.submission_id
        ) from e


def _submit_and_follow(
    client, address: str, entrypoint: str, runtime_env: dict[str, Any], opts: SubmitOptions
) -> dict[str, str]:
    sid = opts.submission_id
    existing = _existing_status(client, sid) if sid else None
    if sid and existing:
        logger.info("submission id %s already exists (%s): following it", sid, existing)
    else:
        args = entrypoint_args(entrypoint)
        shown = "aejob " + shlex.join(args) if args is not None else entrypoint
        logger.info("submitting to %s: %s", address, shown)
        logger.info("runtime_env: %s", describe_runtime_env(runtime_env))
        try:
            sid = client.submit_job(
                entrypoint=entrypoint,
                runtime_env=runtime_env or None,
                submission_id=sid,
                entrypoint_num_cpus=opts.entrypoint_num_cpus or None,
                metadata={"submitted_by": "aejob submit"},
            )
        except Exception as e:
            raise SubmitError(f"the cluster refused the job: {e}", submission_id=sid) from e
        logger.info("submitted %s", sid)

    if not opts.wait:
        status = existing or _status_str(client.get_job_status(sid))
        return {"submission_id": sid, "status": status, "logs_tail": ""}

    try:
        status, logs_tail = _wait(client, sid, opts)
    except _Deadline:
        raise _stop_after_timeout(client, sid, opts) from None
    except KeyboardInterrupt:
        logger.warning(
            "interrupted: job %s keeps running on the cluster; stop it with "
            "`ray job stop --address %s %s`",
            sid,
            address,
            sid,
        )
        raise

    logger.info("job %s finished: %s", sid, status)
    if status != "SUCCEEDED":
        hint = " (an earlier run with this id; retry with a new --submission-id)" if existing else ""
        raise SubmitError(
            f"job {sid} ended {status}{hint}",
            submission_id=sid,
            status=status,
            logs_tail=logs_tail,
        )
    return {"submission_id": sid, "status": status, "logs_tail": logs_tail}


# --------------------------------------------------------------------------- CLI

SUBMIT_HELP = (
    "Submit an aejob command to a running Ray cluster as a Ray Job.\n\n"
    "Everything after `--` is the aejob command, e.g. `aejob submit --address "
    "http://127.0.0.1:8265 -- clean s3://b/in --out s3://b/out --format webp`. It runs with "
    "the Python that runs Ray on the cluster (not whatever `python` is first on its PATH; "
    "`--env AEJOB_PYTHON=/path/to/python` overrides); where aejob is not installed there, "
    "`--working-dir <aejob checkout>` uploads it with the job.\n\n"
    "Ray Jobs run once and Ray never retries them: retries belong to the submitter "
    "(KubeRay RayJob backoffLimit, CI, cron). `aejob clean` resumes from its done-markers, "
    "so a retry only redoes unfinished work. With --submission-id a rerun is idempotent: "
    "an id that already exists is followed, not submitted twice.\n\n"
    "Only AWS_ENDPOINT_URL, AWS_REGION, AWS_DEFAULT_REGION and AWS_PROFILE are forwarded "
    "by default. Credentials are forwarded only with --env (a bare `--env "
    "AWS_SECRET_ACCESS_KEY` copies the value from your environment, keeping it off the "
    "command line) and are masked in logs.\n\n"
    "Exit codes: 0 SUCCEEDED (or submitted, with --no-wait); 1 FAILED, STOPPED, timed out "
    "or cluster unreachable (the log tail is printed); 2 bad invocation."
)


def submit_command(
    command: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="-- AEJOB_COMMAND",
            help="The aejob sub-command and its arguments, after `--`.",
            show_default=False,
        ),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(
            help="Ray job API (dashboard) URL. Default: $RAY_API_SERVER_ADDRESS, "
            f"$RAY_ADDRESS, else {DEFAULT_ADDRESS}.",
            show_default=False,
        ),
    ] = None,
    working_dir: Annotated[
        str | None,
        typer.Option(help="Folder (or remote zip URI) uploaded as the job's working_dir."),
    ] = None,
    pip: Annotated[
        list[str] | None,
        typer.Option("--pip", help="Extra pip requirement for the job's runtime_env (repeat)."),
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option(
            "--env",
            help="NAME=VALUE to set, or NAME to copy from your environment (repeat). "
            "Values of secret-looking names are masked in logs.",
        ),
    ] = None,
    no_default_env: Annotated[
        bool,
        typer.Option("--no-default-env", help="Do not forward the default AWS_* settings."),
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Follow the job until it ends.")
    ] = True,
    timeout: Annotated[
        float, typer.Option(help="Stop the job after this many seconds (0: no limit).", min=0)
    ] = 0.0,
    submission_id: Annotated[
        str | None, typer.Option(help="Job id; reusing one follows the existing job.")
    ] = None,
    entrypoint_num_cpus: Annotated[
        float, typer.Option(help="CPUs reserved for the driver process.", min=0)
    ] = 0.0,
    auth_token_file: Annotated[
        Path | None,
        typer.Option(
            help="File with the cluster's Ray auth token (else $RAY_AUTH_TOKEN, "
            "$RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token for local clusters).",
        ),
    ] = None,
) -> None:
    try:
        env_vars = parse_env_items(env or [])
        token = _read_token_file(auth_token_file) if auth_token_file else None
        opts = SubmitOptions(
            address=resolve_address(address),
            entrypoint_args=tuple(command or ()),
            working_dir=working_dir,
            pip=tuple(pip or ()),
            env=env_vars,
            submission_id=submission_id,
            wait=wait,
            timeout_s=timeout,
            entrypoint_num_cpus=entrypoint_num_cpus,
            forward_default_env=not no_default_env,
            auth_token=token,
        )
        build_entrypoint(opts.entrypoint_args)
        build_runtime_env(opts)
    except (ValueError, OSError) as e:
        raise typer.BadParameter(str(e)) from e

    try:
        result = submit(opts)
    except SubmitError as e:
        if e.logs_tail:
            typer.echo(f"--- last lines of the job's log ({e.submission_id}) ---", err=True)
            typer.echo(e.logs_tail, err=True)
            typer.echo("---", err=True)
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=1) from None
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    typer.echo(f"{result['submission_id']} {result['status']}")



def register(app: typer.Typer) -> None:
    """Add ``submit`` to ``app`` (the ``aejob`` typer application)."""
    app.command("submit", help=SUBMIT_HELP)(submit_command)
