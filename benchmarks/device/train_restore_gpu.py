"""The restoration filter's training run on a GPU machine (the bundle of prepare.py): the same
loop as ``aejob train restore --device cuda``, called without the CLI so that the device's Python
needs no Ray. Prints a JSON summary; checkpoints land in --release and --out."""

from __future__ import annotations

import argparse
import json
import logging

from jobs.train_restore import RestoreTrainConfig, run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", default=".gpu")
    ap.add_argument("--crop-folder", default="photos-crops400")
    ap.add_argument("--out", required=True)
    ap.add_argument("--release", required=True)
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=2500)
    ap.add_argument("--resume", default="")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = RestoreTrainConfig(
        data=f"{a.bundle}/{a.crop_folder}", extra_data=f"{a.bundle}/photos-extra-{a.crop_folder.split('-')[-1]}",
        out=a.out, release=a.release, resume=a.resume, steps=1_000_000, max_minutes=a.minutes, batch=a.batch,
        crop=a.crop, lr=a.lr, warmup=500, eval_every=a.eval_every, save_every=a.eval_every, eval_crop=256,
        device=a.device)
    res = run(cfg, workers=0)
    print(json.dumps({"steps": res["steps"], "last": res["curve"][-1] if res["curve"] else None}))


if __name__ == "__main__":
    main()
