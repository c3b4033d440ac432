"""What every ``aejob train`` job shares: launching (in-process or Ray Train) and optimizer state
in safetensors (so a resumed run continues Adam's moments, without pickles)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch


def optim_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def restore_optim(opt: torch.optim.Optimizer, extras: dict[str, torch.Tensor]) -> bool:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in extras.items():
        if not k.startswith("opt."):
            continue
        _, i, name = k.split(".", 2)
        state.setdefault(int(i), {})[name] = v
    if not state:
        return False
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)
    return True


def launch(
    train_loop: Callable[[dict[str, Any]], dict[str, Any]],
    cfg: Any,
    workers: int,
    use_gpu: bool = False,
    name: str = "train",
) -> dict[str, Any]:
    """Run ``train_loop(config dict)`` in this process (workers=0) or on Ray Train's
    TorchTrainer with ``workers`` DDP workers (the same loop scales to a cluster)."""
    if "CBSD68" in os.path.abspath(cfg.data):
        raise SystemExit("CBSD68 is for evaluation only: never train on it")
    cfg_dict = dataclasses.asdict(cfg)
    for key in ("data", "out", "resume", "release"):
        if cfg_dict.get(key):
            cfg_dict[key] = os.path.abspath(cfg_dict[key])
    if workers <= 0:
        return train_loop(cfg_dict)
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init()
    trainer = TorchTrainer(
        train_loop,  # type: ignore[arg-type]  # its return value is for in-process runs
        train_loop_config=cfg_dict,
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": max(1, cfg.threads or 1)}
        ),
        run_config=RunConfig(storage_path=os.path.join(cfg_dict["out"], "ray"), name=name),
    )
    result = trainer.fit()
    return {"metrics": result.metrics}
