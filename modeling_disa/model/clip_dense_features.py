"""Dense CLIP image features: CAT-Seg's modified last ViT block and the mid-layer guidance taps.

CLIP's last block is replaced (at run time, with the *same* weights) by a "dense" block that skips token mixing:
each token becomes ``out_proj(v_proj(LN1(x)))`` plus a residual, then the usual MLP; ``post_layernorm`` and the
visual projection are applied to every token. This gives per-patch embeddings in CLIP's joint image-text space.
The query and key projections of the last block are never used.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import CLIPModel
from transformers.utils import ModelOutput


@dataclass
class DenseCLIPFeatures(ModelOutput):
    """
    Args:
        image_embeds (`torch.FloatTensor` of shape `(B, C, h, w)`):
            Projected dense patch embeddings (not normalised); CAT-Seg's ``res3``.
        guidance_features (`tuple(torch.FloatTensor)`, each `(B, V, h, w)` (V = vision_hidden_size)):
            Raw residual-stream outputs of the blocks in `config.guidance_layers` (CLS dropped).
        dense_tokens (`torch.FloatTensor` of shape `(B, N, V)`):
            The dense tokens after `post_layernorm`, before the visual projection (the keys/values of SDM).
        last_hidden_state (`torch.FloatTensor` of shape `(B, 1 + N, V)`):
            Output of the dense last block (residual stream, before `post_layernorm`).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, with `output_hidden_states`): CLIP's convention,
            `num_hidden_layers + 1` tensors `(B, 1 + N, V)`: the embeddings (after
            `pre_layrnorm`), then the output of every block, the last one being the dense block.
        attentions (`tuple(torch.FloatTensor)`, *optional*, with `output_attentions`): the attention weights
            `(B, heads, 1 + N, 1 + N)` of every block that mixes tokens, i.e. all but the dense
            last one (`num_hidden_layers - 1` tensors). Needs eager attention in the vision tower.
    """

    image_embeds: torch.FloatTensor | None = None
    guidance_features: tuple[torch.FloatTensor, ...] | None = None
    dense_tokens: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def _tokens_to_map(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """`(B, 1 + N, V)` -> `(B, V, h, w)` (square grid), dropping the CLS token."""
    batch, _, dim = tokens.shape
    return tokens[:, 1:].transpose(1, 2).reshape(batch, dim, grid, grid)


def dense_clip_features(
    clip: CLIPModel,
    pixel_values: torch.Tensor,
    clip_resolution: int,
    guidance_layers: list[int],
    dense_residual: str = "cls",
    output_hidden_states: bool = False,
    output_attentions: bool = False,
) -> DenseCLIPFeatures:
    """
    Run CLIP's vision tower in CAT-Seg's dense mode.

    Args:
        clip: the `CLIPModel` holding the vision tower and `visual_projection`.
        pixel_values (`(B, 3, H, W)`): CLIP-normalised images; bilinearly resized to `clip_resolution`.
        clip_resolution: CLIP input side (position embeddings are interpolated bicubically when it differs from
            the checkpoint's `image_size`, as CAT-Seg does for ViT-B/16 at 384).
        guidance_layers: 0-based blocks whose outputs are returned as guidance.
        dense_residual: `"cls"` adds the CLS input state to every token (CAT-Seg CVPR'24); `"token"` keeps each
            token's own residual (CAT-Seg v1).
        output_hidden_states / output_attentions: also return the tower's hidden states / attention weights (see
            `DenseCLIPFeatures`).
    """
    if pixel_values.shape[-2:] != (clip_resolution, clip_resolution):
        pixel_values = F.interpolate(
            pixel_values, size=(clip_resolution, clip_resolution), mode="bilinear", align_corners=False
        )
    vision = clip.vision_model
    grid = clip_resolution // vision.config.patch_size

    hidden = vision.embeddings(pixel_values, interpolate_pos_encoding=True)
    hidden = vision.pre_layrnorm(hidden)
    taps = {}
    states = [hidden] if output_hidden_states else None
    attentions = [] if output_attentions else None
    *blocks, last = vision.encoder.layers
    hooks = []
    if output_attentions:
        # CLIPAttention returns (output, weights) and CLIPEncoderLayer drops the weights; transformers records them
        # with a hook on CLIPAttention too (`CLIPPreTrainedModel._can_record_outputs`).
        hooks = [
            block.self_attn.register_forward_hook(lambda _m, _i, out: attentions.append(out[1])) for block in blocks
        ]
    try:
        for index, block in enumerate(blocks):
            hidden = block(hidden, None)
            if index in guidance_layers:
                taps[index] = hidden
            if states is not None:
                states.append(hidden)
    finally:
        for hook in hooks:
            hook.remove()

    residual = hidden[:, :1] if dense_residual == "cls" else hidden
    attn = last.self_attn
    hidden = attn.out_proj(attn.v_proj(last.layer_norm1(hidden))) + residual
    hidden = hidden + last.mlp(last.layer_norm2(hidden))
    if states is not None:
        states.append(hidden)
    tokens = vision.post_layernorm(hidden)
    projected = clip.visual_projection(tokens)

    return DenseCLIPFeatures(
        image_embeds=_tokens_to_map(projected, grid),
        dense_tokens=tokens[:, 1:],
        guidance_features=tuple(_tokens_to_map(taps[i], grid) for i in guidance_layers),
        last_hidden_state=hidden,
        hidden_states=tuple(states) if states is not None else None,
        attentions=tuple(attentions) if attentions is not None else None,
    )
