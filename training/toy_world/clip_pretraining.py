"""Contrastive pretraining of the toy world's tiny CLIP: a `transformers` `CLIPModel` (ViT 64 px / patch 8, 64-wide
towers) trained with CLIP's own contrastive loss on freshly generated image-caption pairs of *all* concepts (as real
CLIP saw the web), saved with its tokenizer as a normal CLIP checkpoint, and its image-level zero-shot accuracy."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .scenes import (
    CLASS_NAMES,
    DEFAULT_SEED,
    STUFF_IDS,
    THING_IDS,
    VOCAB,
    WORLD_VERSION,
    caption_for,
    render_scene,
    split_rng,
)
from .tokenizer import build_tokenizer, world_words


@dataclass
class ClipSettings:
    seed: int = DEFAULT_SEED
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 64
    vision_layers: int = 4
    text_layers: int = 3
    projection_dim: int = 64
    steps: int = 800
    batch_size: int = 128
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.05
    max_things: int = 2
    # Probability that a caption names a stuff region present in its image (things are always named): 1.0 is the
    # unbiased world, < 1 the foreground-biased one whose CLIP under-learns stuff, as web-pretrained CLIP does.
    stuff_caption_rate: float = 1.0
    # Probability that a caption leaving a stuff region unnamed says its things are "on a background" (`caption_for`):
    # 0 keeps the existing worlds; > 0 teaches the word the PAS-20b analog prompts. Needs stuff_caption_rate < 1.
    background_caption_rate: float = 0.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not 0.0 <= self.background_caption_rate <= 1.0:
            raise ValueError(f"background_caption_rate must lie in [0, 1], got {self.background_caption_rate}.")
        if self.background_caption_rate > 0 and self.stuff_caption_rate >= 1.0:
            raise ValueError(
                f"background_caption_rate={self.background_caption_rate} has no effect with stuff_caption_rate="
                f"{self.stuff_caption_rate}: every stuff region is named, so no caption says 'on a background'. "
                "Set stuff_caption_rate below 1 (a foreground-biased world) or background_caption_rate to 0."
            )

    def key(self) -> str:
        words = world_words()
        values = asdict(self)
        # settings at their defaults stay out of the key, so the worlds made before they existed keep their caches
        if values["stuff_caption_rate"] == 1.0:
            del values["stuff_caption_rate"]
        if values["background_caption_rate"] == 0.0:
            del values["background_caption_rate"]
        blob = json.dumps(
            {"clip": values, "words": words, "vocab": CLASS_NAMES, "version": WORLD_VERSION}, sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def clip_config(settings: ClipSettings, tokenizer):
    from transformers import CLIPConfig

    h = settings.hidden_size
    return CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=h,
            intermediate_size=4 * h,
            num_hidden_layers=settings.text_layers,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            projection_dim=settings.projection_dim,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=h,
            intermediate_size=4 * h,
            num_hidden_layers=settings.vision_layers,
            num_attention_heads=4,
            image_size=settings.image_size,
            patch_size=settings.patch_size,
            projection_dim=settings.projection_dim,
        ),
        projection_dim=settings.projection_dim,
    )


@functools.cache
def _image_processor(patch_size: int):
    from modeling_disa.model import DiSaImageProcessor

    # The model's own preprocessing (rescale by 1/255, OpenAI CLIP mean/std from transformers), without resizing:
    # the world renders images at the CLIP's input size.
    return DiSaImageProcessor(do_resize=False, patch_size=patch_size)


def normalize_images(images: np.ndarray, patch_size: int = 8):
    """uint8 (B, H, W, 3) -> CLIP-normalised float32 tensor (B, 3, H, W), through `DiSaImageProcessor`."""
    return _image_processor(patch_size)(images=np.ascontiguousarray(images), return_tensors="pt")["pixel_values"]


def pretraining_batch(
    rng: np.random.Generator,
    batch_size: int,
    image_size: int,
    max_things: int = 2,
    stuff_caption_rate: float = 1.0,
    background_caption_rate: float = 0.0,
):
    """Image-caption pairs of every concept (seen and unseen): a quarter single-stuff images, the rest scenes. A
    pair whose caption would name nothing (a stuff-only image whose stuff went unnamed) is redrawn. The caption
    rates are `caption_for`'s."""
    all_ids = list(range(len(CLASS_NAMES)))
    images, captions = [], []
    while len(images) < batch_size:
        kind = rng.random()
        img, _, present = render_scene(
            rng, all_ids, image_size, max_things=0 if kind < 0.25 else max_things, single_stuff_prob=0.5
        )
        caption = caption_for(rng, present, stuff_caption_rate, background_caption_rate)
        if caption is not None:
            images.append(img)
            captions.append(caption)
    return np.stack(images), captions


def pretraining_batches(settings: ClipSettings):
    """The pretraining loop's batches as a `torch` iterable dataset: `(pixel_values, input_ids, attention_mask)` per
    step, drawn in order from the one pretraining stream (`split_rng(seed, "clip")`), so a single `DataLoader` worker
    yields exactly the batches that the loop would draw itself."""
    import torch

    class PretrainingBatches(torch.utils.data.IterableDataset):
        def __iter__(self):
            rng = split_rng(settings.seed, "clip")
            tokenizer = build_tokenizer()
            for _ in range(settings.steps):
                images, captions = pretraining_batch(
                    rng,
                    settings.batch_size,
                    settings.image_size,
                    settings.max_things,
                    settings.stuff_caption_rate,
                    settings.background_caption_rate,
                )
                text = tokenizer(captions, padding=True, return_tensors="pt")
                yield normalize_images(images, settings.patch_size), text["input_ids"], text["attention_mask"]

    return PretrainingBatches()


def pretrain_clip(
    settings: ClipSettings, output_dir: str, progress: bool = True, data_worker: bool | None = None
) -> dict:
    """Train the tiny CLIP with `CLIPModel(..., return_loss=True)` on freshly generated pairs and save it (model +
    tokenizer) to `output_dir`. Returns a summary (losses, zero-shot accuracy on single-stuff images, seconds).

    `data_worker`: draw the batches in one `DataLoader` worker process while the model trains (rendering, captions
    and tokenising take about a third of a step on a CPU); the batches, and so the model, are the same either way.
    None: a worker when torch computes on at least 2 threads, and then torch computes on one thread fewer, leaving a
    core to the worker."""
    import torch
    from tqdm.auto import tqdm
    from transformers import CLIPModel, get_scheduler

    start = time.perf_counter()
    threads = torch.get_num_threads()
    if data_worker is None:
        data_worker = threads >= 2
    # the worker process starts here, before this process builds anything it would copy
    batches = iter(
        torch.utils.data.DataLoader(pretraining_batches(settings), batch_size=None, num_workers=int(data_worker))
    )
    if data_worker and threads >= 2:
        torch.set_num_threads(threads - 1)
    try:
        torch.manual_seed(settings.seed)
        tokenizer = build_tokenizer()
        model = CLIPModel(clip_config(settings, tokenizer))
        model.train()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
        )
        scheduler = get_scheduler(
            "cosine", optimizer, num_warmup_steps=settings.warmup_steps, num_training_steps=settings.steps
        )
        losses = []
        bar = tqdm(range(settings.steps), desc="toy CLIP pretraining", disable=not progress)
        for step in bar:
            pixel_values, input_ids, attention_mask = next(batches)
            out = model(
                pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, return_loss=True
            )
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(out.loss.item())
            if step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    finally:
        torch.set_num_threads(threads)
        del batches  # stops the worker
    model.eval()
    summary = {
        "steps": settings.steps,
        "first_loss": float(np.mean(losses[:20])),
        "final_loss": float(np.mean(losses[-50:])),
        "seconds": round(time.perf_counter() - start, 1),
        "data_worker": data_worker,
        "zero_shot_accuracy": clip_zero_shot_accuracy(model, tokenizer, settings),
    }
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    with open(os.path.join(output_dir, "toy_clip_pretraining.json"), "w") as fh:
        json.dump({"settings": asdict(settings), **summary}, fh, indent=1)
    return summary


def clip_features(out):
    """`get_text_features` / `get_image_features` return a tensor (transformers 4) or an output whose
    `pooler_output` holds the projected features (transformers 5)."""
    return out if hasattr(out, "norm") else out.pooler_output


def clip_zero_shot_accuracy(model, tokenizer, settings: ClipSettings, num: int = 96) -> dict:
    """Image-level zero-shot classification with the prompt "a photo of {name}": single-stuff images (one stuff
    filling the image) among the 12 stuff names, and single-thing images (one thing on a stuff of another colour)
    among the 12 thing names; seen and unseen classes. The stuff / thing gap measures the world's foreground bias."""
    import torch

    rng = np.random.default_rng([settings.seed, 99])
    stuff_ids = [int(c) for c in rng.choice(STUFF_IDS, size=num)]
    stuff_images = [render_scene(rng, [c], settings.image_size, max_things=0)[0] for c in stuff_ids]
    thing_ids, thing_images = [], []
    thing_rng = np.random.default_rng([settings.seed, 98])  # its own stream: the stuff figures stay comparable
    for c in thing_rng.choice(THING_IDS, size=num):
        ground = [s for s in STUFF_IDS if VOCAB["colors"][s] != VOCAB["colors"][c]]
        img, _, present = render_scene(
            thing_rng,
            [int(thing_rng.choice(ground)), int(c)],
            settings.image_size,
            max_things=1,
            single_stuff_prob=1.0,
        )
        if int(c) in present:
            thing_ids.append(int(c))
            thing_images.append(img)

    def accuracy(ids, images, pool):
        with torch.no_grad():
            text = tokenizer([f"a photo of {CLASS_NAMES[c]}" for c in pool], padding=True, return_tensors="pt")
            t = torch.nn.functional.normalize(clip_features(model.get_text_features(**text)), dim=-1)
            pixels = normalize_images(np.stack(images), settings.patch_size)
            v = torch.nn.functional.normalize(clip_features(model.get_image_features(pixel_values=pixels)), dim=-1)
            pred = (v @ t.T).argmax(-1).numpy()
        correct = np.array([pool[p] == c for p, c in zip(pred, ids)])
        seen = np.array([VOCAB["seen"][c] for c in ids])
        return float(correct.mean()), float(correct[seen].mean()), float(correct[~seen].mean())

    out = {}
    for kind, ids, images, pool in (
        ("stuff", stuff_ids, stuff_images, STUFF_IDS),
        ("things", thing_ids, thing_images, THING_IDS),
    ):
        out[f"{kind}_all"], out[f"{kind}_seen"], out[f"{kind}_unseen"] = accuracy(ids, images, pool)
    return out
