"""benchmarks/paper_scale_speed.py end to end at tiny shapes on CPU (slow): training-step rows of both families (FLOPs
counted by FlopCounterMode), generation rows through benchmarks/generation_fps.py, JSON and markdown written."""

from __future__ import annotations

import json
import sys

import pytest

from halfbody.utils.hydra import REPO_ROOT


@pytest.mark.slow
def test_paper_scale_speed_script_at_tiny_shapes(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import paper_scale_speed

    out = tmp_path / "speed.json"
    result = paper_scale_speed.main(["--size", "tiny", "--device", "cpu", "--batch", "1", "--gen-steps", "1",
                                     "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["training"] == result["training"] and saved["device"].startswith("CPU")
    assert [r["experiment"] for r in saved["training"]] == list(paper_scale_speed.TRAIN_EXPERIMENTS)
    for row in saved["training"]:
        assert row["seconds_per_step"] > 0 and row["tflops_per_step"] > 0 and row["trainable_params"] > 0
    assert {(r["family"], r["variant"]) for r in saved["generation"]} == {
        ("echomimic_v2", "release"), ("echomimic_v2", "release_acc"), ("mirrorme", "euler")}
    assert all(r["fps"] > 0 and r["steps"] == 1 for r in saved["generation"])
    md = out.with_suffix(".md").read_text()
    assert "| apdh_stage1 | initial_pose |" in md and "| mirrorme | euler |" in md


def test_peak_flops_table_matches_device_names():
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import paper_scale_speed

    assert paper_scale_speed.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert paper_scale_speed.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert paper_scale_speed.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert paper_scale_speed.peak_tflops("NVIDIA H200") == 989.0
    assert paper_scale_speed.peak_tflops("CPU") is None
