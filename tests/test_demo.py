import json

from PIL import Image

from modeling_disa import demo


def test_demo_runs_offline_and_reloads_identically(tmp_path, capsys):
    summary = demo.main(["--output_dir", str(tmp_path), "--labels", "sky", "grass"])
    assert summary["reloaded_identical"] is True
    assert sum(summary["pixels_per_label"].values()) == 160 * 160
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "processor_config.json").exists()
    assert Image.open(tmp_path / "demo_overlay.png").size == (160, 160)
    assert json.loads(capsys.readouterr().out)["labels"] == ["sky", "grass"]
