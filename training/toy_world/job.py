"""The toy-world job behind the default `accelerate launch training/train.py` (recipe
`configuration/training/toy_world.yaml`, `dataset_name: toy-world`):

  1. prepare: generate the procedural world as a `save_to_disk` DatasetDict and pretrain (or load) the tiny CLIP,
     both cached by a hash of their settings (`toy_world`);
  2. train DiSa on the seen classes with the ordinary training loop (`train_fn`, i.e. `train.train`);
  3. train the same head in CAT-Seg mode (use_sdm / use_hrm off, preset `toy_world.catseg_preset`): on a CPU with
     threads to share, in a spawned process beside step 2, half the threads each (`side_by_side_possible`);
  4. report: on the test split (all 24 classes, seen + unseen), mIoU over seen / unseen / stuff / things classes for
     DiSa, CAT-Seg mode, the untrained dense-CLIP baseline (argmax of the cosine cost volume of the toy CLIP) and
     the majority-class baseline; the pipeline on a sample image -> overlay PNG, SDM saliency -> saliency PNG;
     `toy_world_results.json` / `.md` and a printed table, with DiSa's SDM split statistics on the validation split
     and its split guard warnings (from its training run).

Settings live in the recipe's `toy_world` mapping (keys of `DEFAULTS`; `clip` holds `ClipSettings` fields). One
training process (plus CAT-Seg mode's beside it): the toy job is sized for a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
import torch

DEFAULTS = {
    "seed": 0,
    "image_size": 64,
    "num_train": 2000,
    "num_validation": 64,
    "num_test": 300,
    "cache_dir": None,  # default ~/.cache/disa/toy_world (or $DISA_TOY_CACHE)
    # Share of stuff regions that the CLIP pretraining captions name (things are always named): 1.0 = unbiased
    # world; < 1 = foreground-biased, like web captions that name the objects and rarely the wall or the floor.
    "stuff_caption_rate": 1.0,
    # Share of the captions leaving a stuff region unnamed that say the things are "on a background" (so the toy CLIP
    # knows the word the PAS-20b analog prompts); 0 = the worlds as they were. Needs stuff_caption_rate < 1.
    "background_caption_rate": 0.0,
    "clip": {},  # ClipSettings overrides
    "compare_catseg": True,
    "catseg_preset": "configuration/models/catseg-toy",
    "sample_index": 0,  # test image used for the pipeline / saliency pictures
    "eval_batch_size": 32,
}


def settings_from_recipe(r) -> dict:
    values = dict(DEFAULTS)
    values.update(r.toy_world or {})
    unknown = sorted(set(values) - set(DEFAULTS))
    if unknown:
        raise SystemExit(f"unknown toy_world setting(s) {unknown}; known: {sorted(DEFAULTS)}")
    # the caption rates define the world: one place each, not a toy_world value silently replaced by a clip one
    doubled = sorted({"stuff_caption_rate", "background_caption_rate"} & set(values["clip"] or {}))
    if doubled:
        raise SystemExit(f"set {doubled} in the toy_world mapping itself, not in toy_world.clip")
    return values


def prepare(r, repo_path=lambda p: p):
    """-> (recipe pointing at the generated dataset and the cached toy CLIP, info dict)."""
    import toy_world as W

    s = settings_from_recipe(r)
    cache = s["cache_dir"] or W.default_cache_root()
    world = W.WorldSettings(
        seed=s["seed"],
        image_size=s["image_size"],
        num_train=s["num_train"],
        num_validation=s["num_validation"],
        num_test=s["num_test"],
    )
    clip_values = {
        "seed": s["seed"],
        "image_size": s["image_size"],
        "stuff_caption_rate": s["stuff_caption_rate"],
        "background_caption_rate": s["background_caption_rate"],
        **(s["clip"] or {}),
    }
    clip = W.ClipSettings(**clip_values)
    t0 = time.perf_counter()
    world_dir = W.ensure_world_dataset(world, cache)
    t1 = time.perf_counter()
    clip_dir = W.ensure_toy_clip(clip, cache)
    t2 = time.perf_counter()
    with open(os.path.join(clip_dir, "toy_clip_pretraining.json")) as fh:
        clip_info = json.load(fh)
    print(
        f"[toy world] dataset {world_dir} ({t1 - t0:.1f}s); toy CLIP {clip_dir} ({t2 - t1:.1f}s, pretraining "
        f"loss {clip_info['first_loss']:.3f} -> {clip_info['final_loss']:.3f}, zero-shot stuff accuracy "
        f"{clip_info['zero_shot_accuracy']})",
        flush=True,
    )
    prepared = dataclasses.replace(
        r,
        dataset_name=world_dir,
        # a saved model (continued training, the upgrade path) brings its own CLIP
        clip_model_name_or_path=None if r.model_name_or_path else clip_dir,
        class_names_feature="classes",
        validation_split=r.validation_split or "validation",
    )
    info = {
        "world_dir": world_dir,
        "clip_dir": clip_dir,
        "world_settings": dataclasses.asdict(world),
        "clip_settings": dataclasses.asdict(clip),
        "clip_pretraining": clip_info,
        "prepare_seconds": {"world": round(t1 - t0, 1), "clip": round(t2 - t1, 1)},
    }
    return prepared, s, info


def run(r, train_fn, repo_path=lambda p: p, cpu_threads: dict | None = None) -> dict:
    start = time.perf_counter()
    prepared, s, info = prepare(r, repo_path)
    timings = dict(info["prepare_seconds"])

    runs = {"DiSa": prepared.output_dir}
    catseg = None
    if s["compare_catseg"]:
        catseg = dataclasses.replace(
            prepared,
            model_preset=s["catseg_preset"],
            model_name_or_path=None,
            output_dir=os.path.join(prepared.output_dir, "catseg-mode"),
            overwrite_output_dir=True,
            # CAT-Seg mode has no foreground split: the DiSa run's split-guard settings do not apply to it
            **{f.name: f.default for f in dataclasses.fields(prepared) if f.name.startswith("split_guard_")},
        )
        runs["CAT-Seg mode"] = catseg.output_dir
    threads = torch.get_num_threads()
    side_by_side = catseg is not None and side_by_side_possible(threads, prepared)
    t = time.perf_counter()
    if side_by_side:
        # The toy model's small matrices do not scale across threads, so the two trainings share the cores instead,
        # one process each: the same runs as one after the other, each on fewer threads.
        helper = TrainingProcess(train_fn, catseg, threads // 2, os.path.join(catseg.output_dir, "training.log"))
        print(
            f"[toy world] training DiSa (SDM + HRM, {threads - threads // 2} thread(s)) and beside it CAT-Seg mode "
            f"(SDM / HRM off, {threads // 2} thread(s), log {helper.log_path}) on the seen classes",
            flush=True,
        )
        torch.set_num_threads(threads - threads // 2)
        try:
            disa_train = train_fn(prepared)
        except BaseException:
            helper.stop()
            raise
        finally:
            torch.set_num_threads(threads)
        timings["train_disa"] = round(time.perf_counter() - t, 1)
        timings["train_catseg"] = helper.wait()
    else:
        print("[toy world] training DiSa (SDM + HRM) on the seen classes", flush=True)
        disa_train = train_fn(prepared)
        timings["train_disa"] = round(time.perf_counter() - t, 1)
        if catseg is not None:
            print("[toy world] training CAT-Seg mode (SDM / HRM off) on the seen classes", flush=True)
            train_fn(catseg)
            timings["train_catseg"] = round(time.perf_counter() - t - timings["train_disa"], 1)
    timings["trainings"] = round(time.perf_counter() - t, 1)  # wall time of both, side by side or not
    timings["trainings_side_by_side"] = side_by_side

    t = time.perf_counter()
    report = make_report(prepared, s, info, runs)
    timings["report"] = round(time.perf_counter() - t, 1)
    timings["total"] = round(time.perf_counter() - start, 1)
    report["timings_seconds"] = timings
    if cpu_threads is not None:
        report["cpu_threads"] = cpu_threads  # the timings depend on it
    report["disa_training"] = {k: v for k, v in disa_train.items() if k != "eval_per_class_iou"}
    report["split_markdown"] = split_markdown(disa_train)
    write_report(prepared.output_dir, report)
    print(report["table_markdown"] + report["split_markdown"], flush=True)
    print(
        f"[toy world] done in {timings['total']:.0f}s; results in {prepared.output_dir}/toy_world_results.json",
        flush=True,
    )
    return report


def side_by_side_possible(threads: int, disa_recipe) -> bool:
    """Whether CAT-Seg mode can train beside DiSa: one training process, on the CPU, with at least two torch threads
    to share (on a GPU, or across several processes, the trainings run one after the other). And DiSa's run must
    accept an output_dir that holds files (overwriting or resuming): CAT-Seg mode writes into its `catseg-mode/`
    while DiSa's run starts, which a run without either refuses as another run's."""
    single = int(os.environ.get("WORLD_SIZE", "1")) == 1
    accepts_files = bool(disa_recipe.overwrite_output_dir or disa_recipe.resume_from_checkpoint)
    return threads >= 2 and single and not torch.cuda.is_available() and accepts_files


class TrainingProcess:
    """`train_fn(recipe)` in a spawned process on `threads` torch threads, its output written to `log_path`."""

    def __init__(self, train_fn, recipe, threads: int, log_path: str):
        import multiprocessing

        self.log_path = log_path
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        context = multiprocessing.get_context("spawn")  # not fork: this process already runs torch's thread pool
        self.receiver, sender = context.Pipe(duplex=False)
        self.process = context.Process(target=_train_in_process, args=(train_fn, recipe, threads, log_path, sender))
        self.process.start()
        sender.close()

    def wait(self) -> float:
        """-> the training's own wall time (s); a failed training raises with the end of its log."""
        self.process.join()
        try:
            seconds = self.receiver.recv()
        except EOFError:  # the process ended without sending its time
            seconds = None
        if self.process.exitcode != 0 or seconds is None:
            with open(self.log_path, errors="replace") as fh:
                tail = fh.read()[-3000:]
            raise RuntimeError(
                f"the CAT-Seg-mode training beside DiSa's failed (exit code {self.process.exitcode}); the end of its "
                f"log {self.log_path}:\n{tail}"
            )
        return round(seconds, 1)

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
        self.process.join()


def _train_in_process(train_fn, recipe, threads: int, log_path: str, sender) -> None:
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    torch.set_num_threads(threads)
    start = time.perf_counter()
    train_fn(recipe)
    sender.send(time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------- evaluation
def _load_test(world_dir: str):
    import datasets

    test = datasets.load_from_disk(world_dir)["test"]
    images = np.stack([np.asarray(im.convert("RGB")) for im in test["image"]])
    labels = np.stack([np.asarray(lab) for lab in test["label"]]).astype(np.int64)
    return test, images, labels


def _train_majority_class(world_dir: str) -> int:
    """Most frequent labelled class of the training split, as a global class id."""
    import datasets

    import toy_world as W

    train = datasets.load_from_disk(world_dir)["train"]
    counts = np.zeros(len(W.SEEN_IDS), np.int64)
    for lab in train["label"]:
        a = np.asarray(lab)
        counts += np.bincount(a[a < len(W.SEEN_IDS)].ravel(), minlength=len(W.SEEN_IDS))
    return int(W.SEEN_IDS[int(counts.argmax())])


def _predict(fn, images: np.ndarray, batch_size: int, size: int) -> np.ndarray:
    from toy_world import normalize_images

    preds = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            logits = fn(normalize_images(images[i : i + batch_size])).float()
            logits = torch.nn.functional.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
            preds.append(logits.argmax(1).numpy())
    return np.concatenate(preds)


def subset_scores(pred: np.ndarray, labels: np.ndarray) -> dict:
    """mIoU (%) over the classes present in the test ground truth, for all / seen / unseen / stuff / things classes,
    pixel accuracy, and the harmonic mean of seen and unseen mIoU (the usual generalised zero-shot summary)."""
    import toy_world as W
    from modeling_disa.evaluation.metrics import SegmentationConfusionMatrix

    cm = SegmentationConfusionMatrix(len(W.CLASS_NAMES), ignore_index=255, device="cpu")
    cm.update(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(labels))
    res = cm.compute(rule="present_in_gt")
    iou = np.asarray(res["per_category_iou"].tolist(), dtype=np.float64) * 100

    def mean(ids):
        vals = [iou[i] for i in ids if iou[i] == iou[i]]
        return float(np.mean(vals)) if vals else float("nan")

    out = {
        "mIoU": mean(range(len(W.CLASS_NAMES))),
        "seen": mean(W.SEEN_IDS),
        "unseen": mean(W.UNSEEN_IDS),
        "stuff": mean(W.STUFF_IDS),
        "things": mean(W.THING_IDS),
        "unseen_stuff": mean([i for i in W.UNSEEN_IDS if i in W.STUFF_IDS]),
        "unseen_things": mean([i for i in W.UNSEEN_IDS if i in W.THING_IDS]),
        "pixel_accuracy": float(res["pixel_accuracy"]) * 100,
    }
    out["harmonic"] = (
        2 * out["seen"] * out["unseen"] / (out["seen"] + out["unseen"]) if out["seen"] + out["unseen"] > 0 else 0.0
    )
    out["per_class_iou"] = {
        W.CLASS_NAMES[i]: (None if iou[i] != iou[i] else float(iou[i])) for i in range(len(W.CLASS_NAMES))
    }
    return out


def make_report(r, s, info, runs: dict) -> dict:
    from transformers import CLIPModel

    import toy_world as W
    from modeling_disa import DiSaForOpenVocabSegmentation, DiSaProcessor

    test, images, labels = _load_test(info["world_dir"])
    size = labels.shape[-1]
    bs = int(s["eval_batch_size"])
    processor = DiSaProcessor.from_pretrained(r.output_dir)
    text = processor(text=list(W.CLASS_NAMES), return_tensors="pt")
    text = {"input_ids": text["input_ids"], "attention_mask": text.get("attention_mask")}
    results, models = {}, {}
    for name, folder in runs.items():
        model = DiSaForOpenVocabSegmentation.from_pretrained(folder).eval()
        models[name] = model
        with torch.no_grad():  # the vocabulary is encoded once for all test batches
            embeds = model.get_text_embeddings(text["input_ids"], text["attention_mask"])
        pred = _predict(lambda pv, m=model, e=embeds: m(pixel_values=pv, text_embeds=e).logits, images, bs, size)
        results[name] = subset_scores(pred, labels)
    clip = CLIPModel.from_pretrained(info["clip_dir"]).eval()
    clip_res = models["DiSa"].config.clip_resolution
    pred = _predict(
        lambda pv: W.dense_clip_logits(clip, pv, text["input_ids"], text["attention_mask"], clip_res), images, bs, size
    )
    results["dense CLIP (untrained head)"] = subset_scores(pred, labels)
    majority = _train_majority_class(info["world_dir"])
    results[f"majority class ({W.CLASS_NAMES[majority]})"] = subset_scores(np.full_like(labels, majority), labels)

    pictures = make_pictures(r.output_dir, test, images, models["DiSa"], processor, int(s["sample_index"]))
    table = results_table(results, len(images))
    return {
        "results": results,
        "pictures": pictures,
        "table_markdown": table,
        "class_names": W.CLASS_NAMES,
        "seen_classes": W.SEEN_NAMES,
        "unseen_classes": [W.CLASS_NAMES[i] for i in W.UNSEEN_IDS],
        "num_test_images": len(images),
        "toy_world": info,
        "runs": runs,
    }


def make_pictures(output_dir, test, images, model, processor, index: int) -> dict:
    """The saved model through the open-vocabulary pipeline on one test image -> overlay PNG; the SDM saliency and
    foreground masks of the same image -> saliency PNG."""
    from PIL import Image
    from transformers import pipeline

    import toy_world as W
    from modeling_disa import PIPELINE_TASK
    from modeling_disa.visualize import overlay_segmentation, render_saliency, segmentation_from_pipeline

    index = index % len(images)
    image = Image.fromarray(images[index]).resize((256, 256), Image.NEAREST)
    sample_path = os.path.join(output_dir, "sample_image.png")
    image.save(sample_path)
    # the loaded model and processor (the package's pipeline class): with push_to_hub the folder's config declares
    # the pipeline for the Hub, which `pipeline(model=<folder>)` would only load as remote code
    segmenter = pipeline(PIPELINE_TASK, model=model, processor=processor, device="cpu")
    result = segmenter(image, candidate_labels=list(W.CLASS_NAMES))
    seg, seg_labels = segmentation_from_pipeline(result)
    overlay_path = os.path.join(output_dir, "sample_overlay.png")
    overlay_segmentation(image, seg, seg_labels).save(overlay_path)
    out = {
        "sample_image": sample_path,
        "overlay": overlay_path,
        "sample_classes": [W.CLASS_NAMES[c] for c in test[index]["classes"]],
        "pipeline_labels": [r["label"] for r in result],
    }
    if model.config.use_sdm:
        inputs = processor(images=image, text=list(W.CLASS_NAMES), return_tensors="pt")
        with torch.no_grad():
            o = model(
                pixel_values=inputs["pixel_values"],
                input_ids=inputs["input_ids"],
                attention_mask=inputs.get("attention_mask"),
                output_saliency=True,
            )
        present = [W.CLASS_NAMES.index(n) for n in out["sample_classes"]]
        saliency_path = os.path.join(output_dir, "sample_saliency.png")
        render_saliency(image, o.saliency[0], o.foreground_mask[0], labels=list(W.CLASS_NAMES), classes=present).save(
            saliency_path
        )
        out["saliency"] = saliency_path
    return out


def results_table(results: dict, num_images: int) -> str:
    cols = [
        ("mIoU", "all"),
        ("seen", "seen"),
        ("unseen", "unseen"),
        ("harmonic", "h-mean"),
        ("stuff", "stuff"),
        ("things", "things"),
        ("unseen_stuff", "unseen stuff"),
        ("unseen_things", "unseen things"),
    ]
    lines = [
        f"Toy world test split: {num_images} images, 24 classes (16 seen, 8 unseen; 12 stuff, 12 things), "
        "mIoU % over the classes present in the ground truth",
        "",
        "| model | " + " | ".join(c[1] for c in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for name, res in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{res[k]:.1f}" for k, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def split_markdown(training_results: dict) -> str:
    """DiSa's SDM split at the end of its training run, from the run's results (`train.py`'s all_results): the split
    statistics of the validation split and the split guard's warnings. Empty for a run without them (no SDM, or no
    validation split)."""
    if "split_guard_warnings" not in training_results or "eval_split/num_images" not in training_results:
        return ""

    def value(name):
        v = training_results[f"eval_split/{name}"]
        return "n/a" if v is None else f"{v:.2f}"

    last = training_results["split_guard_last_warning"]
    guard = f"{training_results['split_guard_warnings']} split guard warning(s)" + (
        f", the last at step {last['step']} ({last['source']}): {last['statistic']} = {last['value']:.2f} < "
        f"{last['threshold']}"
        if last
        else ""
    )
    return (
        f"\nDiSa's SDM split on the validation split ({training_results['eval_split/num_images']} images) after "
        f"training; {guard}\n\n"
        "| mean presence p, present / absent classes | present classes with k > 0 | foreground tokens on their "
        "own class | grid share marked foreground, present / all classes |\n|---|---|---|---|\n"
        f"| {value('presence_present')} / {value('presence_absent')} | {value('present_with_foreground')} | "
        f"{value('foreground_precision')} | {value('foreground_grid_share')} / "
        f"{value('foreground_grid_share_all')} |\n"
    )


def write_report(output_dir: str, report: dict) -> None:
    with open(os.path.join(output_dir, "toy_world_results.json"), "w") as fh:
        json.dump(report, fh, indent=1, default=str)
    with open(os.path.join(output_dir, "toy_world_results.md"), "w") as fh:
        fh.write(report["table_markdown"])
        fh.write(report.get("split_markdown", ""))
        fh.write("\nTimings (s): " + json.dumps(report.get("timings_seconds", {})) + "\n")
        if "cpu_threads" in report:
            fh.write("CPU threads: " + json.dumps(report["cpu_threads"]) + "\n")
