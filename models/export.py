"""ONNX exports of the denoiser and the embedder, for the CPU engine (``pipeline/ort_engine.py``).

An export sits beside its checkpoint: ``NAME.onnx`` and ``NAME.onnx.json``, the sidecar naming the
checkpoint's sha256 it was made from, the ONNX file's own sha256 and what the engine needs to run
it without torch (kind, name, downsampling multiple, embedding size and input preparation). An
export whose checkpoint changed is ignored (the torch engine runs instead), never used stale.

Why: a CPU model actor that runs ONNX Runtime does not import torch. That import is ~1 s of CPU
in every actor process before its first batch (and half its memory: peak RSS 180 vs 374 MB after
one CBSD68 image), once the largest part of a job's fixed start-up on small machines; ORT's CPU
kernels are also faster on these convolutional nets (CBSD68 image, 2 threads: 0.14 vs 0.19 s).
Outputs agree with torch's to float rounding (tests pin it). ``aejob export-onnx NAME...`` writes
exports; the shipped checkpoints ship theirs.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from models import checkpoint

ONNX_OPSET = 17


def paths(ref: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(ONNX file, its sidecar) beside the checkpoint ``ref``."""
    path = checkpoint.resolve(ref)
    return path.with_suffix(".onnx"), path.with_suffix(".onnx.json")


def find(ref: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint's ONNX export and its sidecar if both exist and were made from the
    checkpoint as it is now (sha256 of both files checked); else None. No torch needed."""
    try:
        onnx_path, side_path = paths(ref)
        side = json.loads(side_path.read_text())
        if side.get("source_sha256") != checkpoint.sha256_file(checkpoint.resolve(ref)):
            return None
        if side.get("onnx_sha256") != checkpoint.sha256_file(onnx_path):
            return None
    except (OSError, ValueError, checkpoint.CheckpointError):
        return None
    return onnx_path, side


def _store_half(path: Path) -> None:
    """Store float32 weights that are exactly float16 (release checkpoints hold float16) as
    float16 behind a Cast: the file halves, the values do not change (ORT folds the casts)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    casts = []
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        w = numpy_helper.to_array(init)
        half = w.astype(np.float16)
        if w.size < 16 or not np.array_equal(half.astype(np.float32), w):
            continue
        name = init.name
        init.CopyFrom(numpy_helper.from_array(half, name + "__f16"))
        casts.append(helper.make_node("Cast", [name + "__f16"], [name], to=onnx.TensorProto.FLOAT))
    for node in reversed(casts):
        graph.node.insert(0, node)
    onnx.save(model, str(path))


def export_onnx(ref: str | os.PathLike[str]) -> Path:
    """Export the denoiser or embedder checkpoint ``ref`` beside it; returns the ONNX path."""
    import torch

    from models.denoiser import ResUNetDenoiser
    from models.embedder import CopyEmbedder

    ck = checkpoint.load(ref)
    model = ck.model.float().eval()
    side: dict[str, Any] = {"name": ck.name, "source": ck.path.name, "source_sha256": ck.sha256,
                            "opset": ONNX_OPSET, "torch": torch.__version__}
    net: torch.nn.Module
    args: tuple[torch.Tensor, ...]
    if isinstance(model, ResUNetDenoiser):
        m = int(ck.config.multiple)

        class Denoise(torch.nn.Module):  # the engine's call: tiles and one level each (<0: blind)
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
                return self.model(x, sigma)

        net, args = Denoise(), (torch.rand(2, 3, 4 * m, 6 * m), torch.tensor([25.0, -1.0]))
        names, dynamic = ["x", "sigma"], {"x": {0: "n", 2: "h", 3: "w"}, "sigma": {0: "n"}}
        side.update(kind="denoiser", multiple=m)
    elif isinstance(model, CopyEmbedder):
        cfg = ck.config
        net, args = model, (torch.rand(2, 3, cfg.input_size, cfg.input_size + 16),)
        names, dynamic = ["x"], {"x": {0: "n", 2: "h", 3: "w"}}
        side.update(kind="embedder", dim=int(cfg.dim), input_size=int(cfg.input_size),
                    max_aspect=float(cfg.max_aspect))
    else:
        raise ValueError(f"{ref}: {ck.name} has no ONNX engine (denoisers and embedders do)")
    onnx_path, side_path = paths(ref)
    tmp = onnx_path.with_name(f".{onnx_path.name}.tmp")
    # The TorchScript exporter (deprecated in favour of torch.export's, which needs onnxscript)
    # covers these static convolutional nets; no folding: weights stay the checkpoint's, ORT
    # folds at load.
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net, args, str(tmp), input_names=names, output_names=["y"], do_constant_folding=False,
                          dynamic_axes={**dynamic, "y": {0: "n"}}, opset_version=ONNX_OPSET, dynamo=False)
    _store_half(tmp)
    os.replace(tmp, onnx_path)
    side["onnx_sha256"] = checkpoint.sha256_file(onnx_path)
    side_path.write_text(json.dumps(side, indent=2) + "\n")
    return onnx_path
