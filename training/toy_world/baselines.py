"""Baselines of the toy world that need no training of the segmentation head."""

from __future__ import annotations

from .clip_pretraining import clip_features


def dense_clip_logits(clip_model, pixel_values, input_ids, attention_mask, clip_resolution: int):
    """Untrained dense-CLIP baseline: cosine cost volume between CAT-Seg's dense CLIP patch embeddings and the
    class prompt embeddings, no trained head. -> (batch, T, grid, grid)."""
    import torch

    from modeling_disa.model import cosine_cost_volume, dense_clip_features

    with torch.no_grad():
        features = dense_clip_features(clip_model, pixel_values, clip_resolution, [], "cls")
        text = clip_features(clip_model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
        text = text.view(-1, 1, text.shape[-1]).unsqueeze(0).expand(pixel_values.shape[0], -1, -1, -1)
        return cosine_cost_volume(features.image_embeds, text).mean(1)
