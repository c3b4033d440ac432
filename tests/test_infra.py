"""The container build and the KubeRay / Kubernetes manifests in infra/.

Checked without a cluster: every manifest parses; RayJob and RayCronJob fields are exactly
KubeRay v1.7's (a whitelist taken from ray-operator/apis/ray/v1/*_types.go, so a misspelt
field fails here as it would at the API server) with their types; every image is pinned; the
Ray version agrees between the Dockerfiles, rayVersion, pyproject.toml and the installed Ray;
each entrypoint's aejob command line parses with the real CLI; the generated files equal
infra/render.py's output; the wheel carries the shipped checkpoints.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from packaging.requirements import Requirement

# typer >= 0.25 vendors click as typer._click: its exceptions are what the CLI raises
from typer._click.exceptions import UsageError

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
sys.path.insert(0, str(REPO))
from infra import render  # noqa: E402

# ---- KubeRay v1.7 API (ray-operator/apis/ray/v1/rayjob_types.go, raycluster_types.go,
# raycronjob_types.go): json field names and the Python type each must have in YAML.
INT, STR, BOOL, NUM, MAP, LIST = int, str, bool, (int, float), dict, list
RAYJOB_SPEC = {
    "activeDeadlineSeconds": INT, "backoffLimit": INT, "rayClusterSpec": MAP,
    "submitterPodTemplate": MAP, "metadata": MAP, "clusterSelector": MAP, "submitterConfig": MAP,
    "managedBy": STR, "deletionStrategy": MAP, "entrypoint": STR, "runtimeEnvYAML": STR,
    "jobId": STR, "submissionMode": STR, "entrypointResources": STR, "entrypointNumCpus": NUM,
    "entrypointNumGpus": NUM, "ttlSecondsAfterFinished": INT, "shutdownAfterJobFinishes": BOOL,
    "suspend": BOOL,
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode"}
SUBMITTER_CONFIG = {"backoffLimit": INT}
RAYCLUSTER_SPEC = {
    "suspend": BOOL, "managedBy": STR, "autoscalerOptions": MAP, "headServiceAnnotations": MAP,
    "enableInTreeAutoscaling": BOOL, "gcsFaultToleranceOptions": MAP, "headGroupSpec": MAP,
    "rayVersion": STR, "workerGroupSpecs": LIST, "authOptions": MAP,
}
HEAD_GROUP = {
    "template": MAP, "headService": MAP, "enableIngress": BOOL, "rayStartParams": MAP,
    "serviceType": STR, "resources": MAP, "labels": MAP,
}
WORKER_GROUP = {
    "suspend": BOOL, "groupName": STR, "replicas": INT, "minReplicas": INT, "maxReplicas": INT,
    "idleTimeoutSeconds": INT, "rayStartParams": MAP, "template": MAP, "scaleStrategy": MAP,
    "numOfHosts": INT, "resources": MAP, "labels": MAP,
}
RAYCRONJOB_SPEC = {"jobTemplate": MAP, "schedule": STR, "timeZone": STR, "suspend": BOOL}
# The pod and container fields these manifests may use (core/v1), for the same reason.
POD_TEMPLATE = {"metadata": MAP, "spec": MAP}
POD_SPEC = {
    "containers": LIST, "restartPolicy": STR, "tolerations": LIST, "serviceAccountName": STR,
    "securityContext": MAP, "volumes": LIST, "nodeSelector": MAP, "affinity": MAP,
    "imagePullSecrets": LIST,
}
CONTAINER = {
    "name": STR, "image": STR, "ports": LIST, "env": LIST, "envFrom": LIST, "resources": MAP,
    "command": LIST, "args": LIST, "volumeMounts": LIST, "securityContext": MAP,
    "imagePullPolicy": STR,
}


def _check_fields(obj: Any, allowed: dict[str, Any], where: str) -> list[str]:
    if not isinstance(obj, dict):
        return [f"{where}: expected a mapping, got {type(obj).__name__}"]
    errors = []
    for key, value in obj.items():
        if key not in allowed:
            errors.append(f"{where}.{key}: not a field of KubeRay v1.7 / core v1 here")
        elif isinstance(value, bool) and allowed[key] is not BOOL:
            errors.append(f"{where}.{key}: a boolean where {allowed[key]} is expected")
        elif not isinstance(value, allowed[key]):
            errors.append(f"{where}.{key}: {type(value).__name__}, expected {allowed[key]}")
    return errors


def _check_pod_template(tpl: Any, where: str) -> list[str]:
    errors = _check_fields(tpl, POD_TEMPLATE, where)
    spec = tpl.get("spec", {}) if isinstance(tpl, dict) else {}
    errors += _check_fields(spec, POD_SPEC, f"{where}.spec")
    for i, c in enumerate(spec.get("containers", [])):
        errors += _check_fields(c, CONTAINER, f"{where}.spec.containers[{i}]")
    return errors


def _check_start_params(params: dict, where: str) -> list[str]:
    # map[string]string: `num-gpus: 1` (an int) is rejected by the API server
    return [f"{where}.rayStartParams.{k}: {v!r} is not a string" for k, v in params.items()
            if not isinstance(v, str)]


def rayjob_spec_errors(spec: Any, where: str = "spec") -> list[str]:
    """Every field of a RayJobSpec (recursively into the cluster spec) that KubeRay v1.7 lacks
    or that has the wrong type."""
    errors = _check_fields(spec, RAYJOB_SPEC, where)
    if not isinstance(spec, dict):
        return errors
    if spec.get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES:
        errors.append(f"{where}.submissionMode: {spec['submissionMode']!r}")
    errors += _check_fields(spec.get("submitterConfig", {}), SUBMITTER_CONFIG, f"{where}.submitterConfig")
    if "submitterPodTemplate" in spec:
        errors += _check_pod_template(spec["submitterPodTemplate"], f"{where}.submitterPodTemplate")
    cluster = spec.get("rayClusterSpec", {})
    errors += _check_fields(cluster, RAYCLUSTER_SPEC, f"{where}.rayClusterSpec")
    head = cluster.get("headGroupSpec", {})
    errors += _check_fields(head, HEAD_GROUP, f"{where}.rayClusterSpec.headGroupSpec")
    errors += _check_start_params(head.get("rayStartParams", {}), f"{where}.headGroupSpec")
    errors += _check_pod_template(head.get("template", {}), f"{where}.headGroupSpec.template")
    for i, g in enumerate(cluster.get("workerGroupSpecs", [])):
        w = f"{where}.rayClusterSpec.workerGroupSpecs[{i}]"
        errors += _check_fields(g, WORKER_GROUP, w)
        errors += _check_start_params(g.get("rayStartParams", {}), w)
        errors += _check_pod_template(g.get("template", {}), f"{w}.template")
    return errors


# ---- loading


def _load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((INFRA / name).read_text()) if d is not None]


def _manifests() -> dict[str, list[dict]]:
    return {p.name: _load(p.name) for p in sorted(INFRA.glob("*.yaml"))}


def _configmap_rayjob(docs: list[dict]) -> dict:
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    (text,) = cm["data"].values()
    (job,) = [d for d in yaml.safe_load_all(text) if d]
    return job


def rayjob_specs() -> list[tuple[str, dict]]:
    """(where, RayJobSpec) for every RayJob spec the manifests define."""
    docs = _manifests()
    (job,) = docs["rayjob.yaml"]
    (cron,) = docs["raycronjob.yaml"]
    return [
        ("rayjob.yaml", job["spec"]),
        ("raycronjob.yaml jobTemplate", cron["spec"]["jobTemplate"]),
        ("cronjob.yaml ConfigMap", _configmap_rayjob(docs["cronjob.yaml"])["spec"]),
    ]


def _images(obj: Any) -> Iterator[str]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "image":
                yield v
            else:
                yield from _images(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _images(v)


def _gpu_groups(spec: dict) -> list[dict]:
    return [g for g in spec["rayClusterSpec"]["workerGroupSpecs"]
            if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                   for c in g["template"]["spec"]["containers"])]


# ---- the CLI parser


def parse_aejob(argv: list[str]) -> Any:
    """Parse ``aejob ...`` with the real CLI's parser, without running the command: returns
    the sub-command's click context; raises UsageError (e.g. NoSuchOption) for a misspelt
    option, an unknown command or a bad value."""
    from jobs.cli import app

    assert argv[0] == "aejob", argv
    group: Any = typer.main.get_command(app)
    ctx = group.make_context("aejob", argv[1:])
    # the sub-command name is held back from ctx.args (click's protected args)
    protected = list(getattr(ctx, "protected_args", None) or getattr(ctx, "_protected_args", []))
    name, cmd, rest = group.resolve_command(ctx, protected + ctx.args)
    assert cmd is not None, argv
    return cmd.make_context(name or "", rest, parent=ctx)


# ---- tests: versions and images


def _ray_requirement() -> Requirement:
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray_req,) = [Requirement(d) for d in deps if Requirement(d).name == "ray"]
    return ray_req


@pytest.mark.parametrize("dockerfile, flavour", [("Dockerfile", "cpu"), ("Dockerfile.gpu", "gpu")])
def test_dockerfile_from_matches_ray_everywhere(dockerfile, flavour):
    import ray

    text = (INFRA / dockerfile).read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert froms == [f"rayproject/ray:{ray.__version__}-py311-{flavour}"], froms
    assert "ARG" not in re.findall(r"^\w+", text, flags=re.M)  # written out, not templated
    (job,) = _load("rayjob.yaml")
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    # the image's Ray is the one aejob is tested with, inside pyproject's pin (the Dockerfile's
    # pip install then keeps the image's Ray; its RUN asserts that too)
    assert _ray_requirement().specifier.contains(ray.__version__)
    assert f"assert ray.__version__ == '{ray.__version__}'" in text
    # installs the package itself (not editable: the weights must be in site-packages)
    assert re.search(r"pip install --no-cache-dir /home/ray/aejob-src\b", text)
    assert "-e " not in text
    assert (INFRA / f"{dockerfile}.dockerignore").is_file()


def test_wheel_ships_the_checkpoints(tmp_path):
    """What the Dockerfile's `pip install` puts in the image: every shipped checkpoint."""
    # built from a copy of what the Dockerfile copies, so no build/ lands in the checkout
    src = tmp_path / "src"
    for part in ("jobs", "pipeline", "models", "infra"):
        shutil.copytree(REPO / part, src / part, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / part, src / part)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("aejob-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"models/weights/{p.name}" for p in (REPO / "models" / "weights").iterdir()
               if p.suffix in {".safetensors", ".json"}}
    assert shipped and shipped <= names, shipped - names
    assert "jobs/cli.py" in names and "pipeline/runner.py" in names


def test_every_image_is_pinned():
    seen = []
    for name, docs in _manifests().items():
        for doc in docs:
            seen += [(name, i) for i in _images(doc)]
    for where, spec in rayjob_specs():
        seen += [(where, i) for i in _images(spec)]
    assert len(seen) > 10
    for where, image in seen:
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag, f"{where}: {image} has no tag"
        assert tag != "latest" and re.match(r"^v?\d+\.\d+(\.\d+)?([-.][\w.]+)?$", tag), f"{where}: {image}"
    flavours = {image.rsplit("-", 1)[-1] for _, image in seen if "aejob:" in image}
    assert flavours == {"cpu", "gpu"}


# ---- tests: KubeRay fields


@pytest.mark.parametrize("where, spec", rayjob_specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_rayjob_spec_fields_are_kuberay_v17(where, spec):
    assert rayjob_spec_errors(spec, where) == []
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
    assert spec["backoffLimit"] >= 1
    assert spec["submissionMode"] == "K8sJobMode"
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = cluster["workerGroupSpecs"]
    assert groups and all(g["replicas"] >= 1 for g in groups)
    for g in groups:  # fixed size: the entrypoint's --num-actors is sized to it
        assert g["minReplicas"] == g["replicas"] == g["maxReplicas"]
    assert cluster["enableInTreeAutoscaling"] is False


@pytest.mark.parametrize("where, spec", rayjob_specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_entrypoint_parses_and_uses_the_gpu_group(where, spec):
    argv = shlex.split(spec["entrypoint"])
    ctx = parse_aejob(argv)
    assert ctx.info_name == "clean"
    assert ctx.params["src"].startswith("s3://") and ctx.params["out"].startswith("s3://")
    gpu = _gpu_groups(spec)
    assert gpu, f"{where}: no GPU worker group"
    gpus = 0
    for g in gpu:
        assert g["rayStartParams"]["num-gpus"] == "1"
        (c,) = g["template"]["spec"]["containers"]
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
        assert c["image"].endswith("-gpu")
        gpus += g["replicas"] * g.get("numOfHosts", 1)
    # one actor per GPU of the group: all of them busy, none waiting for a GPU
    assert ctx.params["num_gpus"] == 1
    assert ctx.params["num_actors"] == gpus


def test_entrypoint_parser_rejects_a_misspelt_option():
    """The parse check can fail: a typo in an entrypoint is caught."""
    parse_aejob(["aejob", "clean", "s3://b/in", "--out", "s3://b/out", "--num-actors", "2"])
    with pytest.raises(UsageError):
        parse_aejob(["aejob", "clean", "s3://b/in", "--out", "s3://b/out", "--num-actor", "2"])
    with pytest.raises(UsageError):
        parse_aejob(["aejob", "clean", "s3://b/in", "--out", "s3://b/out", "--num-gpus", "one"])
    with pytest.raises(UsageError):
        parse_aejob(["aejob", "clena", "s3://b/in"])


def test_field_whitelist_catches_misspelt_and_mistyped_fields():
    (job,) = _load("rayjob.yaml")
    spec = job["spec"]
    assert rayjob_spec_errors(spec) == []
    bad = yaml.safe_load(yaml.safe_dump(spec))
    bad["shutdownAfterJobFinish"] = True
    bad["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 2
    bad["rayClusterSpec"]["workerGroupSpecs"][1]["rayStartParams"]["num-gpus"] = 1
    bad["backoffLimit"] = "2"
    errors = " ".join(rayjob_spec_errors(bad))
    for needle in ("shutdownAfterJobFinish:", "replica:", "num-gpus", "backoffLimit: str"):
        assert needle in errors


def test_rayjob_manifest():
    (job,) = _load("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["name"] == "aejob-clean"
    text = (INFRA / "rayjob.yaml").read_text()
    assert "docker build" in (INFRA / "Dockerfile").read_text()
    assert "infra/render.py" in text  # says it is the template of the scheduled runs
    for pod in _pods(job["spec"]):
        for c in pod["spec"]["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN"):
                assert "value" not in env.get(name, {}), name  # credentials only by reference


def _pods(spec: dict) -> list[dict]:
    cluster = spec["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]


def test_raycronjob_manifest():
    (cron,) = _load("raycronjob.yaml")
    assert cron["apiVersion"] == "ray.io/v1" and cron["kind"] == "RayCronJob"
    assert _check_fields(cron["spec"], RAYCRONJOB_SPEC, "spec") == []
    spec = cron["spec"]
    assert len(spec["schedule"].split()) == 5 and "TZ" not in spec["schedule"]
    assert spec["timeZone"] == render.TIME_ZONE and spec["suspend"] is False
    assert set(cron["metadata"]) == {"name", "labels"}


def test_cronjob_manifest_least_privilege():
    docs = _load("cronjob.yaml")
    by_kind = {d["kind"]: d for d in docs}
    assert sorted(by_kind) == ["ConfigMap", "CronJob", "Role", "RoleBinding", "ServiceAccount"]
    cron = by_kind["CronJob"]
    assert cron["apiVersion"] == "batch/v1"
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert len(spec["schedule"].split()) == 5
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0  # a retried pod would create a second RayJob
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    script = " ".join(container["command"] + container["args"])
    assert "kubectl create -f /templates/rayjob.yaml" in script and "kubectl apply" not in script
    assert container["image"] == render.KUBECTL_IMAGE
    assert container["securityContext"]["readOnlyRootFilesystem"] is True

    sa = by_kind["ServiceAccount"]["metadata"]["name"]
    assert pod["serviceAccountName"] == sa
    (rule,) = by_kind["Role"]["rules"]
    assert rule == {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get"]}
    binding = by_kind["RoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": by_kind["Role"]["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa}]

    cm = by_kind["ConfigMap"]
    mounted = {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
    assert mounted == {cm["metadata"]["name"]}
    job = _configmap_rayjob(docs)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["generateName"] == f"{render.NAME}-" and "name" not in job["metadata"]


def test_scheduled_specs_are_the_template_spec():
    """The RayCronJob's jobTemplate and the ConfigMap's RayJob are rayjob.yaml's spec, with only
    the sync arguments appended to the entrypoint."""
    (job,) = _load("rayjob.yaml")
    expected = dict(job["spec"])
    expected["entrypoint"] = shlex.join(shlex.split(expected["entrypoint"]) + render.SYNC_EXTRA_ARGS)
    for where, spec in rayjob_specs()[1:]:
        assert spec == expected, where
        # the scheduled run is a sync: rows of inputs gone from SRC are removed too
        assert parse_aejob(shlex.split(spec["entrypoint"])).params["delete"] is True, where


def test_generated_files_equal_the_renderer_output():
    rendered = render.render_all()
    assert set(rendered) == {"raycronjob.yaml", "cronjob.yaml"}
    for name, text in rendered.items():
        assert (INFRA / name).read_text() == text, f"infra/{name} is stale: run `python infra/render.py`"
    assert render.main(["--check"]) == 0


def test_renderer_check_flags_drift_and_rewrites(tmp_path):
    for name, text in render.render_all().items():
        (tmp_path / name).write_text(text.replace("Forbid", "Allow"))
    assert render.main(["--check", "--out-dir", str(tmp_path)]) == 1
    assert render.main(["--out-dir", str(tmp_path)]) == 0
    assert render.main(["--check", "--out-dir", str(tmp_path)]) == 0


def test_renderer_refuses_a_template_it_cannot_follow(tmp_path):
    text = (INFRA / "rayjob.yaml").read_text()
    with pytest.raises(render.TemplateError):
        render.render_cronjob(text.replace("  name: aejob-clean", "  name: other"))
    with pytest.raises(render.TemplateError):
        render.render_raycronjob(text.replace("entrypoint: aejob clean", "entrypoint: python x.py"))
    with pytest.raises(render.TemplateError):
        render.render_raycronjob(text + "---\nkind: Other\n")


def test_renderer_help():
    out = subprocess.run([sys.executable, str(INFRA / "render.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--check" in out.stdout


def test_infra_readme_covers_every_route():
    text = (INFRA / "README.md").read_text()
    for needle in ("aejob submit", "rayjob.yaml", "raycronjob.yaml", "cronjob.yaml", "render.py",
                   "Dockerfile", "RayCronJob", "featureGates", "backoffLimit", "networkpolicy.yaml"):
        assert needle in text, needle
