"""Dense CLIP image features: CAT-Seg's modified last ViT block and the mid-layer guidance taps.

CLIP's last block runs (with the *same* weights) as a "dense" block that skips token mixing: each token becomes
``out_proj(v_proj(LN1(x)))`` plus a residual, then the usual MLP; ``post_layernorm`` and the visual projection are
applied to every token. This gives per-patch embeddings in CLIP's joint image-text space. The query and key
projections of the last block are never used.

The vision tower itself runs the dense block (`DenseCLIPEncoderLayer`, selected per call by a keyword argument that
CLIP's encoder passes on to its layers), so CLIP's own output recording (`capture_outputs` with
`CLIPPreTrainedModel._can_record_outputs`) records the hidden states and attention weights of the computation that
is actually used; without that keyword the tower is unchanged CLIP.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import CLIPModel
from transformers.models.clip.modeling_clip import CLIPEncoderLayer, CLIPVisionModel
from transformers.utils import ModelOutput

# Keyword argument that makes the last block of the vision tower run densely; its value is the residual mode.
DENSE_RESIDUAL_KWARG = "disa_dense_residual"
DENSE_RESIDUAL_MODES = ("cls", "token")


class DenseCLIPEncoderLayer(CLIPEncoderLayer):
    """`CLIPEncoderLayer` that, when called with `disa_dense_residual="cls"` or `"token"`, runs CAT-Seg's dense block
    (no token mixing) instead of attention. Same parameters and state-dict keys as `CLIPEncoderLayer`; without the
    keyword it is `CLIPEncoderLayer`."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """
        Args:
            hidden_states (`(B, 1 + N, V)`): the block's input (CLS token first).
            disa_dense_residual (`str`, keyword, *optional*): `"cls"` adds the CLS input state to every token
                (CAT-Seg CVPR'24), `"token"` keeps each token's own residual (CAT-Seg v1); absent or None: CLIP's
                attention block.

        Returns:
            `(B, 1 + N, V)`.
        """
        mode = kwargs.pop(DENSE_RESIDUAL_KWARG, None)
        if mode is None:
            return super().forward(hidden_states, attention_mask, **kwargs)
        if mode not in DENSE_RESIDUAL_MODES:
            raise ValueError(f"dense_residual must be one of {DENSE_RESIDUAL_MODES}, got {mode!r}.")
        residual = hidden_states[:, :1] if mode == "cls" else hidden_states
        attention = self.self_attn
        hidden_states = attention.out_proj(attention.v_proj(self.layer_norm1(hidden_states))) + residual
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


def enable_dense_last_block(vision_model: CLIPVisionModel) -> None:
    """Make the tower's last block a `DenseCLIPEncoderLayer` (idempotent). The module keeps its identity, parameters
    and any hooks already installed on it (transformers installs its output-recording hooks once, on first use), so
    only its class changes; its behaviour without the dense keyword is unchanged."""
    last = vision_model.encoder.layers[-1]
    if isinstance(last, DenseCLIPEncoderLayer):
        return
    if type(last) is not CLIPEncoderLayer:
        raise TypeError(
            f"the last vision block is a {type(last).__name__}, not transformers' CLIPEncoderLayer: CAT-Seg's dense "
            "block is defined for CLIP's layer layout only."
        )
    last.__class__ = DenseCLIPEncoderLayer


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
        pooler_output (`torch.FloatTensor` of shape `(B, V)`): the tower's pooled output, `post_layernorm` of the
            dense last block's CLS token.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, with `output_hidden_states`): CLIP's convention,
            `num_hidden_layers + 1` tensors `(B, 1 + N, V)`: the embeddings (after `pre_layrnorm`), then the output
            of every block, the last one being the dense block. An int or a list of ints selects entries by index
            (the others are None), as in transformers' output recording.
        attentions (`tuple(torch.FloatTensor)`, *optional*, with `output_attentions`): the attention weights
            `(B, heads, 1 + N, 1 + N)` of every block that mixes tokens, i.e. all but the dense last one
            (`num_hidden_layers - 1` tensors), as CLIP's tower records them: empty under an attention implementation
            that computes no weights (SDPA, flash attention; transformers logs a warning), so use
            `attn_implementation="eager"` to get them.
    """

    image_embeds: torch.FloatTensor | None = None
    guidance_features: tuple[torch.FloatTensor, ...] | None = None
    dense_tokens: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor | None, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def _tokens_to_map(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """`(B, 1 + N, V)` -> `(B, V, h, w)` (square grid), dropping the CLS token."""
    batch, _, dim = tokens.shape
    return tokens[:, 1:].transpose(1, 2).reshape(batch, dim, grid, grid)


def _selected_hidden_states(states: tuple, selection) -> tuple | None:
    """The hidden states `output_hidden_states` asks for: all (True), none (False/None), or the entries at the
    given index / indices (negative ones counted from the end), the others None."""
    if selection is None or isinstance(selection, bool):
        return states if selection else None
    indices = [selection] if isinstance(selection, int) else list(selection)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise TypeError(f"output_hidden_states must be a bool, an int or a list of ints, got {selection!r}.")
    count = len(states)
    bad = [i for i in indices if not -count <= i < count]
    if bad:
        raise ValueError(f"output_hidden_states indices {bad} are out of range for {count} hidden states.")
    chosen = {i % count for i in indices}
    return tuple(state if i in chosen else None for i, state in enumerate(states))


def dense_clip_features(
    clip: CLIPModel,
    pixel_values: torch.Tensor,
    clip_resolution: int,
    guidance_layers: list[int],
    dense_residual: str = "cls",
    output_hidden_states: bool | int | list[int] | None = False,
    output_attentions: bool | None = False,
) -> DenseCLIPFeatures:
    """
    Run CLIP's vision tower in CAT-Seg's dense mode.

    Args:
        clip: the `CLIPModel` holding the vision tower and `visual_projection`. Its last vision block is made a
            `DenseCLIPEncoderLayer` (`enable_dense_last_block`; CLIP's behaviour without the dense keyword is
            unchanged).
        pixel_values (`(B, 3, H, W)`): CLIP-normalised images; bilinearly resized to `clip_resolution`.
        clip_resolution: CLIP input side (position embeddings are interpolated bicubically when it differs from
            the checkpoint's `image_size`, as CAT-Seg does for ViT-B/16 at 384).
        guidance_layers: 0-based blocks whose outputs are returned as guidance.
        dense_residual: `"cls"` adds the CLS input state to every token (CAT-Seg CVPR'24); `"token"` keeps each
            token's own residual (CAT-Seg v1).
        output_hidden_states / output_attentions: also return the tower's hidden states / attention weights, as
            CLIP's tower records them (see `DenseCLIPFeatures`).
    """
    if dense_residual not in DENSE_RESIDUAL_MODES:
        raise ValueError(f"dense_residual must be one of {DENSE_RESIDUAL_MODES}, got {dense_residual!r}.")
    if pixel_values.shape[-2:] != (clip_resolution, clip_resolution):
        pixel_values = F.interpolate(
            pixel_values, size=(clip_resolution, clip_resolution), mode="bilinear", align_corners=False
        )
    vision = clip.vision_model
    enable_dense_last_block(vision)
    grid = clip_resolution // vision.config.patch_size

    # The guidance taps are hidden states, so the tower always records them (the tensors exist anyway); only the
    # ones asked for are returned.
    outputs = vision(
        pixel_values=pixel_values,
        interpolate_pos_encoding=True,
        output_hidden_states=True,
        output_attentions=bool(output_attentions),
        return_dict=True,
        **{DENSE_RESIDUAL_KWARG: dense_residual},
    )
    states = outputs.hidden_states
    hidden = outputs.last_hidden_state
    tokens = vision.post_layernorm(hidden)
    projected = clip.visual_projection(tokens)

    return DenseCLIPFeatures(
        image_embeds=_tokens_to_map(projected, grid),
        dense_tokens=tokens[:, 1:],
        # hidden_states[k] is the output of block k - 1
        guidance_features=tuple(_tokens_to_map(states[i + 1], grid) for i in guidance_layers),
        last_hidden_state=hidden,
        pooler_output=outputs.pooler_output,
        hidden_states=_selected_hidden_states(states, output_hidden_states),
        attentions=outputs.attentions if output_attentions else None,
    )
