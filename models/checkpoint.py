"""Checkpoints: safetensors for tensors + a JSON sidecar (name, config, training record, sha256).

Loading verifies the sha256 of the tensor file against the JSON before reading it, and never
unpickles anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch only where tensors are read or written: reading a sidecar needs none
    import torch
    from torch import nn

FORMAT_VERSION = 1
PACKAGE_WEIGHTS = Path(__file__).parent / "weights"


class CheckpointError(RuntimeError):
    pass


@dataclass
class Checkpoint:
    name: str
    config: Any
    model: nn.Module
    meta: dict[str, Any]
    sha256: str
    path: Path


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def save(
    path: str | os.PathLike[str],
    name: str,
    config: Any,
    model: nn.Module,
    meta: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> str:
    """Write ``path`` (.safetensors) and ``path.json``; returns the tensor file's sha256.

    ``dtype=torch.float16`` halves the file for release checkpoints (loaded back as float32).
    """
    from safetensors.torch import save_file

    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[f"model.{k}"] = v.contiguous()
    for k, v in (extra_tensors or {}).items():
        tensors[f"extra.{k}"] = v.detach().cpu().contiguous()
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "aejob", "name": name})
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    digest = sha256_file(path)
    sidecar = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "config": dataclasses.asdict(config),
        "file": path.name,
        "sha256": digest,
        **(meta or {}),
    }
    _atomic_write(path.with_suffix(".json"), json.dumps(sidecar, indent=2).encode())
    return digest


def resolve(ref: str | os.PathLike[str]) -> Path:
    """A checkpoint path, or the name of a checkpoint shipped in ``models/weights``."""
    p = Path(ref)
    for cand in (p, p.with_suffix(".safetensors"), PACKAGE_WEIGHTS / f"{ref}.safetensors"):
        if cand.suffix == ".safetensors" and cand.exists():
            return cand
    raise CheckpointError(f"checkpoint not found: {ref}")


def shipped_sidecars() -> list[Path]:
    """The JSON sidecars of the checkpoints shipped in ``models/weights`` (not of their exports)."""
    return [p for p in sorted(PACKAGE_WEIGHTS.glob("*.json")) if p.with_suffix(".safetensors").exists()]


def shipped_with_sha256(sha256: str) -> list[Path]:
    """Checkpoints shipped in ``models/weights`` whose sidecar records ``sha256``."""
    out = []
    for side in shipped_sidecars():
        try:
            if json.loads(side.read_text()).get("sha256") == sha256:
                out.append(side.with_suffix(".safetensors"))
        except (OSError, ValueError):
            continue
    return out


def read_meta(ref: str | os.PathLike[str]) -> dict[str, Any]:
    path = resolve(ref)
    try:
        return dict(json.loads(path.with_suffix(".json").read_text()))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint sidecar: {e}") from e


def load(
    ref: str | os.PathLike[str], map_location: str = "cpu", verify: bool = True
) -> Checkpoint:
    from safetensors.torch import load_file

    from models import registry

    path = resolve(ref)
    meta = read_meta(path)
    digest = sha256_file(path)
    if verify and meta.get("sha256") != digest:
        raise CheckpointError(
            f"{path}: sha256 mismatch (file {digest[:12]}…, recorded "
            f"{str(meta.get('sha256'))[:12]}…): the checkpoint was modified or is corrupt"
        )
    name = meta["name"]
    entry = registry.get(name)
    config = registry.config_from_dict(entry.config_cls, meta["config"])
    model = registry.build(name, config)
    tensors = load_file(str(path), device=map_location)
    state = {k[len("model."):]: v.float() if v.is_floating_point() else v
             for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(state, strict=True)
    model.eval()
    extras = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    if extras:
        meta = {**meta, "_extra_tensors": extras}
    return Checkpoint(name=name, config=config, model=model, meta=meta, sha256=digest, path=path)
