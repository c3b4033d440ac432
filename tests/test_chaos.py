"""Chaos: crash the model actor mid-job (seeded) and check every input key is there exactly
once, with the statuses of an uninterrupted run. The 20-run figure is benchmarks/chaos.py."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from benchmarks.chaos import chaos_run, make_source, read_rows, run_clean

SEED = 6


@pytest.fixture(scope="module")
def chaos_source(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: str,
                 ray_local: Any) -> tuple[Path, list[dict[str, Any]]]:
    work = tmp_path_factory.mktemp("chaos")
    keys = make_source(work / "src", n_images=48, seed=SEED)
    res = run_clean(work / "src", work / "reference", tiny_checkpoint)
    assert res.ok, res.manifest
    reference = read_rows(work / "reference")
    assert sorted(r["key"] for r in reference) == keys
    return work / "src", reference


def test_actor_crashes_lose_and_duplicate_nothing(chaos_source: tuple[Path, list[dict[str, Any]]],
                                                  tiny_checkpoint: str, tmp_path: Path) -> None:
    src, reference = chaos_source
    rng = random.Random(SEED)
    # three crashes at seeded moments: ray.kill(no_restart=False), SIGKILL of the actor's
    # process, ray.kill again; each waits for the restarted actor
    # the first comes as soon as the model actor is alive, so it lands mid-job even on a fast,
    # idle machine; the later ones at seeded moments
    plan = [("ray.kill", 0.0), ("sigkill-actor", round(rng.uniform(0, 0.5), 2)),
            ("ray.kill", round(rng.uniform(0, 0.5), 2))]
    out = chaos_run(src, tmp_path / "out", tiny_checkpoint, plan, reference)
    print(f"\nchaos: {out['kills']} -> keys {out['keys_found']}/{out['keys_expected']}, "
          f"duplicates {out['duplicates']}, missing {len(out['missing'])}, {out['seconds']} s")
    assert out["ok"]
    landed = [k for k in out["kills"] if k["landed"] and not k["error"]]
    # at least one crash must land mid-job for the run to mean anything; on an idle machine the
    # job can finish before the later seeded moments (the 20-run figure is benchmarks/chaos.py)
    assert len(landed) >= 1, out["kills"]
    assert out["keys_found"] == out["keys_expected"] == out["rows"] == len(reference)
    assert out["duplicates"] == 0 and out["missing"] == [] and out["extra"] == []
    assert out["status_differences"] == []
