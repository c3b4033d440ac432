"""The CUDA paths, on a real GPU (marker ``gpu``: skipped without one). Torch-only imports and
the shipped checkpoints, so the file also runs on a GPU machine that has no Ray or S3 stack."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.metrics import psnr_uint8
from tests.conftest import make_image

pytestmark = pytest.mark.gpu


def test_denoise_engine_on_a_real_gpu() -> None:
    """The shipped denoiser on CUDA: AMP, pinned uploads, a device-filling batch, the CPU's result."""
    from pipeline.infer import DenoiseEngine

    imgs = [make_image(300, 200, seed=s, noise=20) for s in range(3)] + [make_image(1100, 700, seed=9, noise=20)]
    gpu = DenoiseEngine("denoiser-base", device="cuda", tile=256)
    cpu = DenoiseEngine("denoiser-base", device="cpu", tile=256)
    assert gpu.device.type == "cuda" and gpu.amp and gpu.batch_size > 4
    out_gpu, emb_gpu = gpu.denoise(imgs, sigma=20.0)
    torch.cuda.synchronize()
    out_cpu, emb_cpu = cpu.denoise(imgs, sigma=20.0)
    for a, b, clean in zip(out_gpu, out_cpu, [make_image(300, 200, seed=s) for s in range(3)], strict=False):
        assert a.shape == b.shape and a.dtype == np.uint8
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 1.0  # fp16 vs fp32: within a grey level
        assert abs(psnr_uint8(a, clean) - psnr_uint8(b, clean)) < 0.1
    # the embedder runs in float32 on every device: the same vectors as on CPU
    assert emb_gpu.shape == emb_cpu.shape
    np.testing.assert_allclose(emb_gpu, emb_cpu, atol=1e-4)


def test_embedder_float32_on_gpu_matches_cpu() -> None:
    from models.embedder import EmbedderEngine

    imgs = [make_image(200, 150, i) for i in range(3)]
    cpu = EmbedderEngine("embedder-base", device="cpu").embed_with_regions(imgs)
    gpu = EmbedderEngine("embedder-base", device="cuda").embed_with_regions(imgs)
    np.testing.assert_allclose(cpu[0], gpu[0], atol=1e-4)
    np.testing.assert_allclose(cpu[1], gpu[1], atol=1e-4)  # the region vectors too


def test_codec_encoder_on_a_real_gpu_decodes_on_cpu() -> None:
    """compress --num-gpus: codec-ctx's g_a/h_a on CUDA; the stream decodes on a CPU-only engine."""
    from models.codec import CodecEngine

    img = make_image(160, 96, seed=3)
    gpu, cpu = CodecEngine("codec-ctx", device="cuda"), CodecEngine("codec-ctx")
    stream = gpu.compress(img, 2)
    out = cpu.decompress(stream)
    ref_stream = cpu.compress(img, 2)
    assert out.shape == img.shape
    assert abs(psnr_uint8(out, img) - psnr_uint8(cpu.decompress(ref_stream), img)) < 0.1
    assert abs(len(stream) - len(ref_stream)) <= max(8, len(stream) // 50)


def test_avif_codec_filter_on_a_real_gpu_decodes_on_cpu() -> None:
    """compress --num-gpus with codec-avif: the filter (strength fitting) on CUDA, AV1 on CPU;
    the stream decodes on a CPU-only engine as well as the CPU encoder's own."""
    from models import avif
    from models.codec import CodecEngine

    if not avif.available():
        pytest.skip("Pillow without AVIF")
    img = make_image(160, 96, seed=3, noise=4)
    gpu, cpu = CodecEngine("codec-avif", device="cuda"), CodecEngine("codec-avif")
    stream, ref_stream = gpu.compress(img, 3), cpu.compress(img, 3)
    assert abs(psnr_uint8(cpu.decompress(stream), img) - psnr_uint8(cpu.decompress(ref_stream), img)) < 0.05
    assert abs(len(stream) - len(ref_stream)) <= 3  # the same AV1 payload; strengths may differ by a step
