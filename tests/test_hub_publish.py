"""Publishing round trip against the loopback Hub stub (tests/hub_stub.py), model card rendering, bad input."""

import json
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import yaml
from hub_stub import HubStub
from safetensors.torch import load as load_safetensors
from test_pipelines import LABELS, assert_same_segments, make_image, reference_segments
from transformers import AutoModel, AutoProcessor, pipeline

from modeling_disa import PIPELINE_TASK, DiSaForOpenVocabSegmentation, DiSaOpenVocabSegmentationPipeline, DiSaProcessor
from modeling_disa.hub import load_eval_results, publish_to_hub, render_model_card, save_for_hub

REPO_ID = "tester/disa-tiny"
EVAL = {"ade150": {"mIoU": 12.5, "mAcc": 20.25, "per_class_iou": {"wall": 1.0}}, "pc59": {"mIoU": 30.0}}
TOKEN = "stub-token"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running stub, with huggingface_hub pointed at it (online) and a throwaway cache."""
    import huggingface_hub
    import transformers.utils.hub as transformers_hub
    from huggingface_hub import constants

    stub = HubStub().start()
    url = stub.url
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", url)
    monkeypatch.setattr(transformers_hub, "_hf_api", None)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    try:
        yield stub
    finally:
        stub.stop()


def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n", 2)[1])


def test_publish_uploads_a_complete_repo(hub, tiny_model, tiny_processor):
    info = publish_to_hub(tiny_model, tiny_processor, REPO_ID, EVAL, token=TOKEN)
    assert info.oid == hub.repos[REPO_ID].sha
    files = hub.files(REPO_ID)
    expected = {
        "README.md",
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "configuration_disa.py",
        "modeling_disa.py",
        "image_processing_disa.py",
        "processing_disa.py",
        "pipeline_disa.py",
    }
    assert expected <= set(files), expected - set(files)
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    # the weights went through the git-LFS path of the stub
    assert any(method == "PUT" and path.startswith("/lfs-upload/") for method, path in hub.requests)

    stored = load_safetensors(files["model.safetensors"])
    state = tiny_model.state_dict()
    assert stored.keys() == state.keys() and all(torch.equal(stored[k], state[k]) for k in state)

    config = json.loads(files["config.json"])
    assert config["auto_map"]["AutoModel"] == "modeling_disa.DiSaForOpenVocabSegmentation"
    assert config["auto_map"]["AutoModelForSemanticSegmentation"] == "modeling_disa.DiSaForOpenVocabSegmentation"
    assert config["auto_map"]["AutoConfig"] == "configuration_disa.DiSaConfig"
    assert config["custom_pipelines"] == {
        PIPELINE_TASK: {
            "impl": "pipeline_disa.DiSaOpenVocabSegmentationPipeline",
            "pt": ["AutoModel"],
            "type": "multimodal",
        }
    }
    assert not hasattr(tiny_model.config, "custom_pipelines")  # the caller's config is left as it was
    processor_config = json.loads(files["processor_config.json"])
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_disa.DiSaProcessor"

    readme = files["README.md"].decode()
    meta = front_matter(readme)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-segmentation"
    assert "coco-stuff" in meta["datasets"] and "mean_iou" in meta["metrics"]
    (index,) = meta["model-index"]
    assert index["name"] == "disa-tiny"
    values = {(r["dataset"]["type"], m["name"]): m["value"] for r in index["results"] for m in r["metrics"]}
    assert values == {("ade150", "mIoU"): 12.5, ("ade150", "mAcc"): 20.25, ("pc59", "mIoU"): 30.0}
    assert all(r["task"]["type"] == "image-segmentation" for r in index["results"])
    body = readme.split("---\n", 2)[2]
    assert f'AutoModel.from_pretrained("{REPO_ID}")' in body
    assert "| ADE20K-150 | 12.5 | 20.2 |" in body or "| ADE20K-150 | 12.5 | 20.3 |" in body
    assert "{model_name}" not in body and "{repo_id}" not in body and "{eval_results}" not in body
    assert '"A photo of a {} in the scene"' in body  # other braces are not placeholders


def test_round_trip_from_the_stub_equals_the_local_model(hub, tiny_model, tiny_processor, tmp_path):
    publish_to_hub(tiny_model, tiny_processor, REPO_ID, token=TOKEN)
    publish_to_hub(tiny_model, tiny_processor, REPO_ID, EVAL, token=TOKEN)  # second push: repo exists (409 path)
    assert len(hub.repos[REPO_ID].commits) == 3

    model = AutoModel.from_pretrained(REPO_ID, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(REPO_ID, trust_remote_code=True)
    assert isinstance(model, DiSaForOpenVocabSegmentation) and isinstance(processor, DiSaProcessor)
    image = make_image(7)
    remote_inputs = processor(images=image, text=LABELS)
    local_inputs = tiny_processor(images=image, text=LABELS)
    assert remote_inputs.keys() == local_inputs.keys()
    assert remote_inputs.pop("prompt_templates") == local_inputs.pop("prompt_templates")  # a list of strings
    assert all(torch.equal(remote_inputs[k], local_inputs[k]) for k in local_inputs)
    with torch.no_grad():
        assert torch.equal(model(**remote_inputs).logits, tiny_model(**local_inputs).logits)

    segmenter = pipeline(
        PIPELINE_TASK, model=REPO_ID, pipeline_class=DiSaOpenVocabSegmentationPipeline, trust_remote_code=True
    )
    assert_same_segments(
        segmenter(image, candidate_labels=LABELS), reference_segments(tiny_model, tiny_processor, image, LABELS), image
    )
    builtin = pipeline("image-segmentation", model=REPO_ID, trust_remote_code=True)
    assert_same_segments(
        builtin(image), reference_segments(tiny_model, tiny_processor, image), image, check_scores=False
    )
    assert not any(path.startswith("/api/models/") and "commit" in path for m, path in hub.unhandled)


def test_remote_code_from_the_stub_in_a_fresh_process(hub, tiny_model, tiny_processor, tmp_path):
    publish_to_hub(tiny_model, tiny_processor, REPO_ID, EVAL, token=TOKEN)
    image = make_image(8)
    image.save(tmp_path / "img.png")
    inputs = tiny_processor(images=image, text=LABELS)
    with torch.no_grad():
        logits = tiny_model(**inputs).logits
    ov = reference_segments(tiny_model, tiny_processor, image, LABELS)
    torch.save(
        {
            "logits": logits,
            "input_ids": inputs["input_ids"],
            "ov": {k: (torch.from_numpy(m), s) for k, (m, s) in ov.items()},
        },
        tmp_path / "expected.pt",
    )
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["modeling_disa"] = None
        import numpy as np, torch
        from PIL import Image
        from transformers import AutoModel, AutoProcessor, pipeline
        repo, labels = {REPO_ID!r}, {LABELS!r}
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        image = Image.open({str(tmp_path / "img.png")!r})
        model = AutoModel.from_pretrained(repo, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        inputs = processor(images=image, text=labels)
        assert torch.equal(inputs["input_ids"], expected["input_ids"])
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, expected["logits"], rtol=0, atol=1e-6)
        segmenter = pipeline("{PIPELINE_TASK}", model=repo, trust_remote_code=True)
        got = {{e["label"]: e for e in segmenter(image, candidate_labels=labels)}}
        assert set(got) == set(expected["ov"]), (set(got), set(expected["ov"]))
        for label, (mask, score) in expected["ov"].items():
            assert np.array_equal(np.asarray(got[label]["mask"]) > 127, mask.numpy()), label
            assert abs(got[label]["score"] - score) < 1e-5
        print("OK", type(segmenter).__module__)
        """
    )
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "PATH": "/usr/bin:/bin",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }  # same float rounding as the expected logits
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "OK transformers_modules" in result.stdout


def test_missing_repo_and_missing_files_give_clear_errors(hub, tiny_model, tmp_path):
    start = time.monotonic()
    with pytest.raises(OSError, match="tester/nope"):
        AutoModel.from_pretrained("tester/nope", trust_remote_code=True)
    folder = tmp_path / "partial"
    tiny_model.save_pretrained(folder)
    hub.add_repo("tester/no-weights", {"config.json": (folder / "config.json").read_bytes()})
    with pytest.raises(OSError, match="model.safetensors|pytorch_model.bin"):
        AutoModel.from_pretrained("tester/no-weights")
    assert time.monotonic() - start < 60


def test_offline_mode_errors_do_not_hang(tiny_model, tiny_processor):
    start = time.monotonic()
    with pytest.raises(OSError):
        AutoModel.from_pretrained("tester/definitely-not-cached")
    with pytest.raises(OSError):
        pipeline(PIPELINE_TASK, model="tester/definitely-not-cached", trust_remote_code=True)
    with pytest.raises(RuntimeError, match="offline"):
        publish_to_hub(tiny_model, tiny_processor, REPO_ID, token=TOKEN)
    assert time.monotonic() - start < 30


def test_save_for_hub_and_card_rendering(tiny_model, tiny_processor, tmp_path):
    results_file = tmp_path / "results.json"
    results_file.write_text(
        json.dumps(
            {"results": [{"dataset": "voc20", "mIoU": 93.7, "pAcc": 97.0}, {"benchmark": "my-set", "mean_iou": 41.0}]}
        )
    )
    folder = save_for_hub(
        tiny_model,
        tiny_processor,
        tmp_path / "repo",
        repo_id="org/x",
        eval_results=results_file,
        base_model="openai/clip-vit-base-patch16",
        datasets=["org/coco-stuff-171"],
    )
    meta = front_matter((folder / "README.md").read_text())
    assert meta["base_model"] == "openai/clip-vit-base-patch16"
    assert meta["datasets"] == ["coco-stuff", "org/coco-stuff-171"]
    results = meta["model-index"][0]["results"]
    got = {(r["dataset"]["name"], m["type"]): m["value"] for r in results for m in r["metrics"]}
    assert got == {
        ("Pascal VOC-20", "mean_iou"): 93.7,
        ("Pascal VOC-20", "accuracy"): 97.0,
        ("my-set", "mean_iou"): 41.0,
    }
    voc = next(r for r in results if r["dataset"]["type"] == "voc20")
    assert voc["dataset"]["split"] == "validation" and voc["dataset"]["config"] == "voc20"

    card = render_model_card("org/x")
    assert card.data.eval_results is None and "model-index" not in str(card)
    assert "No evaluation results" in card.text

    template = tmp_path / "card.md"
    template.write_text("---\nlicense: apache-2.0\n---\n# {model_name} at {repo_id}\n{eval_results}\n{other}\n")
    card = render_model_card("org/y", {"ade847": 11.0}, template=template)
    assert card.text.startswith("# y at org/y\n| dataset | mIoU |") and "{other}" in card.text
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "image-segmentation"


def test_unreadable_dataset_definition_is_an_error_not_a_bare_name(tmp_path, monkeypatch):
    """A name without a definition is published as given; a definition that exists but cannot be read is an error
    (it would otherwise publish a known dataset without its display name, config and split)."""
    from modeling_disa.hub import eval_results_to_model_index

    (tmp_path / "ade150.json").write_text('{"name": "ade150", ')  # truncated
    monkeypatch.setenv("DISA_DATASET_DEFINITIONS_DIR", str(tmp_path))
    (entry,) = eval_results_to_model_index({"my-set": {"mIoU": 1.0}})
    assert entry.dataset_name == "my-set" and entry.dataset_split is None
    with pytest.raises(json.JSONDecodeError):
        eval_results_to_model_index({"ade150": {"mIoU": 1.0}})


@pytest.mark.parametrize(
    "results, error",
    [({"ade150": {"per_class_iou": {"a": 1.0}}}, ValueError), ([{"mIoU": 3.0}], ValueError), (3.0, TypeError)],
)
def test_bad_eval_results(results, error):
    with pytest.raises(error):
        load_eval_results(results)


def test_bad_publish_arguments(hub, tiny_model, tiny_processor):
    with pytest.raises(ValueError, match="org/name"):
        publish_to_hub(tiny_model, tiny_processor, "no-slash", token=TOKEN)
    with pytest.raises(TypeError, match="DiSaProcessor"):
        publish_to_hub(tiny_model, tiny_processor.image_processor, REPO_ID, token=TOKEN)
    with pytest.raises(FileNotFoundError):
        publish_to_hub(tiny_model, tiny_processor, REPO_ID, "missing-results.json", token=TOKEN)
    assert REPO_ID not in hub.repos  # nothing was created before the checks


def test_standard_push_to_hub_uploads_the_complete_repo(hub, tiny_model, tiny_processor, tmp_path, monkeypatch):
    """`model.push_to_hub` / `save_pretrained(push_to_hub=True)`, transformers' own entry points, give the same
    complete repository as `publish_to_hub`: pipeline declared, its code, a DiSa model card."""
    tiny_model.add_model_tags(["my-tag"])
    tiny_model.push_to_hub(REPO_ID, processor=tiny_processor, token=TOKEN, commit_message="standard push")
    files = hub.files(REPO_ID)
    assert {
        "README.md",
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "modeling_disa.py",
        "pipeline_disa.py",
    } <= set(files)
    config = json.loads(files["config.json"])
    assert PIPELINE_TASK in config["custom_pipelines"]
    card = files["README.md"].decode()
    meta = front_matter(card)
    assert meta["pipeline_tag"] == "image-segmentation" and meta["library_name"] == "transformers"
    assert {"open-vocabulary-segmentation", "my-tag"} <= set(meta["tags"])
    assert "automatically generated" not in card  # not transformers' placeholder card
    from transformers.pipelines import PIPELINE_REGISTRY

    # importing the repo's pipeline_disa.py registers its class for the task: restore the package's afterwards
    tasks = PIPELINE_REGISTRY.supported_tasks
    monkeypatch.setitem(tasks, PIPELINE_TASK, tasks[PIPELINE_TASK])
    segmenter = pipeline(model=REPO_ID, trust_remote_code=True)
    assert type(segmenter).__module__.startswith("transformers_modules")
    image = make_image(11)
    assert_same_segments(
        segmenter(image, candidate_labels=LABELS), reference_segments(tiny_model, tiny_processor, image, LABELS), image
    )

    # save_pretrained(push_to_hub=True) goes the same way; without a processor it says what is missing
    with pytest.warns(UserWarning, match="without a processor"):
        tiny_model.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="tester/model-only", token=TOKEN)
    assert (tmp_path / "local" / "model.safetensors").is_file()
    files = hub.files("tester/model-only")
    assert {"README.md", "config.json", "model.safetensors", "pipeline_disa.py"} <= set(files)
    assert "processor_config.json" not in files
    assert PIPELINE_TASK in json.loads(files["config.json"])["custom_pipelines"]
