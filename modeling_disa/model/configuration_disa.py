"""Configuration of DiSa (CAT-Seg cost aggregation over CLIP, plus DiSa's SDM and HRM modules).

Every hyper-parameter of the head lives here, so the model code has no magic numbers. Values marked *CAT-Seg*
reproduce the official CAT-Seg (CVPR'24) configs `vitb_384.yaml` / `vitl_336.yaml`; values marked *reconstruction*
are the project's choices where the DiSa paper is not available (see `model_card.md`).
"""

import difflib
import math
from dataclasses import fields

from huggingface_hub.dataclasses import strict
from transformers import CLIPTextConfig, CLIPVisionConfig, PreTrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

DEFAULT_PROMPT_TEMPLATE = "A photo of a {} in the scene"

FUSION_MODES = ("own", "weighted", "sum", "concat")
SALIENCY_SOURCES = ("cost", "gradcam", "attention")
TOPK_MODES = ("fixed", "adaptive")
HRM_STAGES = ("pixel", "category", "channel")
LOSS_IGNORE_MODES = ("catseg", "mask")
DENSE_RESIDUAL_MODES = ("cls", "token")
CLASS_RESIDUAL_MODES = ("catseg", "standard")
CLIP_FINETUNE_MODES = ("qv", "none", "full")

# The literal reading of the paper's SDM, as one documented variant of the shipped one: presence and saliency from an
# image-text-matching cross-attention of the class embeddings over CLIP's tokens with Grad-CAM (the paper's
# d L_itm / d A), k = 96 of 576 foreground tokens for every class, and the learned weighted aggregation of the two
# branches. `DiSaConfig(use_sdm=True, use_hrm=True, **PAPER_SDM_SETTINGS)`; the presets `disa-paper-vit-b-16` /
# `disa-paper-vit-l-14-336` hold it.
PAPER_SDM_SETTINGS = {
    "saliency_source": "gradcam",
    "foreground_topk_mode": "fixed",
    "foreground_ratio": 96 / 576,
    "presence_threshold": None,
    "fusion": "weighted",
}

# Settings that older versions had and that never acted: saved configs that carry them still load (the keys are
# dropped with a warning); passing them anew is an error.
REMOVED_SETTINGS = {
    "initializer_range": "the head keeps PyTorch's default initialisation (as CAT-Seg's code), and CLIP's towers use "
    "`text_config.initializer_range` / `vision_config.initializer_range`",
    "initializer_factor": "the head keeps PyTorch's default initialisation (as CAT-Seg's code), and CLIP's towers use "
    "`text_config.initializer_factor` / `vision_config.initializer_factor`",
}
# The adaptive foreground size (`foreground_topk_mode="adaptive"`): the smallest k whose tokens hold this share of a
# class's saliency mass, clamped to [ADAPTIVE_MIN_RATIO, ADAPTIVE_MAX_RATIO] of the grid (24 to 288 of 576 tokens).
ADAPTIVE_SALIENCY_MASS = 0.5
ADAPTIVE_MIN_RATIO = 1 / 24
ADAPTIVE_MAX_RATIO = 1 / 2
# Width reduction r of HRM's category- and channel-wise MLPs (C -> C / r), as in squeeze-and-excitation.
HRM_REDUCTION = 4


def _sdm_on(get) -> bool:
    return bool(get("use_sdm"))


def _hrm_on(get) -> bool:
    return bool(get("use_hrm"))


def _adaptive_on(get) -> bool:
    return _sdm_on(get) and get("foreground_topk_mode") == "adaptive"


# Ablation and first-design switches retired when the configuration was reduced to the paper's ablation axes, the
# paper's SDM variant (`PAPER_SDM_SETTINGS`) and the shipped design. `model_card.md` says what each one was and why it
# went; the rows measured with them stay in `benchmarks/results/toy_world_*.json`. Per key: the value whose behaviour
# stayed, when the setting could act (the config as a getter -> bool), and what another value asked for. A saved
# config still loads when it holds the kept value, or a value that could not act in it (an SDM setting without SDM):
# the key is dropped with a warning. Any other value asked for a behaviour that is gone and is refused.
RETIRED_SETTINGS = {
    "sdm_input_gradient_scale": (0.0, _sdm_on, "the presence loss's gradient reaching CLIP and the cost embedding"),
    "saliency_target": (
        "predicted_logit",
        lambda get: _sdm_on(get) and get("saliency_source") != "attention",
        "Grad-CAM of the presence probability instead of the presence logit",
    ),
    "foreground_topk": (None, _sdm_on, "an explicit foreground size k; set `foreground_ratio` = k / tokens instead"),
    "adaptive_saliency_mass": (ADAPTIVE_SALIENCY_MASS, _adaptive_on, "another saliency-mass share for adaptive k"),
    "adaptive_min_ratio": (ADAPTIVE_MIN_RATIO, _adaptive_on, "another lower clamp for adaptive k"),
    "adaptive_max_ratio": (ADAPTIVE_MAX_RATIO, _adaptive_on, "another upper clamp for adaptive k"),
    "branch_mode": ("routed", _sdm_on, "two full masked cost volumes through two aggregation passes"),
    "branch_attention": ("shared", _sdm_on, "attention restricted to each token's own branch"),
    "sdm_background_init": ("copy", _sdm_on, "a background branch initialised independently of the foreground one"),
    "hrm_after_aggregation": (True, _hrm_on, "HRM without its levels after the aggregation layers"),
    "hrm_at_decoder": (True, _hrm_on, "HRM without its levels at the decoder stages"),
    "hrm_reduction": (HRM_REDUCTION, _hrm_on, "another width reduction of HRM's MLPs"),
}
# Values of kept settings that were retired with them: setting -> {value: what it was}.
RETIRED_VALUES = {
    "fusion": {"residual": "own output plus a zero-initialised linear map of the other branch's class mean"},
}
# Settings that only configure the CLIP-width cross-attention of `saliency_source` "gradcam" / "attention".
CLIP_WIDTH_SDM_SETTINGS = ("sdm_num_heads", "sdm_mlp_ratio")
# Keys transformers and the Hub keep on a config that are not model settings.
HUB_METADATA_KEYS = ("model_type", "auto_map", "custom_pipelines")


@strict
class DiSaConfig(PreTrainedConfig):
    r"""
    Configuration of [`DiSaForOpenVocabSegmentation`].

    CLIP:
        text_config / vision_config (`CLIPTextConfig` / `CLIPVisionConfig` or dict): the two CLIP towers.
        projection_dim (`int`): CLIP joint embedding width C (512 for ViT-B/16, 768 for ViT-L/14).
        logit_scale_init_value (`float`): CLIP's contrastive temperature init (kept so the CLIP part is a complete
            `CLIPModel`).
        clip_resolution (`int`): side the image is bilinearly resized to before CLIP (384 ViT-B/16, 336 ViT-L/14@336).
            The feature grid is `clip_resolution // vision_config.patch_size` (24 in both CAT-Seg settings).
        guidance_layers (`list[int]`): 0-based CLIP vision blocks whose outputs guide the two decoder stages
            (CAT-Seg: [3, 7] for ViT-B, [7, 15] for ViT-L). The first guides the 2x stage, the second the 4x stage.
        dense_residual (`str`): residual of CAT-Seg's dense last layer. `"cls"` (CAT-Seg CVPR'24: every token adds
            the CLS input state) or `"token"` (CAT-Seg v1: each token keeps its own residual).
        clip_finetune (`str`): which CLIP parameters train. `"qv"` (CAT-Seg: the query and value projection
            weights of every layer of both towers, biases frozen), `"none"` (frozen CLIP) or `"full"`.
        prompt_templates (`list[str]`): prompt templates; P = len(prompt_templates) prompts per class, averaged in
            the text guidance and used as P cost channels. CAT-Seg: `["A photo of a {} in the scene"]`.
        label_token_ids (`list[list[int]]`): token ids of the default vocabulary's prompts (class-major, P per
            class, unpadded); set by `DiSaForOpenVocabSegmentation.set_default_vocabulary`.

    Cost aggregation (CAT-Seg):
        hidden_dim (`int`, 128): cost-embedding width D.
        cost_embed_kernel_size (`int`, 7): kernel of the conv embedding the P-channel raw cost into D channels.
        appearance_guidance_dim / text_guidance_dim (`int`, 128): projected guidance widths.
        num_aggregation_layers (`int`, 2): number of (spatial pair + class) aggregation layers.
        num_attention_heads (`int`, 4), mlp_ratio (`int`, 4): of both aggregation blocks.
        window_size (`int`, 12): Swin window; the shifted block shifts by `window_size // 2`.
        class_cap (`int`, 256): the class axis is padded with learnable tokens up to this length; above it the
            top-`class_cap` classes by max cost are processed and the others get `pruned_class_logit`.
        class_pooling_train / class_pooling_eval (`list[int]`): spatial average pooling inside class
            aggregation ([2, 2] in training, [1, 1] in CAT-Seg's final evaluation).
        class_residual (`str`): `"catseg"` keeps CAT-Seg's `x + up(pool(x) + delta)` residual (needed to reuse
            official weights); `"standard"` uses `x + up(delta)`.
        decoder_dims, decoder_guidance_dims, decoder_guidance_proj_dims: CAT-Seg's upsampling decoder widths.

    Loss:
        ignore_index (`int`): label value that carries no class (255 for 8-bit sets, 65535 for 16-bit ones).
        loss_ignore_mode (`str`): `"catseg"` turns ignored pixels into all-negative targets (CAT-Seg's BCE);
            `"mask"` drops them from the mean.

    DiSa (all off = exactly the CAT-Seg core). The paper's ablation axes are `use_sdm`, `use_hrm` with
    `hrm_stages`, the foreground split (`foreground_topk_mode`, `foreground_ratio`, `presence_threshold`) and `fusion`;
    the defaults are the shipped design (chosen in the toy world), `PAPER_SDM_SETTINGS` the literal reading of the
    paper's SDM (`saliency_source="gradcam"`, fixed k = 96 of 576, `fusion="weighted"`):
        use_sdm (`bool`): saliency-aware disentanglement: a class-presence (ITM) head with cross-attention, Grad-CAM
            saliency, the foreground/background split, two aggregation branches (each token through its own
            branch's weights, attention over the whole class map; the background branch starts as a copy of the
            foreground one) and their fusion. SDM's inputs are detached: the presence loss trains SDM's own head
            only.
        saliency_source (`str`): `"cost"` (shipped: cross-attention of every class over its own embedded cost
            volume, with class-agnostic weights, so presence and saliency transfer to unseen class names),
            `"gradcam"` (the paper's reading: cross-attention of class embeddings over CLIP tokens at CLIP width, x
            ReLU(ITM gradient)) or `"attention"` (that cross-attention without the gradient, the comparison reviewers
            asked for). Grad-CAM differentiates each class's own presence logit (no labels: the same rule in
            training and inference).
        sdm_num_heads (`int`, 8): heads of the CLIP-width cross-attention of saliency_source "gradcam" or
            "attention" (*reconstruction*). The `"cost"` head has no such block (one class-agnostic attention map per
            class), so with `"cost"` this must keep its default: another value is refused instead of being ignored.
        sdm_mlp_ratio (`int`, 4): MLP ratio of that block; same rule with `"cost"`.
        itm_loss_weight (`float`): weight of the auxiliary image-text-matching (class-presence) BCE added to `loss`.
        foreground_topk_mode (`str`): `"fixed"` (the paper: k = round(foreground_ratio * tokens), 96 of 576) or
            `"adaptive"` (shipped: the smallest k holding half of the class's saliency mass, clamped to 1/24-1/2 of
            the grid).
        foreground_ratio (`float`): 96 / 576 by default.
        presence_threshold (`float` or None): presence-aware routing; a class whose predicted presence
            probability is below it gets no foreground token (all its tokens go to the background branch).
            None (the paper's reading): every class gets its k foreground tokens whether present or not.
        fusion (`str`): how the two branches' features merge. `"own"` (shipped: each token keeps its own branch's
            output), `"weighted"` (the paper's weighted aggregation: a learned sigmoid gate between a token's own
            output and the other branch's class mean), `"sum"` or `"concat"` (+ linear projection), the
            alternatives reviewers asked about.
        use_hrm (`bool`) and hrm_stages (`list[str]` from pixel/category/channel): hierarchical refinement, the
            enabled stages after every aggregation layer and every decoder stage.

    Settings of earlier versions that were retired (`RETIRED_SETTINGS`) load from saved configs when they hold the
    behaviour that stayed (dropped with a warning) and are refused otherwise.
    """

    model_type = "disa"
    # Outputs `Trainer.evaluate` / `predict` leave out of the predictions they gather: they concatenate every output
    # along the batch axis, which `text_embeds` `(T, P, C)` does not have (one per vocabulary, not per image);
    # `image_embeds` are features, not predictions (gathering them for a whole dataset only costs memory);
    # `class_indices` index the vocabulary; the loss terms are 0-d. What remains is `logits` (and, with SDM,
    # `itm_logits`; `saliency`, `foreground_mask`, `vision_model_output` when asked for), all batch-first.
    keys_to_ignore_at_inference = ["text_embeds", "image_embeds", "class_indices", "segmentation_loss", "itm_loss"]
    sub_configs_defaults = {"text_config": CLIPTextConfig, "vision_config": CLIPVisionConfig}

    text_config: dict | CLIPTextConfig | None = None
    vision_config: dict | CLIPVisionConfig | None = None
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    clip_resolution: int = 384
    guidance_layers: list[int] | tuple[int, ...] = (3, 7)
    dense_residual: str = "cls"
    clip_finetune: str = "qv"
    prompt_templates: list[str] | tuple[str, ...] = (DEFAULT_PROMPT_TEMPLATE,)
    label_token_ids: list[list[int]] | None = None

    hidden_dim: int = 128
    cost_embed_kernel_size: int = 7
    appearance_guidance_dim: int = 128
    text_guidance_dim: int = 128
    num_aggregation_layers: int = 2
    num_attention_heads: int = 4
    mlp_ratio: int = 4
    window_size: int = 12
    class_cap: int = 256
    pruned_class_logit: float = -100.0
    class_pooling_train: list[int] | tuple[int, ...] = (2, 2)
    class_pooling_eval: list[int] | tuple[int, ...] = (1, 1)
    class_residual: str = "catseg"
    linear_attention_eps: float = 1e-6
    decoder_dims: list[int] | tuple[int, ...] = (64, 32)
    decoder_guidance_dims: list[int] | tuple[int, ...] = (256, 128)
    decoder_guidance_proj_dims: list[int] | tuple[int, ...] = (32, 16)
    decoder_group_norm_channels: int = 16

    ignore_index: int = 255
    loss_ignore_mode: str = "catseg"

    use_sdm: bool = False
    saliency_source: str = "cost"
    sdm_num_heads: int = 8
    sdm_mlp_ratio: int = 4
    itm_loss_weight: float = 1.0
    foreground_topk_mode: str = "adaptive"
    foreground_ratio: float = 96 / 576
    presence_threshold: float | None = 0.5
    fusion: str = "own"
    use_hrm: bool = False
    hrm_stages: list[str] | tuple[str, ...] = HRM_STAGES

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # transformers keeps unknown keys as attributes (for old config files); a key that looks like a DiSa setting
        # is refused by `validate_setting_names`, any other one is at least reported.
        ignored = [
            key
            for key in kwargs
            if key in self.__dict__
            and not key.startswith("_")
            and key not in HUB_METADATA_KEYS
            and _looks_like_disa_setting(key) is None
        ]
        if ignored:
            logger.warning(
                f"DiSaConfig got {ignored}, which are not DiSa settings: they are kept as attributes (as transformers "
                "keeps unknown keys) but nothing reads them."
            )

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "DiSaConfig":
        """`PreTrainedConfig.from_dict` (which `from_pretrained` and `AutoConfig.from_pretrained` use), with the
        keyword arguments checked as the constructor checks its own (transformers sets them as attributes after
        construction, which only type-checks them): DiSa's settings are passed to the constructor together with the
        stored ones, the whole config is validated again once the rest are applied, and a keyword that looks like
        a DiSa setting but is none (a typo such as `fuson="sum"`) is refused instead of being dropped. Other unknown
        keywords are left to transformers (returned with `return_unused_kwargs=True`, ignored otherwise), as
        `AutoTokenizer` / `AutoProcessor` pass their own keywords through here.

        Saved configs from older versions still load: settings that no longer exist (`REMOVED_SETTINGS`), retired
        settings (`RETIRED_SETTINGS`) that hold the behaviour that stayed or could not act in the stored config, and
        CLIP-width SDM settings stored with `saliency_source="cost"`, where they never acted, are dropped with a
        warning. A retired setting that asked for a removed behaviour is refused, naming it.
        """
        return_unused_kwargs = kwargs.pop("return_unused_kwargs", False)
        config_dict = _drop_legacy_settings(dict(config_dict), kwargs)
        # DiSa's own settings go in with the stored ones, so the constructor checks the combination the caller asked
        # for (a stored value that only the keyword makes valid, or the reverse); the CLIP sub-configs keep
        # transformers' rule (a dict keyword updates the stored sub-config).
        for key in [key for key in kwargs if key in _DISA_SETTINGS and key not in cls.sub_configs_defaults]:
            config_dict[key] = kwargs.pop(key)
        config, unused = super().from_dict(config_dict, return_unused_kwargs=True, **kwargs)
        for key in [key for key in unused if _looks_like_disa_setting(key) is not None]:
            # refused just below by `validate_setting_names`, with the setting it resembles
            setattr(config, key, unused.pop(key))
        config.validate()
        return (config, unused) if return_unused_kwargs else config

    @classmethod
    def from_json_file(cls, json_file) -> "DiSaConfig":
        """Read through `from_dict`, so that a file from an older version loads there too."""
        return cls.from_dict(cls._dict_from_json_file(json_file))

    # ------------------------------------------------------------------ derived values
    @property
    def grid_size(self) -> int:
        """Side of the CLIP patch grid (24 for both CAT-Seg presets)."""
        return self.clip_resolution // self.vision_config.patch_size

    @property
    def num_prompts(self) -> int:
        return len(self.prompt_templates)

    def foreground_k(self, num_tokens: int) -> int:
        """Fixed foreground size k for a grid of `num_tokens` tokens (96 at 576 by default)."""
        return max(1, round(self.foreground_ratio * num_tokens))

    # ------------------------------------------------------------------ validators (run at construction and save,
    # after `from_dict` applied its keyword arguments, and when a model is built)
    def validate_setting_names(self):
        for key in self.__dict__:
            if key.startswith("_") or key in _DISA_SETTINGS:
                continue
            if key in REMOVED_SETTINGS:
                raise ValueError(
                    f"`{key}` is no longer a DiSa setting and never acted ({REMOVED_SETTINGS[key]}): remove it."
                )
            if key in RETIRED_SETTINGS:
                kept, _, _ = RETIRED_SETTINGS[key]
                raise ValueError(
                    f"`{key}` was retired: DiSa now always behaves as `{key}={kept!r}` did. Remove it (saved configs "
                    "that carry it still load with `from_pretrained` / `from_dict`, or are refused there when they "
                    "asked for another behaviour)."
                )
            match = _looks_like_disa_setting(key)
            if match is not None:
                hint = (
                    f"did you mean `{match}`?" if match else "the SDM / HRM settings are listed in DiSaConfig's docs"
                )
                raise ValueError(
                    f"`{key}` is not a DiSaConfig setting ({hint}); it would be ignored, so it is refused."
                )

    def validate_geometry(self):
        patch = self.vision_config.patch_size
        if self.clip_resolution % patch != 0:
            raise ValueError(
                f"`clip_resolution` ({self.clip_resolution}) must be a multiple of vision_config.patch_size ({patch})."
            )
        grid = self.grid_size
        if grid % self.window_size != 0:
            raise ValueError(
                f"`window_size` ({self.window_size}) must divide the feature grid ({grid} = clip_resolution "
                f"{self.clip_resolution} // patch_size {patch})."
            )
        for name in ("class_pooling_train", "class_pooling_eval"):
            pool = list(getattr(self, name))
            if len(pool) != 2 or any(p < 1 or grid % p != 0 for p in pool):
                raise ValueError(f"`{name}` must be two positive integers dividing the grid {grid}, got {pool}.")
        if self.hidden_dim % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_dim` ({self.hidden_dim}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})."
            )
        if self.cost_embed_kernel_size % 2 != 1:
            raise ValueError(f"`cost_embed_kernel_size` must be odd, got {self.cost_embed_kernel_size}.")

    def validate_clip(self):
        layers = list(self.guidance_layers)
        n = self.vision_config.num_hidden_layers
        if len(layers) != 2 or any(not 0 <= i < n - 1 for i in layers):
            raise ValueError(
                f"`guidance_layers` must be two block indices in [0, {n - 2}] (the last block is the dense layer), "
                f"got {layers}."
            )
        if (
            self.text_config.projection_dim != self.projection_dim
            or self.vision_config.projection_dim != self.projection_dim
        ):
            raise ValueError(
                f"`projection_dim` ({self.projection_dim}) must equal text_config.projection_dim "
                f"({self.text_config.projection_dim}) and vision_config.projection_dim "
                f"({self.vision_config.projection_dim})."
            )
        if self.dense_residual not in DENSE_RESIDUAL_MODES:
            raise ValueError(f"`dense_residual` must be one of {DENSE_RESIDUAL_MODES}, got {self.dense_residual!r}.")
        if self.clip_finetune not in CLIP_FINETUNE_MODES:
            raise ValueError(f"`clip_finetune` must be one of {CLIP_FINETUNE_MODES}, got {self.clip_finetune!r}.")
        templates = list(self.prompt_templates)
        if not templates or any(not isinstance(t, str) or t.count("{}") != 1 for t in templates):
            raise ValueError(
                f"`prompt_templates` must be a non-empty list of strings with one '{{}}', got {templates}."
            )

    def validate_heads(self):
        if (
            len(self.decoder_dims) != 2
            or len(self.decoder_guidance_dims) != 2
            or len(self.decoder_guidance_proj_dims) != 2
        ):
            raise ValueError(
                "`decoder_dims`, `decoder_guidance_dims` and `decoder_guidance_proj_dims` need 2 values each."
            )
        for dim, proj in zip([self.hidden_dim, self.decoder_dims[0]], self.decoder_guidance_proj_dims):
            if proj >= dim:
                raise ValueError(
                    f"decoder guidance width {proj} must be smaller than the decoder input width {dim} "
                    "(`decoder_guidance_proj_dims`)."
                )
        for dim in self.decoder_dims:
            if dim % self.decoder_group_norm_channels != 0:
                raise ValueError(
                    f"`decoder_dims` entries must be multiples of `decoder_group_norm_channels` "
                    f"({self.decoder_group_norm_channels}), got {list(self.decoder_dims)}."
                )
        if self.class_cap < 0:
            raise ValueError(f"`class_cap` must be >= 0 (0 disables padding and pruning), got {self.class_cap}.")
        if self.class_residual not in CLASS_RESIDUAL_MODES:
            raise ValueError(f"`class_residual` must be one of {CLASS_RESIDUAL_MODES}, got {self.class_residual!r}.")
        if self.loss_ignore_mode not in LOSS_IGNORE_MODES:
            raise ValueError(f"`loss_ignore_mode` must be one of {LOSS_IGNORE_MODES}, got {self.loss_ignore_mode!r}.")

    def validate_vocabulary(self):
        if self.label_token_ids is not None:
            expected = len(self.id2label) * self.num_prompts
            if len(self.label_token_ids) != expected:
                raise ValueError(
                    f"`label_token_ids` has {len(self.label_token_ids)} prompts but id2label has {len(self.id2label)} "
                    f"classes x {self.num_prompts} templates = {expected}; rebuild it with "
                    "`model.set_default_vocabulary(class_names, tokenizer)`."
                )

    def validate_disa(self):
        if self.itm_loss_weight < 0:
            raise ValueError(f"`itm_loss_weight` must be >= 0, got {self.itm_loss_weight}.")
        if self.presence_threshold is not None and not 0 < self.presence_threshold < 1:
            raise ValueError(
                f"`presence_threshold` must be a probability in (0, 1) or None (off), got {self.presence_threshold}."
            )
        if self.saliency_source not in SALIENCY_SOURCES:
            raise ValueError(f"`saliency_source` must be one of {SALIENCY_SOURCES}, got {self.saliency_source!r}.")
        if self.foreground_topk_mode not in TOPK_MODES:
            raise ValueError(f"`foreground_topk_mode` must be one of {TOPK_MODES}, got {self.foreground_topk_mode!r}.")
        if self.fusion in RETIRED_VALUES["fusion"]:
            raise ValueError(
                f"`fusion={self.fusion!r}` ({RETIRED_VALUES['fusion'][self.fusion]}) was retired: it was not better "
                f"than 'own' in the toy world. Choose one of {FUSION_MODES}."
            )
        if self.fusion not in FUSION_MODES:
            raise ValueError(f"`fusion` must be one of {FUSION_MODES}, got {self.fusion!r}.")
        if not 0 < self.foreground_ratio < 1:
            raise ValueError(f"`foreground_ratio` must be in (0, 1), got {self.foreground_ratio}.")
        unknown = [s for s in self.hrm_stages if s not in HRM_STAGES]
        if unknown:
            raise ValueError(f"`hrm_stages` entries must be in {HRM_STAGES}, got unknown {unknown}.")
        if self.sdm_num_heads < 1 or self.sdm_mlp_ratio < 1:
            raise ValueError(
                f"`sdm_num_heads` and `sdm_mlp_ratio` must be >= 1, got {self.sdm_num_heads} and {self.sdm_mlp_ratio}."
            )
        if self.saliency_source == "cost":
            changed = {
                key: getattr(self, key)
                for key in CLIP_WIDTH_SDM_SETTINGS
                if getattr(self, key) != _FIELD_DEFAULTS[key]
            }
            if changed:
                settings = ", ".join(f"`{key}={value}`" for key, value in changed.items())
                defaults = ", ".join(f"{key}={_FIELD_DEFAULTS[key]}" for key in changed)
                raise ValueError(
                    f"{settings} cannot apply with `saliency_source='cost'`: they configure the CLIP-width "
                    "cross-attention of saliency_source 'gradcam' / 'attention', which the cost head does not have. "
                    f"Leave them at their defaults ({defaults}) or choose saliency_source 'gradcam' or 'attention'."
                )
        if self.use_sdm and self.vision_config.hidden_size % self.sdm_num_heads != 0:
            raise ValueError(
                f"`sdm_num_heads` ({self.sdm_num_heads}) must divide the CLIP vision width "
                f"({self.vision_config.hidden_size})."
            )


# CAT-Seg separates a class's synonyms by a comma AND a space (`"building, edifice"`); a bare comma is in the name.
SYNONYM_SEPARATOR = ", "


def prompt_name(name: str) -> str:
    """The name a class is prompted with, by CAT-Seg's rule (`name.split(", ")[0]`, nothing stripped): the text
    before the first `", "` (`"building, edifice"` -> `"building"`), or the whole name when it holds none
    (`"a,b"` -> `"a,b"`)."""
    return name.split(SYNONYM_SEPARATOR)[0]


def _prompt_key(name: str) -> str:
    # CLIP's tokenizer collapses runs of white space, so names differing only there get identical prompts' tokens
    return " ".join(prompt_name(name).split())


def validate_class_names(class_names, allow_shared_prompts: bool = False) -> list[str]:
    """Check a class vocabulary: a non-empty list of distinct, non-empty strings whose prompted names (first
    synonyms, `prompt_name`) are not blank and distinct (white space aside).

    Two classes prompted with the same name (`"building, edifice"` and `"building, house"`) would get identical
    logits, so the later one could never win the argmax; a name whose first synonym is blank (`", cat"`) would prompt
    nothing. `allow_shared_prompts=True` accepts shared prompts (and repeated names): only for reproducing a benchmark
    protocol whose class list has them (CAT-Seg's ADE-847 list prompts e.g. three classes as "bag").
    """
    if isinstance(class_names, str) or not hasattr(class_names, "__iter__"):
        raise TypeError(f"class names must be a list of strings, got {type(class_names).__name__}.")
    names = list(class_names)
    if not names:
        raise ValueError("the class list is empty: pass at least one class name.")
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise TypeError(f"class names must be non-empty strings, got {bad[:5]}.")
    empty = [name for name in names if not _prompt_key(name)]
    if empty:
        raise ValueError(
            f"class names {empty[:5]} have an empty first synonym, which is the name that gets prompted: put the "
            'name first ("cat, kitty"), without a leading comma.'
        )
    if allow_shared_prompts:
        return names
    seen, duplicates = set(), []
    for name in names:
        if name in seen:
            duplicates.append(name)
        seen.add(name)
    if duplicates:
        raise ValueError(f"duplicate class names {duplicates[:5]}: every class must appear once.")
    by_prompt = {}
    for name in names:
        by_prompt.setdefault(_prompt_key(name), []).append(name)
    shared = [(prompt, group) for prompt, group in by_prompt.items() if len(group) > 1]
    if shared:
        details = "; ".join(f"{group} are all prompted as {prompt!r}" for prompt, group in shared[:5])
        raise ValueError(
            f"classes sharing their first synonym get the same prompt and identical logits: {details}. Merge them "
            "into one class, or reorder the synonyms so that the first ones differ."
        )
    return names


def format_prompts(class_names, templates, allow_shared_prompts: bool = False) -> list[str]:
    """Prompts for a vocabulary (checked with `validate_class_names`), class-major (P templates per class); names
    holding synonyms (`"building, edifice"`) use the first synonym, by CAT-Seg's rule (`prompt_name`)."""
    names = validate_class_names(class_names, allow_shared_prompts=allow_shared_prompts)
    return [template.format(prompt_name(name)) for name in names for template in templates]


_BASE_FIELDS = {f.name for f in fields(PreTrainedConfig)}
_DISA_SETTINGS = frozenset(f.name for f in fields(DiSaConfig)) - _BASE_FIELDS
_FIELD_DEFAULTS = {f.name: f.default for f in fields(DiSaConfig)}


def _looks_like_disa_setting(key: str) -> str | None:
    """For a key that is not a DiSa setting: the setting it looks like a misspelling of (`"fuson"` -> `"fusion"`),
    `""` for a removed setting or one in DiSa's `sdm_` / `hrm_` namespaces, None for anything else (transformers'
    and the Hub's own keys, which are far from every DiSa name)."""
    if key.startswith("_") or key in _DISA_SETTINGS or key in _BASE_FIELDS:
        return None
    if key in REMOVED_SETTINGS or key in RETIRED_SETTINGS:
        return ""
    match = difflib.get_close_matches(key, sorted(_DISA_SETTINGS | set(RETIRED_SETTINGS)), n=1, cutoff=0.8)
    if match:
        # a misspelt retired setting is refused too, without pointing at a name that is itself refused
        return "" if match[0] in RETIRED_SETTINGS else match[0]
    return "" if key.startswith(("sdm_", "hrm_")) else None


def _same(value, kept) -> bool:
    if isinstance(kept, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return math.isclose(value, kept, rel_tol=1e-9)
    return type(value) is type(kept) and value == kept


def _drop_legacy_settings(config_dict: dict, overrides: dict) -> dict:
    """Remove from a stored config what older versions saved but never read, and retired settings whose stored value
    is the behaviour that stayed or could not act; refuse retired settings that asked for a removed behaviour (see
    `DiSaConfig.from_dict`)."""

    def get(key):
        return overrides.get(key, config_dict.get(key, _FIELD_DEFAULTS[key]))

    refused = []
    for key, (kept, acts, asked) in RETIRED_SETTINGS.items():
        if key in config_dict and acts(get) and not _same(config_dict[key], kept):
            refused.append(f"`{key}={config_dict[key]!r}` ({asked}; the behaviour that stayed is {key}={kept!r})")
    if refused:
        raise ValueError(
            "This DiSa config was saved by an older version and asks for behaviour that was retired: "
            + "; ".join(refused)
            + ". The measured results of these variants are kept in benchmarks/results/toy_world_*.json and "
            "model_card.md says why each was dropped. Load the config with the version that wrote it, or delete "
            "these keys from config.json to load it with today's behaviour (which is not what its weights were "
            "trained with)."
        )
    removed = [key for key in REMOVED_SETTINGS if key in config_dict]
    removed += [f"{key}={config_dict[key]!r}" for key in RETIRED_SETTINGS if key in config_dict]
    for key in [*REMOVED_SETTINGS, *RETIRED_SETTINGS]:
        config_dict.pop(key, None)
    source = overrides.get("saliency_source", config_dict.get("saliency_source", _FIELD_DEFAULTS["saliency_source"]))
    inert = []
    if source == "cost":
        inert = [
            f"{key}={config_dict.pop(key)}"
            for key in CLIP_WIDTH_SDM_SETTINGS
            if key in config_dict and config_dict[key] != _FIELD_DEFAULTS[key]
        ]
    if removed or inert:
        logger.warning(
            f"This DiSa config was saved by an older version: dropped {removed + inert}, settings that no longer "
            "exist and whose stored values are today's behaviour or never acted in this config (retired or removed "
            "settings, or CLIP-width SDM settings stored with saliency_source='cost'). Save it again to remove them "
            "from the file."
        )
    return config_dict


DiSaConfig.register_for_auto_class()

__all__ = [
    "DiSaConfig",
    "DEFAULT_PROMPT_TEMPLATE",
    "PAPER_SDM_SETTINGS",
    "SYNONYM_SEPARATOR",
    "format_prompts",
    "prompt_name",
    "validate_class_names",
]
