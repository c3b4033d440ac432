#!/usr/bin/env bash
# One device (GPU) session: the gpu-marked tests, a GPU throughput probe of the shipped denoiser,
# then the restoration filter's training (benchmarks/device/train_restore_gpu.py). Run from the
# repo root with the bundle of prepare.py in .gpu; OUT is where results go (the device tool's).
#   MINUTES=4 bash benchmarks/device/run.sh
set -uo pipefail
OUT="${OUT:-/tmp/device-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD"
nvidia-smi -L
python3 -c "import torch, PIL; from PIL import features; print('torch', torch.__version__, torch.cuda.get_device_name(0), 'pillow', PIL.__version__, 'avif', features.check('avif'))"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
python3 - <<'PY' 2>&1 | tee "$OUT/gpu_throughput.json"
import json, time, numpy as np, torch
from pipeline.infer import DenoiseEngine
from tests.conftest import make_image
imgs = [make_image(481, 321, seed=s, noise=25) for s in range(64)]
res = {}
for dev in ("cuda", "cpu"):
    eng = DenoiseEngine("denoiser-base", device=dev, threads=2 if dev == "cpu" else 0)
    eng.denoise(imgs[:4], sigma=25.0)
    batch = imgs if dev == "cuda" else imgs[:8]
    if dev == "cuda": torch.cuda.synchronize()
    t = time.perf_counter(); eng.denoise(batch, sigma=25.0)
    if dev == "cuda": torch.cuda.synchronize()
    res[dev] = {"images": len(batch), "images_per_s": round(len(batch) / (time.perf_counter() - t), 2),
                "batch_size": eng.batch_size, "amp": eng.amp}
print(json.dumps({"denoiser-base 481x321": res, "device": torch.cuda.get_device_name(0)}))
PY
python3 benchmarks/device/train_restore_gpu.py --out /tmp/rs --release "$OUT/restore-base" \
  --minutes "${MINUTES:-4}" 2>&1 | tee "$OUT/train.log" | grep -v "^$"
cp /tmp/rs/last.safetensors /tmp/rs/last.json "$OUT/" 2>/dev/null
ls -la "$OUT"
