import json
from importlib.resources import as_file

import pytest
import torch
from PIL import Image

from modeling_disa import DiSaConfig, DiSaForOpenVocabSegmentation, DiSaProcessor, demo


def test_demo_runs_offline_and_saves_a_folder_that_reloads_to_its_segmentation(tmp_path, capsys):
    labels = ["sky", "grass"]
    summary = demo.main(["--output_dir", str(tmp_path), "--labels", *labels])
    assert json.loads(capsys.readouterr().out)["labels"] == labels
    assert Image.open(tmp_path / "demo_overlay.png").size == (160, 160)

    # the saved weights are the packaged preset's random initialisation at the demo's seed (0), built here
    torch.manual_seed(0)
    with as_file(demo.PRESET) as preset:
        fresh = DiSaForOpenVocabSegmentation(DiSaConfig.from_pretrained(preset)).eval()
    saved = DiSaForOpenVocabSegmentation.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert fresh.state_dict().keys() == saved.state_dict().keys()
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in fresh.state_dict().items())

    # the reported pixel counts are the segmentation of the saved folder, recomputed here
    processor = DiSaProcessor.from_pretrained(tmp_path)
    image = demo.demo_image(0)
    with torch.no_grad():
        outputs = saved(**processor(images=image, text=labels, return_tensors="pt"))
    segmentation = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
    counts = torch.bincount(segmentation.flatten(), minlength=len(labels)).tolist()
    assert summary["pixels_per_label"] == dict(zip(labels, counts))
    assert sum(counts) == 160 * 160


def test_demo_stops_when_the_reloaded_model_differs(tmp_path, monkeypatch):
    """The demo's own reload check can fail: a reload that changes one weight makes it exit with an error."""
    load = demo.AutoModel.from_pretrained

    def altered(*args, **kwargs):
        model = load(*args, **kwargs)
        with torch.no_grad():
            model.decoder.head.bias += 1.0
        return model

    monkeypatch.setattr(demo.AutoModel, "from_pretrained", altered)
    with pytest.raises(SystemExit, match="reloaded model disagrees"):
        demo.main(["--output_dir", str(tmp_path), "--labels", "sky", "grass"])
