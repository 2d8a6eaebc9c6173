"""The demo Space (space/app.py): the Gradio app launched on 127.0.0.1 and driven with gradio_client and with a real
headless Chromium (selenium), its model resolution and messages, and publishing the Space to the loopback Hub stub.

The model is the tiny preset with SDM switched on and random weights, saved to a temporary folder (or the folder in
`$DISA_DEMO_TEST_MODEL`, e.g. `runs/toy-world`). References come from the `open-vocabulary-segmentation` pipeline
loaded separately from that folder. `$DISA_DEMO_SCREENSHOT` names a file to receive a (palette-compressed) copy of
the browser test's screenshot.
"""

import ast
import importlib.util
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hub_stub import repo_key
from PIL import Image
from test_hub_publish import TOKEN, front_matter, hub  # noqa: F401 - `hub` is the loopback-stub fixture

import toy_world as world
from modeling_disa import PIPELINE_TASK, DiSaConfig, DiSaForOpenVocabSegmentation, DiSaProcessor

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "space"
LABELS = ["red stripes", "blue circle", "green dots", "yellow noise", "red square"]
BROWSER_TIMEOUT = 30  # seconds per wait step


def load_app():
    spec = importlib.util.spec_from_file_location("disa_space_app", SPACE / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def app():
    return load_app()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_path):
    if os.environ.get("DISA_DEMO_TEST_MODEL"):
        return Path(os.environ["DISA_DEMO_TEST_MODEL"])
    folder = tmp_path_factory.mktemp("demo-model")
    torch.manual_seed(0)
    model = DiSaForOpenVocabSegmentation(DiSaConfig.from_pretrained(tiny_path, use_sdm=True)).eval()
    processor = DiSaProcessor.from_pretrained(tiny_path)
    model.set_default_vocabulary(world.CLASS_NAMES[:6], processor.tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(model_dir):
    """The pipeline as a user builds it, independent of the app's instance."""
    from transformers import pipeline

    return pipeline(PIPELINE_TASK, model=str(model_dir))


@pytest.fixture(scope="module")
def served(app, model_dir, tmp_path_factory):
    """The app on 127.0.0.1 (a free port), launched with its own settings."""
    root = tmp_path_factory.mktemp("served")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(root / "gradio"))
        patch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        segmenter = app.load_segmenter(str(model_dir))
        examples, example_world = app.load_examples()
        origin = "$DISA_DEMO_TEST_MODEL" if os.environ.get("DISA_DEMO_TEST_MODEL") else "the test"
        demo = app.build_demo(segmenter, str(model_dir), origin, examples, example_world)
        demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, **app.launch_options())
        try:
            yield {"url": demo.local_url, "segmenter": segmenter, "examples": examples, "root": root}
        finally:
            demo.close()


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served["url"], verbose=False, download_files=str(served["root"] / "client"))


def request(client, image, labels, mode="whole image", saliency=True):
    from gradio_client import handle_file

    return client.predict(
        handle_file(str(image)) if image is not None else None, labels, mode, saliency, api_name="/segment"
    )


def pipeline_masks(reference, image_path, labels, mode="whole", saliency=False):
    result = reference(
        Image.open(image_path).convert("RGB"), candidate_labels=labels, inference_mode=mode, output_saliency=saliency
    )
    return result, {entry["label"]: np.asarray(entry["mask"]) > 127 for entry in result}


# ---------------------------------------------------------------------------------------------------- over HTTP
@pytest.mark.parametrize("mode, pipeline_mode", [("whole image", "whole"), ("sliding window", "sliding")])
def test_request_returns_the_pipelines_masks_legend_and_saliency(client, served, reference, mode, pipeline_mode):
    image = served["examples"][0]
    overlay, legend, gallery, timing = request(client, image, ", ".join(LABELS), mode)
    result, expected = pipeline_masks(reference, image, LABELS, pipeline_mode)

    annotations = overlay["value"]["annotations"]
    assert [a["label"] for a in annotations] == [entry["label"] for entry in result]
    for annotation in annotations:
        rgba = np.asarray(Image.open(annotation["image"]))
        assert rgba.shape[:2] == expected[annotation["label"]].shape  # at the input image's size
        np.testing.assert_array_equal(rgba[..., 3] > 127, expected[annotation["label"]])
    assert set(overlay["color_map"]) == set(LABELS)

    rows = {row[0]: row[1:] for row in legend["data"]}
    assert legend["headers"] == ["class", "pixels %", "mean score"] and set(rows) == set(expected)
    for entry in result:
        share, score = rows[entry["label"]]
        assert float(share) == pytest.approx(100 * expected[entry["label"]].mean(), abs=0.005)
        assert float(score) == pytest.approx(entry["score"], abs=1e-4)
    assert sum(float(share) for share, _ in rows.values()) == pytest.approx(100, abs=0.05)

    assert [item["caption"].split(":")[0] for item in gallery] == [entry["label"] for entry in result]
    assert all(Image.open(item["image"]).size[0] > 0 for item in gallery)
    assert timing.startswith("Pipeline: ") and mode in timing and f"{len(LABELS)} classes" in timing


def test_saliency_panels_are_the_pipelines_maps(app, reference, served):
    from modeling_disa.visualize import render_saliency

    image = served["examples"][1]
    result, _ = pipeline_masks(reference, image, LABELS, saliency=True)
    panels = app.saliency_panels(Image.open(image).convert("RGB"), result)
    small = Image.open(image).convert("RGB")
    small.thumbnail((app.SALIENCY_PANEL_SIZE, app.SALIENCY_PANEL_SIZE))
    for (picture, caption), entry in zip(panels, result, strict=True):
        expected = render_saliency(small, entry["saliency"][None], entry["foreground_mask"][None], [entry["label"]])
        assert caption.startswith(entry["label"]) and np.array_equal(np.asarray(picture), np.asarray(expected))


def test_one_text_encoding_per_request(client, served):
    calls = []
    hook = served["segmenter"].model.clip.text_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        counts = []
        for mode in ("whole image", "sliding window"):
            start = len(calls)
            request(client, served["examples"][2], f"{mode} one, {mode} two, {mode} three", mode)  # new label sets
            counts.append(len(calls) - start)
    finally:
        hook.remove()
    assert counts == [1, 1]


@pytest.mark.parametrize(
    "labels, image, match",
    [
        ("", "example", "at least one class name"),
        (" , ;\n", "example", "at least one class name"),
        ("red stripes, blue circle, Red  Stripes", "example", "repeated: Red Stripes"),
        ("red stripes", "huge", r"2100 x 2100 = 4\.4 megapixels; this demo takes up to 4\.2"),
        ("red stripes", None, "Upload an image"),
        ("red stripes", "tiny", "smaller than one CLIP patch"),
    ],
)
def test_bad_input_gives_a_gradio_error(client, served, labels, image, match):
    from gradio_client.exceptions import AppError

    paths = {"example": served["examples"][0], None: None}
    if image in ("huge", "tiny"):
        side = 2100 if image == "huge" else 4
        paths[image] = served["root"] / f"{image}.png"
        Image.new("RGB", (side, side), (90, 120, 200)).save(paths[image])
    with pytest.raises(AppError, match=match):
        request(client, paths[image], labels)


# ---------------------------------------------------------------------------------------------------- in a browser
def start_chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.fail(
            f"headless Chromium is needed (found browser={binary}, chromedriver={driver}): install the Debian "
            "packages with `apt-get install -y chromium chromium-driver` (.ci/run does)."
        )
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1150",
        "--hide-scrollbars",
    ):
        options.add_argument(argument)
    try:
        return webdriver.Chrome(service=Service(driver), options=options)
    except Exception as error:  # noqa: BLE001 - the test fails with the browser's reason
        pytest.fail(f"headless Chromium ({binary}, {driver}) did not start: {error}")


def test_browser_upload_type_labels_run_and_see_the_overlay(served, reference, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    image = served["examples"][3]
    labels = world.CLASS_NAMES  # the full toy-world vocabulary, unseen classes included
    expected = [entry["label"] for entry in pipeline_masks(reference, image, labels, saliency=True)[0]]
    browser = start_chromium()
    try:
        wait = WebDriverWait(browser, BROWSER_TIMEOUT)
        browser.get(served["url"])
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image input[type=file]"))).send_keys(str(image))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image img")))
        box = browser.find_element(By.CSS_SELECTOR, "#labels textarea")
        box.clear()
        box.send_keys(", ".join(labels))
        browser.find_element(By.CSS_SELECTOR, "#run").click()
        legend = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#overlay .legend-item"))
        assert [item.text for item in legend] == expected
        assert len(browser.find_elements(By.CSS_SELECTOR, "#overlay img.mask")) == len(expected)
        wait.until(lambda b: "Pipeline: " in b.find_element(By.CSS_SELECTOR, "#timing").text)
        table = browser.find_element(By.CSS_SELECTOR, "#legend").text
        assert all(label in table for label in expected)
        time.sleep(0.5)  # let the mask images finish painting before the picture
        screenshot = tmp_path / "space_demo.png"
        assert browser.save_screenshot(str(screenshot))
    finally:
        browser.quit()
    picture = Image.open(screenshot)
    assert picture.width >= 1200 and np.asarray(picture.convert("L")).std() > 10  # a page, not a blank frame
    print(f"screenshot: {screenshot}")
    if os.environ.get("DISA_DEMO_SCREENSHOT"):
        picture.convert("RGB").quantize(colors=96).save(os.environ["DISA_DEMO_SCREENSHOT"], optimize=True)


# ---------------------------------------------------------------------------------------------------- model, inputs
def test_model_source_order_and_the_missing_model_message(app, model_dir, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    recipe = yaml.safe_load((REPO / "configuration" / "training" / "toy_world.yaml").read_text())
    assert Path(recipe["output_dir"]) == app.DEFAULT_JOB_OUTPUT  # the default job's folder
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(app.MODEL_ENV, raising=False)
    monkeypatch.setattr(app, "APP_DIR", tmp_path / "space")  # no checkout around: only the cwd is searched
    readme = tmp_path / "README.md"
    readme.write_text("---\nsdk: gradio\napp_file: app.py\nmodels:\n  - org/linked\n---\n")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(app.ModelNotFoundError) as error:
        app.resolve_model_source(None, readme)
    message = str(error.value)
    assert "accelerate launch training/train.py" in message and str(tmp_path / "runs" / "toy-world") in message
    assert app.main(["--model", str(tmp_path / "nowhere" / "model")]) == 2
    assert app.main([]) == 2
    err = capsys.readouterr().err
    assert "accelerate launch training/train.py" in err and "Traceback" not in err

    shutil.copytree(model_dir, tmp_path / "runs" / "toy-world")
    expected = (str(tmp_path / "runs" / "toy-world"), "the default toy-world job")
    assert app.resolve_model_source(None, readme) == expected
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert app.resolve_model_source(None, readme)[0] == "org/linked"  # online: the Space's linked model
    monkeypatch.setenv(app.MODEL_ENV, "org/from-env")
    assert app.resolve_model_source(None, readme)[0] == "org/from-env"
    assert app.resolve_model_source("org/from-arg", readme)[0] == "org/from-arg"


def test_typed_synonyms_are_separated_as_the_model_reads_them(app):
    # the box promises synonyms after a comma; the model prompts the text before the first ", " (CAT-Seg's rule)
    assert app.parse_labels("building,edifice; sky ,  blue;car") == ["building, edifice", "sky, blue", "car"]
    assert app.parse_labels("a ,b") == ["a", "b"]  # commas separate classes when there is no semicolon


def test_label_parsing_and_default_vocabulary(app, model_dir):
    assert app.parse_labels(" red  stripes,blue circle , ,") == ["red stripes", "blue circle"]
    assert app.parse_labels("building, edifice; sky\ncar") == ["building, edifice", "sky", "car"]
    names = ["cat", "building, edifice"]
    assert app.parse_labels(app.format_labels(names)) == names
    assert app.parse_labels(app.format_labels(world.CLASS_NAMES)) == world.CLASS_NAMES
    config = DiSaConfig.from_pretrained(model_dir)
    assert app.default_vocabulary(config) == [config.id2label[i] for i in range(len(config.id2label))]
    _, example_world = app.load_examples()
    assert app.example_labels(world.CLASS_NAMES[:6], example_world) == app.format_labels(world.CLASS_NAMES)
    assert app.example_labels(names, example_world) == app.format_labels(names)


def test_examples_are_the_committed_toy_world_test_scenes(app, tmp_path):
    """space/examples/ holds what `python training/write_space_examples.py` writes (deterministic): the first
    toy-world test scenes, enlarged by nearest neighbour, and the world's class names."""
    import write_space_examples

    paths, labels = app.load_examples()
    assert labels == world.CLASS_NAMES
    scenes = world.generate_split(world.WorldSettings(), "test", num=len(paths))["image"]
    assert len(paths) == write_space_examples.NUM_EXAMPLES
    for path, scene in zip(paths, scenes, strict=True):
        picture = np.asarray(Image.open(path))
        assert picture.shape == (write_space_examples.EXAMPLE_SIZE, write_space_examples.EXAMPLE_SIZE, 3)
        step = write_space_examples.EXAMPLE_SIZE // scene.shape[0]
        np.testing.assert_array_equal(picture[::step, ::step], scene)  # nearest-neighbour enlargement
    fresh = write_space_examples.write_space_examples(tmp_path / "examples")
    assert [p.name for p in fresh] == [p.name for p in paths]
    for name in [p.name for p in paths] + [app.EXAMPLES_MANIFEST]:
        assert (tmp_path / "examples" / name).read_bytes() == (app.EXAMPLES_DIR / name).read_bytes(), name
    written = sorted(p.name for p in (tmp_path / "examples").iterdir())
    assert written == sorted(p.name for p in app.EXAMPLES_DIR.iterdir())  # nothing else, no leftovers
    assert app.load_examples(tmp_path / "nowhere") == ([], [])
    (tmp_path / "examples" / paths[0].name).unlink()
    with pytest.raises(FileNotFoundError, match="write_space_examples"):
        app.load_examples(tmp_path / "examples")


def test_space_requirements_match_the_package():
    tree = ast.parse((REPO / "setup.py").read_text())
    install = next(
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "INSTALL_REQUIRES"
    )
    lines = [line.strip() for line in (SPACE / "requirements.txt").read_text().splitlines()]
    assert [line for line in lines if line and not line.startswith(("#", "--"))] == ast.literal_eval(install)


# ---------------------------------------------------------------------------------------------------- publishing
def test_space_command_uploads_the_app_to_the_stub(hub, model_dir, tmp_path):  # noqa: F811 - fixture
    from modeling_disa.hub import main

    argv = ["space", "--repo_id", "tester/disa-demo", "--model_repo", "tester/disa-model", "--token", TOKEN]
    with pytest.warns(UserWarning, match="tester/disa-model, which does not exist"):
        assert main(argv) == 0
    space = hub.repos[repo_key("tester/disa-demo", "space")]
    assert space.repo_type == "space" and space.sdk == "gradio" and "tester/disa-demo" not in hub.repos
    files = hub.files("tester/disa-demo", repo_type="space")
    for name in ("app.py", "requirements.txt"):
        assert files[name] == (SPACE / name).read_bytes()
    package = REPO / "modeling_disa"
    assert {name for name in files if name.startswith("modeling_disa/")} == {
        f"modeling_disa/{path.relative_to(package).as_posix()}"
        for path in package.rglob("*")
        if path.suffix in (".py", ".json", ".md") and "__pycache__" not in path.parts
    }
    assert files["modeling_disa/model/pipeline_disa.py"] == (package / "model" / "pipeline_disa.py").read_bytes()
    examples = sorted(f"examples/{p.name}" for p in (SPACE / "examples").iterdir() if p.suffix in (".png", ".json"))
    assert [name for name in files if name.startswith("examples/")] == examples and len(examples) == 5
    assert all(files[name] == (SPACE / name).read_bytes() for name in examples)
    assert not any(name.endswith((".jpg", ".safetensors")) or name == "screenshot.png" for name in files)
    meta = front_matter(files["README.md"].decode())
    assert meta["sdk"] == "gradio" and meta["app_file"] in files and meta["models"] == ["tester/disa-model"]
    assert meta["sdk_version"] and files["README.md"].decode().split("---\n", 2)[2].strip()

    # the model it links (the model-publishing form of the same CLI), then the app as the Space runs it: the model
    # from its README, through the stub
    assert main(["--model_dir", str(model_dir), "--repo_id", "tester/disa-model", "--token", TOKEN]) == 0
    model = DiSaForOpenVocabSegmentation.from_pretrained(model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(argv) == 0
    assert len(space.commits) == 3
    checkout = tmp_path / "space"
    for name, data in hub.files("tester/disa-demo", repo_type="space").items():
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        (checkout / name).write_bytes(data)
    app = load_app()
    source, origin = app.resolve_model_source(None, checkout / "README.md")
    assert (source, origin) == ("tester/disa-model", "the Space's README (models:)")
    segmenter = app.load_segmenter(source)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in segmenter.model.state_dict().items())
    assert not hub.unhandled


def test_space_publishing_refuses_bad_input(hub, tmp_path):  # noqa: F811 - fixture
    from modeling_disa.hub import publish_space, save_space

    with pytest.raises(ValueError, match="model_repo must look like 'org/name'"):
        publish_space("tester/demo", "no-slash", token=TOKEN)
    with pytest.raises(ValueError, match="repo_id must look like 'org/name'"):
        publish_space("demo", "tester/model", token=TOKEN)
    with pytest.raises(FileNotFoundError, match="lacks"):
        save_space(tmp_path / "out", "tester/model", space_dir=tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(SPACE, bad, ignore=shutil.ignore_patterns("examples", "__pycache__"))
    (bad / "README.md").write_text("---\nsdk: docker\napp_file: app.py\n---\n")
    with pytest.raises(ValueError, match="sdk: gradio"):
        save_space(tmp_path / "out", "tester/model", space_dir=bad)
    assert not hub.repos


def test_space_publishing_offline_fails_fast(monkeypatch):
    from huggingface_hub import constants

    from modeling_disa.hub import publish_space

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="offline"):
        publish_space("tester/demo", "tester/model", token=TOKEN)
