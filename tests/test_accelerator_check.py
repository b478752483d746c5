"""The prepared accelerator check, run on CPU at tiny sizes (``--dry_run``) before any device
is lent: every part runs and is recorded, the sharded part on 2 virtual devices."""


def test_every_part_runs_and_is_recorded(accelerator_dry_run):
    record, log = accelerator_dry_run
    parts = record["parts"]
    assert record["dry_run"] and record["code_version"] and record["total_s"] > 0
    assert list(parts) == [
        "device",
        "train_step",
        "agent_axis",
        "cpu_preset_batch",
        "diffusers_peer",
        "sharded",
    ]
    assert parts["device"]["device_count"] == 2 and parts["device"]["backend"] == "cpu"
    assert parts["device"]["peak_from"] == "unknown device: no peak"
    for dtype in ("float32", "bfloat16"):
        step = parts["train_step"][dtype]
        assert step["step_s"] > 0 and step["flops_per_step"] > 0 and step["achieved_tflops"] > 0
        assert step["compile_s"] > 0 and step["share_of_peak"] is None  # no peak for a CPU
    for strategy in ("vmap", "map"):
        axis = parts["agent_axis"][strategy]
        assert axis["strategy"] == strategy and axis["images_per_s"] > 0 and axis["score_s"] > 0
    assert parts["cpu_preset_batch"]["images_per_s"] > 0
    peer = parts["diffusers_peer"]
    assert peer.get("status", "").startswith("skipped") or peer["ratios"]["score_s"] > 0
    assert parts["sharded"]["devices"] == 2 and parts["sharded"]["max_abs_difference"] < 1e-4
    assert "| train_step/bfloat16 | preset=micro" in log and "| sharded | devices=2" in log
