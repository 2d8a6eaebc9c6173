"""The offline toy world (the training/toy_world package) and the default training job on it (training/train.py with
configuration/training/toy_world.yaml), shortened: a small world, a few CLIP and DiSa steps."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import toy_world as W

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_vocabulary_split_is_compositional():
    seen, unseen = set(W.SEEN_IDS), set(W.UNSEEN_IDS)
    assert not seen & unseen and len(seen | unseen) == len(W.CLASS_NAMES) == 24
    assert len(unseen) == 8 and set(W.STUFF_IDS) & unseen and set(W.THING_IDS) & unseen
    seen_words = {w for i in W.SEEN_IDS for w in W.CLASS_NAMES[i].split()}
    for i in W.UNSEEN_IDS:  # every unseen class is a new combination of seen words
        assert set(W.CLASS_NAMES[i].split()) <= seen_words


def test_scenes_are_deterministic_and_labels_match_images():
    settings = W.WorldSettings(seed=3, num_train=6, num_validation=2, num_test=6)
    a, b = W.generate_split(settings, "test"), W.generate_split(settings, "test")
    for x, y in zip(a["image"], b["image"]):
        np.testing.assert_array_equal(x, y)
    assert a["caption"] == b["caption"]
    c = W.generate_split(W.WorldSettings(seed=4, num_test=6), "test")
    assert any((x != y).any() for x, y in zip(a["image"], c["image"]))
    for img, lab, cap, classes in zip(a["image"], a["label"], a["caption"], a["classes"]):
        assert img.shape == (64, 64, 3) and lab.shape == (64, 64)
        assert set(np.unique(lab).tolist()) == set(classes)
        for c_id in classes:  # captions mention every class of the image
            assert W.CLASS_NAMES[c_id] in cap
            colour = np.asarray(W.COLORS[W.VOCAB["colors"][c_id]], float)
            pixels = img[lab == c_id].astype(float)
            if W.VOCAB["kinds"][c_id] == "thing":  # solid shapes: the pixels are (noisy) the named colour
                assert np.abs(np.median(pixels, 0) - colour).max() < 20
            else:  # textures: the brightest pixels are the named colour
                assert np.abs(np.percentile(pixels, 95, axis=0) - colour).max() < 40
    train = W.generate_split(settings, "train")
    for lab in train["label"]:  # training labels index the seen vocabulary only
        assert lab.max() < len(W.SEEN_IDS)


def test_dataset_features_and_tokenizer():
    ds = W.build_dataset(W.WorldSettings(seed=0, num_train=4, num_validation=2, num_test=3))
    assert ds["train"].features["classes"].feature.names == W.SEEN_NAMES
    assert ds["test"].features["classes"].feature.names == W.CLASS_NAMES
    tok = W.build_tokenizer()
    for word in W.world_words():
        assert len(tok.tokenize(word)) == 1, word
    ids = tok("A photo of a green triangle in the scene")["input_ids"]
    assert tok.unk_token_id not in ids[1:-1]


def test_normalize_images_is_clip_normalisation_through_the_image_processor():
    """The one preprocessing path (`DiSaImageProcessor`, no resize) gives exactly the float32 arithmetic the toy CLIP
    was pretrained with: x / 255, minus OpenAI CLIP's mean, over its std (committed toy-world results rely on it)."""
    import torch
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    images, _ = W.pretraining_batch(np.random.default_rng(0), 8, 64)
    x = torch.from_numpy(images).float().div_(255).permute(0, 3, 1, 2)
    reference = (x - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    out = W.normalize_images(images)
    assert out.dtype == torch.float32 and out.shape == (8, 3, 64, 64)
    assert torch.equal(out, reference)


def test_default_recipe_is_the_toy_world():
    import train

    r = train.parse_args([])
    assert r.dataset_name == "toy-world" and r.model_preset.endswith("disa-toy") and r.output_dir
    r = train.parse_args(["--toy_world", "{num_train: 32, clip: {batch_size: 16}}"])
    assert r.toy_world["num_train"] == 32 and r.toy_world["num_test"] == 300  # merged into the recipe's mapping
    assert r.toy_world["clip"] == {"steps": 800, "batch_size": 16}


def test_clip_pretraining_is_deterministic(tmp_path):
    import torch
    from safetensors.torch import load_file

    settings = W.ClipSettings(steps=2, batch_size=8, warmup_steps=1)
    for name in ("a", "b"):
        W.pretrain_clip(settings, str(tmp_path / name), progress=False)
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "tokenizer.json").is_file()


def test_clip_pretraining_with_a_data_worker_trains_the_same_model(tmp_path):
    """The batches drawn in a DataLoader worker process are the loop's own: the same weights, bit for bit."""
    import torch
    from safetensors.torch import load_file

    settings = W.ClipSettings(steps=3, batch_size=8, warmup_steps=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # both runs compute on one thread (a worker leaves the others to it)
    try:
        summaries = {
            worker: W.pretrain_clip(settings, str(tmp_path / str(worker)), progress=False, data_worker=worker)
            for worker in (False, True)
        }
    finally:
        torch.set_num_threads(threads)
    assert summaries[True]["data_worker"] and not summaries[False]["data_worker"]
    a, b = (load_file(str(tmp_path / str(worker) / "model.safetensors")) for worker in (False, True))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert summaries[True]["first_loss"] == summaries[False]["first_loss"]

    # and the batches are the pretraining stream's, drawn here step by step
    from toy_world.clip_pretraining import pretraining_batches

    rng, tokenizer = W.split_rng(settings.seed, "clip"), W.build_tokenizer()
    steps = 0
    for pixel_values, input_ids, attention_mask in pretraining_batches(settings):
        images, captions = W.pretraining_batch(
            rng, settings.batch_size, settings.image_size, settings.max_things, settings.stuff_caption_rate
        )
        text = tokenizer(captions, padding=True, return_tensors="pt")
        assert torch.equal(pixel_values, W.normalize_images(images, settings.patch_size))
        assert torch.equal(input_ids, text["input_ids"]) and torch.equal(attention_mask, text["attention_mask"])
        steps += 1
    assert steps == settings.steps


def _failing_training(recipe):
    print("starting the failing training", flush=True)
    raise ValueError(f"bad recipe {recipe!r}")


def test_a_training_beside_another_fails_loudly_with_the_end_of_its_log(tmp_path):
    from toy_world.job import TrainingProcess

    helper = TrainingProcess(_failing_training, "R", 1, str(tmp_path / "catseg-mode" / "training.log"))
    with pytest.raises(RuntimeError, match=r"(?s)exit code 1.*starting the failing training.*bad recipe 'R'"):
        helper.wait()


def test_trainings_side_by_side_only_in_one_cpu_process_with_threads_to_share(monkeypatch):
    import dataclasses

    import torch

    import train
    from toy_world.job import side_by_side_possible

    recipe = train.parse_args([])
    assert recipe.overwrite_output_dir  # the default job's
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert side_by_side_possible(2, recipe) and not side_by_side_possible(1, recipe)
    # a DiSa run that refuses an output_dir holding files would refuse the CAT-Seg run's catseg-mode/
    fresh_only = dataclasses.replace(recipe, overwrite_output_dir=False)
    assert not side_by_side_possible(2, fresh_only)
    assert side_by_side_possible(2, dataclasses.replace(fresh_only, resume_from_checkpoint="latest"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not side_by_side_possible(4, recipe)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not side_by_side_possible(4, recipe)


def test_default_job_shortened(tmp_path):
    """The default job, shortened: artifacts exist and the metrics are finite. Run again on two threads, CAT-Seg mode
    trains beside DiSa, one thread each, and both models are the one-thread run's, bit for bit."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "run"
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=REPO,
        DISA_TOY_CACHE=str(tmp_path / "cache"),
    )
    toy = "{num_train: 16, num_validation: 4, num_test: 8, clip: {steps: 4, batch_size: 16, warmup_steps: 1}}"
    cmd = [
        sys.executable,
        os.path.join(REPO, "training", "train.py"),
        "--output_dir",
        str(out),
        "--max_train_steps",
        "3",
        "--per_device_train_batch_size",
        "4",
        "--toy_world",
        toy,
    ]
    proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for name in (
        "model.safetensors",
        "config.json",
        "processor_config.json",
        "tokenizer.json",
        "sample_overlay.png",
        "sample_saliency.png",
        "toy_world_results.json",
        "toy_world_results.md",
        "catseg-mode/model.safetensors",
    ):
        assert (out / name).is_file(), name
    report = json.loads((out / "toy_world_results.json").read_text())
    assert set(report["results"]) >= {"DiSa", "CAT-Seg mode", "dense CLIP (untrained head)"}
    for res in report["results"].values():
        for key in ("mIoU", "seen", "stuff", "things", "pixel_accuracy"):
            assert math.isfinite(res[key]), (key, res)
    assert "| DiSa |" in proc.stdout
    # the wall time of every stage, and the threads it ran with (OMP_NUM_THREADS=1 above: the user's, kept)
    stages = report["timings_seconds"]
    assert {"world", "clip", "train_disa", "train_catseg", "report", "total"} <= set(stages)
    assert stages["total"] >= stages["train_disa"] + stages["train_catseg"]
    assert report["cpu_threads"]["torch_threads"] == 1 and not report["cpu_threads"]["set_by_train_py"]
    # DiSa's SDM split at the end of its training, on the validation split, with the split guard's count
    assert report["disa_training"]["eval_split/num_images"] == 4
    assert "split_guard_warnings" in report["disa_training"]
    split_section = "DiSa's SDM split on the validation split (4 images)"
    assert split_section in (out / "toy_world_results.md").read_text() and split_section in proc.stdout
    # one cached world and one cached CLIP, under the hash of their settings
    assert len([n for n in os.listdir(tmp_path / "cache") if n.startswith(("clip-", "world-"))]) == 2
    assert not stages["trainings_side_by_side"]

    # two threads (the user's OMP_NUM_THREADS, kept), the cached world and CLIP: the trainings run side by side
    out2 = tmp_path / "run2"
    cmd[cmd.index(str(out))] = str(out2)
    proc = subprocess.run(
        cmd, env={**env, "OMP_NUM_THREADS": "2"}, cwd=str(tmp_path), capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report2 = json.loads((out2 / "toy_world_results.json").read_text())
    stages2 = report2["timings_seconds"]
    assert stages2["trainings_side_by_side"] and report2["cpu_threads"]["torch_threads"] == 2
    assert stages2["trainings"] < stages2["train_disa"] + stages2["train_catseg"]
    assert "beside it CAT-Seg mode" in proc.stdout and "train" in (out2 / "catseg-mode" / "training.log").read_text()
    for name in ("model.safetensors", "catseg-mode/model.safetensors"):
        a, b = load_file(str(out / name)), load_file(str(out2 / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert report2["results"] == report["results"]


def test_foreground_biased_captions_always_name_things_and_sometimes_stuff():
    rng = np.random.default_rng(0)
    stuff = [c for c in W.STUFF_IDS][:2]
    thing = W.THING_IDS[5]
    named_stuff, total = 0, 2000
    for _ in range(total):
        cap = W.caption_for(rng, stuff + [thing], stuff_caption_rate=0.25)
        assert W.CLASS_NAMES[thing] in cap
        named_stuff += sum(W.CLASS_NAMES[c] in cap for c in stuff)
    assert abs(named_stuff / (2 * total) - 0.25) < 0.03
    # a stuff-only image whose stuff goes unnamed has no caption (the pretraining batch redraws it)
    assert W.caption_for(np.random.default_rng(1), stuff[:1], stuff_caption_rate=0.0) is None
    # rate 1.0 draws nothing extra: the unbiased captions are those the world always had
    a, b = np.random.default_rng(7), np.random.default_rng(7)
    assert W.caption_for(a, stuff + [thing]) == W.caption_for(b, stuff + [thing], stuff_caption_rate=1.0)
    images, captions = W.pretraining_batch(np.random.default_rng(2), 16, 64, stuff_caption_rate=0.0)
    assert len(images) == len(captions) == 16
    assert all(not any(W.CLASS_NAMES[c] in cap for c in W.STUFF_IDS) for cap in captions)


def test_stuff_caption_rate_is_part_of_the_clip_cache_key():
    base = W.ClipSettings()
    assert W.ClipSettings(stuff_caption_rate=0.25).key() != base.key()
    assert W.ClipSettings(stuff_caption_rate=1.0).key() == base.key()


def test_dev_split_holds_all_classes_and_differs_from_test():
    settings = W.WorldSettings(seed=0, num_test=40)
    dev, test = W.generate_split(settings, "dev", num=40), W.generate_split(settings, "test")
    assert not any((a == b).all() for a, b in zip(dev["image"], test["image"]))
    present = {c for classes in dev["classes"] for c in classes}
    assert present & set(W.UNSEEN_IDS) and max(present) < len(W.CLASS_NAMES)


def test_background_captions_say_on_a_background_only_where_stuff_goes_unnamed():
    rng = np.random.default_rng(0)
    stuff, thing = W.STUFF_IDS[:2], W.THING_IDS[5]
    unnamed = with_background = 0
    for _ in range(2000):
        cap = W.caption_for(rng, stuff + [thing], stuff_caption_rate=0.25, background_caption_rate=0.5)
        assert W.CLASS_NAMES[thing] in cap
        if all(W.CLASS_NAMES[c] in cap for c in stuff):
            assert "background" not in cap
        else:
            unnamed += 1
            with_background += cap.endswith(" on a background")
    assert abs(with_background / unnamed - 0.5) < 0.04
    # a stuff-only image whose stuff goes unnamed is "a background" instead of being redrawn
    cap = W.caption_for(np.random.default_rng(1), stuff[:1], stuff_caption_rate=0.0, background_caption_rate=1.0)
    assert cap is not None and cap.endswith("a background") and W.CLASS_NAMES[stuff[0]] not in cap
    tok = W.build_tokenizer()
    assert tok.tokenize("a photo of blue circle on a background")[-1] == "background</w>"

    # rate 0 draws nothing extra: the existing worlds' captions (the rule below, written out) are unchanged
    def caption_before_the_option(rng, present, rate):
        present = [c for c in present if W.VOCAB["kinds"][c] == "thing" or rng.random() < rate]
        if not present:
            return None
        names = [W.CLASS_NAMES[c] for c in present]
        names = [names[i] for i in rng.permutation(len(names))]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        return W.CAPTION_TEMPLATES[int(rng.integers(len(W.CAPTION_TEMPLATES)))].format(listed)

    a, b, draw = np.random.default_rng(5), np.random.default_rng(5), np.random.default_rng(6)
    for _ in range(300):
        present = [int(c) for c in draw.choice(24, size=int(draw.integers(1, 5)), replace=False)]
        assert W.caption_for(a, present, 0.25) == caption_before_the_option(b, present, 0.25)
    assert a.random() == b.random()
    images, captions = W.pretraining_batch(np.random.default_rng(5), 64, 64, 2, 0.25, 1.0)
    assert any(c.endswith(" on a background") for c in captions)


def test_background_caption_rate_enters_the_clip_key_only_when_set_and_is_refused_where_it_cannot_act():
    import hashlib
    from dataclasses import asdict

    settings = W.ClipSettings(stuff_caption_rate=0.25)
    # the key of a world made before the setting existed: its fields without it
    values = {k: v for k, v in asdict(settings).items() if k != "background_caption_rate"}
    blob = json.dumps(
        {"clip": values, "words": W.world_words(), "vocab": W.CLASS_NAMES, "version": W.WORLD_VERSION}, sort_keys=True
    )
    assert settings.key() == hashlib.sha256(blob.encode()).hexdigest()[:12]
    assert W.ClipSettings(stuff_caption_rate=0.25, background_caption_rate=0.5).key() != settings.key()
    with pytest.raises(ValueError, match="no effect"):
        W.ClipSettings(background_caption_rate=0.5)  # the unbiased world names every stuff region
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        W.ClipSettings(stuff_caption_rate=0.25, background_caption_rate=1.5)


def test_recipe_background_caption_rate_reaches_the_toy_clip(tmp_path, monkeypatch):
    import dataclasses

    import train
    from toy_world import job

    seen = {}

    def fake_clip(settings, cache_root=None, progress=True):
        seen["clip"] = settings
        folder = tmp_path / "clip"
        folder.mkdir(exist_ok=True)
        (folder / "toy_clip_pretraining.json").write_text(
            json.dumps({"first_loss": 1, "final_loss": 1, "zero_shot_accuracy": {}})
        )
        return str(folder)

    monkeypatch.setattr(W, "ensure_world_dataset", lambda settings, cache_root=None: str(tmp_path / "world"))
    monkeypatch.setattr(W, "ensure_toy_clip", fake_clip)
    r = train.parse_args(["--toy_world", "{stuff_caption_rate: 0.25, background_caption_rate: 0.75}"])
    _, _, info = job.prepare(r)
    assert seen["clip"].background_caption_rate == 0.75 and info["clip_settings"]["background_caption_rate"] == 0.75
    r = dataclasses.replace(r, toy_world={**r.toy_world, "clip": {"background_caption_rate": 0.5}})
    with pytest.raises(SystemExit, match="toy_world mapping itself"):
        job.prepare(r)


def test_pas20b_analog_scores_things_and_background_like_a_direct_iou():
    rng = np.random.default_rng(0)
    labels = rng.choice([*W.STUFF_IDS[:3], *W.THING_IDS[:4], 255], size=(3, 8, 8))
    pred24 = rng.choice(W.STUFF_IDS[:2] + W.THING_IDS[:5], size=labels.shape)
    # the analog's ground truth: each thing keeps its place in THING_IDS, every stuff pixel is "background" (12)
    target = np.full(labels.shape, 255)
    for k, c in enumerate(W.THING_IDS):
        target[labels == c] = k
    target[np.isin(labels, W.STUFF_IDS)] = 12
    assert np.array_equal(W.to_pas20b_ids(labels), target)
    assert W.PAS20B_NAMES[12] == "background" and W.PAS20B_NAMES[:12] == [W.CLASS_NAMES[i] for i in W.THING_IDS]
    folded = W.to_pas20b_ids(pred24)  # CAT-Seg's rule: any stuff name counts as background
    assert set(np.unique(folded[np.isin(pred24, W.STUFF_IDS)])) == {12}
    scores = W.pas20b_scores(folded, labels)
    valid = target != 255
    ious = {}
    for k in np.unique(target[valid]):  # classes present in the ground truth
        inter = ((folded == k) & (target == k) & valid).sum()
        union = (((folded == k) | (target == k)) & valid).sum()
        ious[int(k)] = 100 * inter / union
    assert scores["mIoU"] == pytest.approx(np.mean(list(ious.values())), rel=1e-9)
    assert scores["background"] == pytest.approx(ious[12], rel=1e-9)
    assert scores["things"] == pytest.approx(np.mean([v for k, v in ious.items() if k != 12]), rel=1e-9)
    assert scores["per_class_iou"][W.CLASS_NAMES[W.THING_IDS[6]]] is None  # absent from the ground truth
