"""`transformers.Trainer` end to end on the tiny preset: a few training steps, `evaluate` with a `compute_metrics`
built on the package's `evaluate` mIoU module, `predict`; results checked against direct model calls and a NumPy
confusion matrix."""

import os

import numpy as np
import pytest
import torch
from tiny_configs import tiny_config, tiny_variant

os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")

from transformers import Trainer, TrainingArguments  # noqa: E402

from modeling_disa import DiSaForOpenVocabSegmentation  # noqa: E402

METRIC_DIR = os.path.join(os.path.dirname(__file__), "..", "modeling_disa", "evaluation", "disa_mean_iou")
IGNORE = 255


def tiny_dataset(num_images, num_classes, label_size, seed):
    """In-memory examples: random images and class-id maps at the logits' resolution with some ignored pixels."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(num_images):
        labels = torch.randint(0, num_classes, (label_size, label_size), generator=generator)
        labels[torch.rand(label_size, label_size, generator=generator) < 0.1] = IGNORE
        examples.append({"pixel_values": torch.randn(3, 128, 128, generator=generator), "labels": labels})
    return examples


def collate(examples):
    return {key: torch.stack([example[key] for example in examples]) for key in examples[0]}


def training_arguments(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_steps=2,
        learning_rate=1e-3,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def reference_mean_iou(pred_maps, label_maps, num_classes):
    """mIoU over the classes present in the ground truth or the predictions (the `mean_iou` rule) from a bincount
    confusion matrix."""
    pred, label = np.concatenate([p.ravel() for p in pred_maps]), np.concatenate([g.ravel() for g in label_maps])
    keep = label != IGNORE
    cm = np.bincount(label[keep] * num_classes + pred[keep], minlength=num_classes**2).reshape(num_classes, -1)
    tp, union = np.diag(cm), cm.sum(0) + cm.sum(1) - np.diag(cm)
    return float(np.mean(tp[union > 0] / union[union > 0]))


def direct_outputs(model, dataset, batch_size):
    """Eval-mode model calls batch by batch: logits, ITM logits (or None) and the sample-weighted mean loss."""
    model.eval()
    logits, itm, loss_sum = [], [], 0.0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collate(dataset[start : start + batch_size])
            out = model(**batch)
            logits.append(out.logits)
            itm.append(out.itm_logits)
            loss_sum += out.loss.item() * len(batch["labels"])
    itm = torch.cat(itm).numpy() if itm[0] is not None else None
    return torch.cat(logits).numpy(), itm, loss_sum / len(dataset)


@pytest.fixture(scope="module")
def mean_iou_metric():
    import evaluate

    return evaluate.load(METRIC_DIR)


def test_trainer_trains_evaluates_and_predicts_on_the_tiny_preset(tmp_path, mean_iou_metric):
    config = tiny_config()
    num_classes = config.num_labels
    torch.manual_seed(0)
    model = DiSaForOpenVocabSegmentation(config)
    label_size = 4 * config.grid_size
    train_set = tiny_dataset(4, num_classes, label_size, seed=1)
    eval_set = tiny_dataset(3, num_classes, label_size, seed=2)  # 3: the last batch is smaller
    seen = {}

    def compute_metrics(eval_pred):
        seen["predictions"], seen["label_ids"] = eval_pred.predictions, eval_pred.label_ids
        pred_maps = list(np.argmax(eval_pred.predictions, axis=1))
        result = mean_iou_metric.compute(
            predictions=pred_maps, references=list(eval_pred.label_ids), num_labels=num_classes, ignore_index=IGNORE
        )
        return {"mean_iou": float(result["mean_iou"])}

    trainer = Trainer(
        model=model,
        args=training_arguments(tmp_path),
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collate,
        compute_metrics=compute_metrics,
    )
    # Trainer finds the label argument from forward's signature and reads the loss from the output
    assert trainer.label_names == ["labels"]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = trainer.train()
    assert result.global_step == 2 and np.isfinite(result.training_loss)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable  # frozen CLIP weights stay as they were
    assert any(name.startswith("clip.") for name in changed) and any(not n.startswith("clip.") for n in changed)

    metrics = trainer.evaluate()
    logits, _, loss = direct_outputs(model, eval_set, batch_size=2)
    labels = np.stack([example["labels"].numpy() for example in eval_set])
    # the predictions are the logits alone, one per eval image, not a tuple with per-vocabulary outputs
    assert isinstance(seen["predictions"], np.ndarray) and seen["predictions"].shape == logits.shape
    np.testing.assert_allclose(seen["predictions"], logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(seen["label_ids"], labels)
    assert metrics["eval_mean_iou"] == pytest.approx(reference_mean_iou(logits.argmax(1), labels, num_classes))
    assert metrics["eval_loss"] == pytest.approx(loss, rel=1e-5)

    prediction = trainer.predict(eval_set)
    assert isinstance(prediction.predictions, np.ndarray)
    np.testing.assert_allclose(prediction.predictions, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(prediction.label_ids, labels)
    # without labels: predictions only
    unlabelled = [{"pixel_values": example["pixel_values"]} for example in eval_set]
    prediction = trainer.predict(unlabelled)
    assert prediction.label_ids is None and prediction.metrics.get("test_loss") is None
    np.testing.assert_allclose(prediction.predictions, logits, rtol=1e-5, atol=1e-5)


def test_trainer_predict_with_sdm_and_a_class_cap_returns_per_image_outputs(tmp_path):
    # SDM adds the per-image class-presence logits; a vocabulary above the class cap adds `class_indices`
    config = tiny_variant("disa-vit-b-16", class_cap=4)
    assert config.use_sdm and config.num_labels > config.class_cap
    torch.manual_seed(0)
    model = DiSaForOpenVocabSegmentation(config).eval()
    eval_set = tiny_dataset(3, config.num_labels, 4 * config.grid_size, seed=3)
    trainer = Trainer(model=model, args=training_arguments(tmp_path), data_collator=collate)
    prediction = trainer.predict(eval_set)
    logits, itm_logits, loss = direct_outputs(model, eval_set, batch_size=2)
    assert isinstance(prediction.predictions, tuple) and len(prediction.predictions) == 2
    np.testing.assert_allclose(prediction.predictions[0], logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(prediction.predictions[1], itm_logits, rtol=1e-5, atol=1e-5)
    assert prediction.metrics["test_loss"] == pytest.approx(loss, rel=1e-5)
