"""DiSa for open-vocabulary semantic segmentation: CAT-Seg's cost aggregation over transformers' CLIP, with DiSa's
saliency-aware disentanglement (SDM) and hierarchical refinement (HRM) as config switches.

Data flow: image -> CLIP (dense features + guidance taps) -> capped cost volume -> [SDM saliency] -> spatial/class
aggregation [with HRM] -> [SDM fusion] -> guided decoder [with HRM] -> per-class logits.

Shape letters used in every docstring: B batch, T classes (K after the class cap), P prompts, N tokens (= h*w),
h/w grid height/width, D cost-embedding channels, G guidance channels, C CLIP joint-space channels, V CLIP vision
width, H/W image height/width.
"""

import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    ModelOutput,
    cached_file,
    can_return_tuple,
    is_torchdynamo_compiling,
)

from .aggregation import DiSaCostAggregator
from .class_aggregation import DiSaClassTokenLayers
from .clip_dense_features import dense_clip_features, enable_dense_last_block
from .configuration_disa import CLIP_FINETUNE_MODES, DiSaConfig, format_prompts
from .cost_volume import DiSaCostEmbedding, cap_classes, cosine_cost_volume, scatter_classes
from .decoder import DiSaDecoder, DiSaGuidanceUpsampler
from .inference_options import check_inference_dtype
from .losses import disa_loss
from .routing import TokenRoute
from .saliency_disentanglement import DiSaSaliencyDisentanglement
from .spatial_aggregation import DiSaSwinBlock


@dataclass
class DiSaSegmentationOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): segmentation BCE (+ weighted ITM loss with SDM),
            returned when `labels` are given.
        logits (`torch.FloatTensor` of shape `(B, T, 4h, 4w)`): per-class logits (independent
            sigmoids; argmax over classes gives the label). 96x96 for a 384 input. Classes dropped by the class cap
            hold `config.pruned_class_logit`.
        segmentation_loss / itm_loss (`torch.FloatTensor` of shape `()`, *optional*): the two loss terms.
        itm_logits (`(B, T)`, *optional*): SDM class-presence logits.
        saliency (`(B, T, h, w)`, *optional*): SDM Grad-CAM saliency (with `output_saliency`).
        foreground_mask (`(B, T, h, w)` bool, *optional*): SDM foreground tokens per class.
        class_indices (`(B, class_cap)`, *optional*): the classes processed per image when the vocabulary is
            larger than `config.class_cap`.
        text_embeds (`(T, P, C)`): L2-normalised prompt embeddings used.
        image_embeds (`(B, C, h, w)`): dense CLIP image embeddings.
        vision_model_output (`BaseModelOutputWithPooling`, *optional*, with `output_hidden_states` /
            `output_attentions`): what the CLIP vision tower records (CLIP's `capture_outputs`): `last_hidden_state`
            (output of the dense last block), `pooler_output`, `hidden_states` (`num_hidden_layers + 1` tensors
            `(B, 1 + N, width)`, CLIP's convention) and `attentions` (one `(B, heads, 1 + N, 1 + N)` per
            token-mixing block: all but the dense last one; empty under SDPA, which computes no weights).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    segmentation_loss: torch.FloatTensor | None = None
    itm_loss: torch.FloatTensor | None = None
    itm_logits: torch.FloatTensor | None = None
    saliency: torch.FloatTensor | None = None
    foreground_mask: torch.BoolTensor | None = None
    class_indices: torch.LongTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple:
        # nested outputs become tuples too (as `CLIPSegImageSegmentationOutput.to_tuple` in models/clipseg)
        return tuple(self[k].to_tuple() if k == "vision_model_output" else self[k] for k in self.keys())


# How `from_clip_pretrained` finds the CLIP checkpoint (passed on to `CLIPModel.from_pretrained`).
CLIP_LOADING_KWARGS = (
    "cache_dir",
    "force_download",
    "local_files_only",
    "token",
    "revision",
    "subfolder",
    "proxies",
    "use_safetensors",
    "variant",
    "weights_only",
    "disable_mmap",
)
# DiSa config fields that `from_clip_pretrained` takes from the CLIP checkpoint.
CLIP_CONFIG_SETTINGS = ("text_config", "vision_config", "projection_dim", "logit_scale_init_value")
# Serialised config fields that are not settings a caller chooses.
_NOT_SETTINGS = (
    "model_type",
    "transformers_version",
    "architectures",
    "_name_or_path",
    "dtype",
    *CLIP_CONFIG_SETTINGS,
)


def _initialisation_group(name: str) -> int:
    """Order in which `initialize_weights` draws the head's random weights: the CAT-Seg host first, then SDM's
    saliency head, its background branch, its fusion, then HRM's levels. A model with SDM / HRM switched on thus
    draws the same host weights at a given seed as CAT-Seg mode (paired comparisons), and the draws do not depend on
    where in the module tree the switched-on modules sit."""
    if ".refinement" in f".{name}":
        return 4
    if ".background" in f".{name}":
        return 2
    if name.startswith("sdm.fusion"):
        return 3
    return 1 if name.startswith("sdm") else 0


class DiSaPreTrainedModel(PreTrainedModel):
    config: DiSaConfig
    base_model_prefix = "disa"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["DiSaAggregationLayer", "DiSaDecoder"]

    @torch.no_grad()
    @init.guard_torch_init_functions()
    def initialize_weights(self):
        """CLIP sub-models first, by CLIP's own rule and traversal, then the head (`_init_weights`).

        transformers' composite traversal (`PreTrainedModel.initialize_weights`) does dispatch CLIP's modules to
        `CLIPPreTrainedModel._init_weights`, but for a model defined outside transformers it skips every module
        without parameters of its own (`CLIPAttention`, `CLIPMLP`), whose branches set CLIP's per-layer stds; and
        CLIP's rule never sets `logit_scale`. On the `from_pretrained` path (weights materialised empty, then only
        the tensors missing from the checkpoint initialised) that left missing CLIP tensors at the generic
        `initializer_range` std and `clip.logit_scale` as uninitialised memory. The guarded `init` functions skip
        tensors loaded from the checkpoint, so this only touches missing ones (and nothing after `__init__`, where
        `CLIPModel.post_init` already ran).
        """
        for module in self.modules():
            if isinstance(module, CLIPModel):
                module.initialize_weights()
                init.constant_(module.logit_scale, module.config.logit_scale_init_value)
        # transformers' traversal (children before parents, sub-models by their own rule), in the order of
        # `_initialisation_group`
        visits = []

        def visit(module, name, function):
            for child_name, child in module.named_children():
                child_function = child._initialize_weights if isinstance(child, PreTrainedModel) else function
                visit(child, f"{name}.{child_name}" if name else child_name, child_function)
            visits.append((_initialisation_group(name), module, function))

        visit(self, "", self._initialize_weights)
        custom = self.is_custom_code()
        for _, module, function in sorted(visits, key=lambda visit: visit[0]):
            function(module, custom)

    def _init_weights(self, module):
        """Head modules get PyTorch's default initialisation, as CAT-Seg's head (which calls no custom init);
        CLIP sub-modules are initialised by `CLIPPreTrainedModel._init_weights` (see `initialize_weights`)."""
        if getattr(module, "zero_init", False):
            # the last layer of an HRM stage, which must start as the identity
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, DiSaSwinBlock) and module.attn_mask is not None:
            # Non-persistent buffer: rebuilt here because `from_pretrained` materialises modules from the meta device.
            init.copy_(module.attn_mask, module.build_attention_mask())
        elif isinstance(module, DiSaClassTokenLayers) and hasattr(module, "padding_tokens"):
            init.zeros_(module.padding_tokens)
            init.zeros_(module.padding_guidance)


class DiSaForOpenVocabSegmentation(DiSaPreTrainedModel):
    r"""
    DiSa / CAT-Seg open-vocabulary segmentation model over a CLIP `CLIPModel` (`self.clip`).

    Inputs are images and a class vocabulary (prompt token ids shared by the whole batch, or precomputed text
    embeddings, or nothing: then the default vocabulary `config.id2label` is used); the output holds one logit map
    per class.
    """

    def __init__(self, config: DiSaConfig):
        # The constructor and `from_dict` validate, but attributes set afterwards (`config.fusion = ...`) are only
        # type-checked: check the whole config before building modules from it.
        config.validate()
        super().__init__(config)
        clip_config = CLIPConfig(
            text_config=config.text_config,
            vision_config=config.vision_config,
            projection_dim=config.projection_dim,
            logit_scale_init_value=config.logit_scale_init_value,
            # The towers share DiSa's sub-config objects, and a `CLIPConfig` built without `attn_implementation`
            # resets theirs to None (then SDPA): pass on what `from_pretrained(attn_implementation=...)` (a string or
            # a per-sub-config dict, see `PreTrainedModel.set_attn_implementation`) set on DiSa's config.
            attn_implementation={
                "": config._attn_implementation,
                "text_config": config.text_config._attn_implementation,
                "vision_config": config.vision_config._attn_implementation,
            },
        )
        self.clip = CLIPModel(clip_config)
        # CAT-Seg's dense last block runs inside CLIP's vision tower, which then records its own outputs
        enable_dense_last_block(self.clip.vision_model)
        self.cost_embedding = DiSaCostEmbedding(config.num_prompts, config.hidden_dim, config.cost_embed_kernel_size)
        self.appearance_guidance = nn.Sequential(
            nn.Conv2d(config.projection_dim, config.appearance_guidance_dim, kernel_size=3, padding=1), nn.ReLU()
        )
        self.text_guidance = nn.Sequential(nn.Linear(config.projection_dim, config.text_guidance_dim), nn.ReLU())
        self.guidance_upsampler = DiSaGuidanceUpsampler(config)
        self.aggregator = DiSaCostAggregator(config)
        self.decoder = DiSaDecoder(config)
        self.sdm = DiSaSaliencyDisentanglement(config) if config.use_sdm else None
        self.post_init()
        # Skipped on the meta device, where `from_pretrained` builds the model: it copies after loading, into the
        # background tensors that the checkpoint lacks.
        if self.sdm is not None and not next(self.aggregator.parameters()).is_meta:
            # The background branch starts as the foreground one: the routing, which keeps moving while the presence
            # head learns, then never sends a token to weights that have not been trained for it.
            self._copy_foreground_to_background()
        self.configure_clip_finetuning(config.clip_finetune)

    def _background_twins(self) -> dict[str, str]:
        """`{state-dict name of a background-branch tensor: name of its foreground (host) twin}`: every aggregation
        block's `background` child mirrors the block's own per-token layers, and each spatial layer's
        `background_guidance_norm` mirrors its `guidance_norm`. Empty without SDM."""
        twins = {}
        for prefix, module in self.aggregator.named_modules(prefix="aggregator"):
            for child, host in (("background", ""), ("background_guidance_norm", "guidance_norm.")):
                branch = getattr(module, child, None)
                if isinstance(branch, nn.Module):
                    twins.update({f"{prefix}.{child}.{key}": f"{prefix}.{host}{key}" for key in branch.state_dict()})
        return twins

    def disa_parameter_names(self) -> list[str]:
        """Parameters that DiSa adds to the CAT-Seg host: SDM's presence / saliency head and fusion (`sdm.*`), the
        background branch of every aggregation block, and HRM's refinements. Empty in CAT-Seg mode. Training only
        these (with the host frozen) is the upgrade path from CAT-Seg weights: the model then starts as, and keeps,
        the CAT-Seg host, and learns only what DiSa adds."""
        background = {name for name in self._background_twins()}
        return [
            name
            for name, _ in self.named_parameters()
            if name.startswith("sdm.") or ".refinement." in f".{name}" or name in background
        ]

    @torch.no_grad()
    def _copy_foreground_to_background(self, names: set[str] | None = None) -> None:
        """Set the background branch's tensors to their foreground twins' values (`_background_twins`): all of them,
        or only those named in `names` (state-dict names; `from_pretrained` passes the ones the checkpoint lacked)."""
        tensors = self.state_dict(keep_vars=True)
        for background, host in self._background_twins().items():
            if names is not None and background not in names:
                continue
            if tensors[background].is_meta or tensors[host].is_meta:
                # copying on the meta device is a silent no-op (weights offloaded by a `device_map` live elsewhere)
                raise ValueError(
                    f"cannot start the background branch as a copy of the foreground one: {background} or {host} "
                    "is on the meta device (offloaded by device_map). Load without offloading."
                )
            tensors[background].copy_(tensors[host])

    # ------------------------------------------------------------------ CLIP fine-tuning and optimiser groups
    def configure_clip_finetuning(self, mode: str = "qv") -> None:
        """Set `requires_grad` on CLIP: `"qv"` = the `{vision,text}_model.encoder.layers.*.self_attn.{q,v}_proj.weight`
        matrices (CAT-Seg's `CLIP_FINETUNE: attention`; biases frozen), `"none"` = frozen, `"full"` = everything.

        In every mode, parameters that the forward pass never uses stay frozen (`unused_parameter_names`), so every
        trainable parameter receives a gradient in each step (DDP's `find_unused_parameters=False` then works): the
        dense last vision block's query/key projections (CAT-Seg counts that query matrix as trainable, but it
        receives no gradient there either), CLIP's contrastive `logit_scale`, and with SDM the foreground
        branch's class-padding tokens (padding classes are background tokens, so they use the background branch's).
        """
        if mode not in CLIP_FINETUNE_MODES:
            # any other value would fall through to the "qv" rule while the config records it
            raise ValueError(f"`clip_finetune` mode must be one of {CLIP_FINETUNE_MODES}, got {mode!r}.")
        for name, param in self.clip.named_parameters():
            if mode == "full":
                param.requires_grad_(True)
            elif mode == "none":
                param.requires_grad_(False)
            else:
                param.requires_grad_(
                    ".encoder.layers." in name
                    and name.endswith(("self_attn.q_proj.weight", "self_attn.v_proj.weight"))
                )
        unused = set(self.unused_parameter_names())
        for name, param in self.named_parameters():
            if name in unused:
                param.requires_grad_(False)
        self.config.clip_finetune = mode

    def unused_parameter_names(self) -> list[str]:
        """Parameters that no forward pass of this configuration reads, or whose value cannot change any output
        (kept so that CLIP, CAT-Seg and earlier DiSa checkpoints load unchanged); `configure_clip_finetuning` keeps
        them frozen. The cost-saliency key's bias adds one constant to every token's attention logit of a class,
        which the softmax over tokens cancels: its gradient is zero by construction."""
        last = self.config.vision_config.num_hidden_layers - 1
        names = ["clip.logit_scale"] + [
            f"clip.vision_model.encoder.layers.{last}.self_attn.{proj}_proj.{kind}"
            for proj in ("q", "k")
            for kind in ("weight", "bias")
        ]
        if self.sdm is not None:
            names += [
                name
                for name, _ in self.aggregator.named_parameters(prefix="aggregator")
                if name.endswith(("class_aggregation.padding_tokens", "class_aggregation.padding_guidance"))
            ]
        if self.sdm is not None and self.config.saliency_source == "cost":
            names.append("sdm.cost_saliency.key.bias")
        return names

    @classmethod
    def from_clip_pretrained(
        cls, clip_name_or_path: str | os.PathLike, config: DiSaConfig | str | os.PathLike | None = None, **kwargs
    ) -> "DiSaForOpenVocabSegmentation":
        """
        Build a DiSa model around a pretrained HF CLIP checkpoint (e.g. `"openai/clip-vit-base-patch16"`), with a
        randomly initialised head (initialised by the same rule as a model built directly, the background branch
        a copy of the foreground one). The CLIP tower configs come from the
        checkpoint; every other setting from `config` (a `DiSaConfig`, or a preset folder such as
        `configuration/models/disa-vit-b-16`). The model is returned in training mode.

        Keyword arguments:
        - `dtype` (default `torch.float32`; `"auto"` keeps the CLIP checkpoint's): the dtype of every parameter.
        - DiSa config settings (e.g. `use_sdm=True`): applied to `config`. Those that come from the CLIP checkpoint
          (`text_config`, `vision_config`, `projection_dim`, `logit_scale_init_value`) are refused.
        - `attn_implementation`, `device_map`: as in `from_pretrained`, for the whole model.
        - `cache_dir`, `revision`, `local_files_only`, `token`, ...: how `CLIPModel.from_pretrained` finds the
          checkpoint (`CLIP_LOADING_KWARGS`). Anything else is refused.

        The CLIP weights are loaded once and become the model's parameters (no second copy of CLIP in memory).
        """
        for key in ("torch_dtype", *CLIP_CONFIG_SETTINGS):
            if key in kwargs:
                fix = "pass dtype= instead" if key == "torch_dtype" else "it comes from the CLIP checkpoint"
                raise ValueError(f"from_clip_pretrained does not take `{key}`: {fix}.")
        setting_names = set(DiSaConfig().to_dict()) - set(_NOT_SETTINGS)
        settings = {key: kwargs.pop(key) for key in list(kwargs) if key in setting_names}
        dtype = kwargs.pop("dtype", torch.float32)
        model_kwargs = {key: kwargs.pop(key) for key in ("attn_implementation", "device_map") if key in kwargs}
        unknown = sorted(set(kwargs) - set(CLIP_LOADING_KWARGS))
        if unknown:
            raise TypeError(
                f"from_clip_pretrained got unexpected keyword arguments {unknown}: it takes DiSa config settings, "
                f"dtype, attn_implementation, device_map and the CLIP loading arguments {list(CLIP_LOADING_KWARGS)}."
            )
        clip = CLIPModel.from_pretrained(clip_name_or_path, dtype=dtype, **kwargs)
        if config is None:
            config = DiSaConfig()
        elif not isinstance(config, DiSaConfig):
            config = DiSaConfig.from_pretrained(config)
        values = config.to_dict()
        values.update(settings)
        values.update(
            text_config=clip.config.text_config.to_dict(),
            vision_config=clip.config.vision_config.to_dict(),
            projection_dim=clip.config.projection_dim,
            logit_scale_init_value=clip.config.logit_scale_init_value,
        )
        for key in ("model_type", "transformers_version", "architectures", "auto_map", "dtype"):
            values.pop(key, None)
        # Loaded as a checkpoint that holds only the CLIP tensors: the model is built on the meta device, takes the
        # CLIP tensors themselves (same storage, nothing copied when dtype and device already match) and initialises
        # the missing head tensors, instead of building a randomly initialised CLIP and copying the loaded one in.
        state_dict = {f"clip.{key}": tensor for key, tensor in clip.state_dict().items()}
        del clip
        model = cls.from_pretrained(
            None, config=DiSaConfig(**values), state_dict=state_dict, dtype=dtype, **model_kwargs
        )
        model.config._name_or_path = ""  # not loaded from a DiSa checkpoint (`from_pretrained(None)` writes "None")
        return model.train()

    @classmethod
    def from_pretrained(
        cls, *args, output_loading_info: bool = False, ignore_mismatched_sizes: bool = False, **kwargs
    ):
        """`PreTrainedModel.from_pretrained`, with three differences:

        - A checkpoint whose tensor shapes disagree with the config raises (naming the keys) instead of silently
          re-initialising them; pass `ignore_mismatched_sizes=True` to accept the re-initialisation (e.g. a head of
          another width).
        - With SDM, background-branch tensors that the checkpoint lacks (or that were
          re-initialised for a shape mismatch) start as copies of their foreground twins, as in a model built
          directly; background tensors present in the checkpoint are kept as loaded. Every other missing tensor
          (e.g. SDM's presence head) is initialised by the model's own rule (`_init_weights`).
        - A checkpoint that only has pickle weights (`pytorch_model.bin`) is read with
          `torch.load(weights_only=True)`, with a warning saying how to convert it.

        Upgrading CAT-Seg weights to DiSa: a CAT-Seg-mode folder (`use_sdm=False`, e.g. written by
        `python -m modeling_disa.convert_catseg` from the official CAT-Seg weights) loads as a DiSa model with
        `DiSaForOpenVocabSegmentation.from_pretrained(folder, use_sdm=True)`. The CLIP, cost-embedding, aggregation
        and decoder weights are the checkpoint's, the background branch starts as a copy of the aggregation weights,
        and SDM's presence head is newly initialised (listed as missing in the load report): fine-tune before use.
        With the default `fusion="own"`, the two branches are then identical and
        the model computes exactly the CAT-Seg model's logits, until training moves the branches apart."""
        if args:
            _warn_if_pickle_checkpoint(args[0], kwargs)
        # transformers' own refusal only points at a logged table; load permissively, then refuse with the keys.
        model, info = super().from_pretrained(*args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
        mismatched = info.get("mismatched_keys") or []
        if mismatched and not ignore_mismatched_sizes:
            details = "; ".join(
                f"{key}: checkpoint {tuple(a)} vs model {tuple(b)}" for key, a, b in sorted(mismatched)[:20]
            )
            raise ValueError(
                f"{len(mismatched)} checkpoint tensors do not match the model's shapes ({details}). Check that the "
                "config matches the checkpoint, or pass ignore_mismatched_sizes=True to re-initialise them."
            )
        if model.sdm is not None:
            # `__init__` cannot copy here (it runs on the meta device, before loading), so the tensors that did not
            # come from the checkpoint are copied now; loaded ones (a trained DiSa checkpoint) stay as they are.
            not_loaded = set(info.get("missing_keys") or ()) | {key for key, *_ in mismatched}
            model._copy_foreground_to_background(not_loaded)
        # Loading replaces the parameter tensors (all `requires_grad=True`), so re-apply the fine-tuning rule.
        model.configure_clip_finetuning(model.config.clip_finetune)
        return (model, info) if output_loading_info else model

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        """`PreTrainedModel.save_pretrained` (safetensors), also mapping `AutoModelForSemanticSegmentation` in the
        config's `auto_map` so the saved folder serves the `image-segmentation` pipeline with remote code.

        With `push_to_hub=True` (and `repo_id`, `commit_message`, `token`, `private`, `create_pr`, `processor`
        keywords), the folder is saved and then `push_to_hub` uploads the complete repository."""
        hub_keys = ("repo_id", "commit_message", "commit_description", "token", "private", "create_pr", "processor")
        hub_kwargs = {key: kwargs.pop(key) for key in hub_keys if key in kwargs}
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map.setdefault("AutoModelForSemanticSegmentation", f"{__name__.split('.')[-1]}.{type(self).__name__}")
        self.config.auto_map = auto_map
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if push_to_hub and kwargs.get("is_main_process", True):
            repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.normpath(str(save_directory))))
            self.push_to_hub(repo_id, max_shard_size=kwargs.get("max_shard_size", "50GB"), **hub_kwargs)
        return result

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
        processor=None,
        eval_results=None,
    ):
        """
        Upload a complete DiSa repository in one commit: what `PreTrainedModel.push_to_hub` uploads (weights, config,
        code) plus the `open-vocabulary-segmentation` pipeline declared in `config.custom_pipelines` with its code,
        and a model card (`README.md`, with `pipeline_tag`, tags and, from `eval_results`, a model-index) instead of
        transformers' generic one. Same keyword arguments as `PreTrainedModel.push_to_hub`, plus:

        - `processor` (`DiSaProcessor`): also upload the processor and tokenizer files, which the pipelines need.
          Without it a warning says so; push it separately with `processor.push_to_hub(repo_id)`.
        - `eval_results`: evaluation results (see `modeling_disa.hub.load_eval_results`) for the card.

        Returns the `CommitInfo` of the upload. `modeling_disa.hub.publish_to_hub` is the same with more card options.
        """
        # The Hub tooling is not part of this remote-code folder; without the installed package this is
        # transformers' upload (weights, config, code).
        try:
            from modeling_disa.hub import publish_to_hub
        except ImportError:
            warnings.warn(
                "the modeling_disa package is not installed: uploading with PreTrainedModel.push_to_hub (no pipeline "
                "code, no DiSa model card); `pip install modeling-disa` for the complete repository.",
                UserWarning,
                stacklevel=2,
            )
            return super().push_to_hub(
                repo_id,
                commit_message=commit_message,
                commit_description=commit_description,
                private=private,
                token=token,
                revision=revision,
                create_pr=create_pr,
                max_shard_size=max_shard_size,
                tags=tags,
            )

        return publish_to_hub(
            self,
            processor,
            repo_id,
            eval_results,
            token=token,
            private=private,
            revision=revision,
            commit_message=commit_message or "Upload DiSa model",
            commit_description=commit_description,
            create_pr=create_pr,
            max_shard_size=max_shard_size,
            tags=tags,
        )

    # ------------------------------------------------------------------ text side
    def check_prompt_templates(self, prompt_templates) -> None:
        """Refuse prompts built with other templates than `config.prompt_templates` (the model reads P of them per
        class, in that order: prompts of another count or order would be read as other classes or as another
        template's channel). `prompt_templates` is what `DiSaProcessor` returns beside `input_ids`; None checks
        nothing."""
        if prompt_templates is None:
            return
        expected = list(self.config.prompt_templates)
        given = [prompt_templates] if isinstance(prompt_templates, str) else list(prompt_templates)
        if given != expected:
            raise ValueError(
                f"the prompts were built with the prompt templates {given}, but this model's config.prompt_templates "
                f"is {expected} ({len(expected)} prompts per class, in that order). Build the processor from the "
                "model's folder (`DiSaProcessor.from_pretrained(model_folder)`), or pass "
                "`prompt_templates=model.config.prompt_templates` to `DiSaProcessor(...)`."
            )

    def get_text_embeddings(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor | None = None,
        prompt_templates: list[str] | None = None,
    ) -> torch.FloatTensor:
        """
        L2-normalised prompt embeddings.

        Args:
            input_ids (`(T * P, L)`): prompt tokens, class-major (P = `config.num_prompts` templates per class),
                padded to the longest prompt (the causal mask makes that identical to padding to 77).
            attention_mask (`(T * P, L)`, *optional*).
            prompt_templates (`list[str]`, *optional*): the templates the prompts were built with (returned by
                `DiSaProcessor`); refused unless equal to `config.prompt_templates` (`check_prompt_templates`).
                Without them only the row count is checked (a multiple of P).

        Returns:
            `(T, P, projection_dim)`, computed by the text encoder on every call (the model keeps no cache). To run
            several forward passes on one vocabulary (batches of images, sliding-window views, an evaluation loop),
            compute this once and pass it as `forward(..., text_embeds=...)`, as the pipeline and
            `modeling_disa.model.inference` do.
        """
        self.check_prompt_templates(prompt_templates)
        if input_ids.ndim != 2 or input_ids.shape[0] == 0:
            raise ValueError(
                f"input_ids must be (num_classes * num_prompts, length) with >= 1 row, got {tuple(input_ids.shape)}."
            )
        prompts = self.config.num_prompts
        if input_ids.shape[0] % prompts:
            raise ValueError(
                f"input_ids has {input_ids.shape[0]} rows, not a multiple of the {prompts} prompt templates."
            )
        # only the pooled output is read: nothing to record (whatever the text config says)
        pooled = self.clip.text_model(
            input_ids=input_ids, attention_mask=attention_mask, output_attentions=False, output_hidden_states=False
        ).pooler_output
        embeds = F.normalize(self.clip.text_projection(pooled), dim=-1)
        return embeds.view(-1, prompts, embeds.shape[-1])

    def set_default_vocabulary(self, class_names, tokenizer) -> None:
        """Make `class_names` the vocabulary used when `forward` gets no text (the `image-segmentation` pipeline
        path): sets `config.id2label`, `config.label2id` and the prompt tokens `config.label_token_ids`."""
        prompts = format_prompts(class_names, self.config.prompt_templates)
        token_ids = tokenizer(prompts)["input_ids"]
        names = list(class_names)
        self.config.id2label = dict(enumerate(names))
        self.config.label2id = {name: i for i, name in enumerate(names)}
        self.config.label_token_ids = [list(map(int, ids)) for ids in token_ids]

    def default_vocabulary_tokens(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(input_ids, attention_mask)` `(T * P, L)` of the default vocabulary (`config.label_token_ids`)."""
        token_ids = self.config.label_token_ids
        if not token_ids:
            raise ValueError(
                "No class vocabulary: pass `input_ids` (e.g. from `DiSaProcessor(images=..., text=[...])`) or "
                "`text_embeds`, or store a default one with `model.set_default_vocabulary(class_names, tokenizer)`."
            )
        length = max(len(ids) for ids in token_ids)
        pad = self.config.text_config.pad_token_id or 0
        input_ids = torch.full((len(token_ids), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(token_ids), length), dtype=torch.long)
        for row, ids in enumerate(token_ids):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        device = device if device is not None else self.device
        return input_ids.to(device), attention_mask.to(device)

    # ------------------------------------------------------------------ input checks
    # Value checks (NaN/inf) read tensor data, which `torch.export` / `torch.compile` cannot branch on; like
    # transformers' own models they are skipped while tracing (`is_torchdynamo_compiling`), shape checks are kept.
    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"pixel_values must be (batch, 3, height, width) RGB, got shape {tuple(pixel_values.shape)}; "
                "convert grayscale/RGBA images with DiSaImageProcessor."
            )
        if pixel_values.shape[0] == 0:
            raise ValueError("pixel_values holds no images (batch size 0): pass at least one image.")
        patch = self.config.vision_config.patch_size
        if min(pixel_values.shape[-2:]) < patch:
            raise ValueError(
                f"images of {tuple(pixel_values.shape[-2:])} pixels are smaller than one CLIP patch ({patch})."
            )
        if not is_torchdynamo_compiling() and not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values contain NaN or inf values.")
        if not is_torchdynamo_compiling() and pixel_values.device.type == "cpu":
            check_inference_dtype(self.dtype, pixel_values.device)  # bf16 / fp16 weights: only on a CPU that has them

    def _check_text_embeds(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """`(T, P, C)` or `(T, C)` -> `(T, P, C)`, refusing other shapes, widths and non-finite values."""
        config = self.config
        if text_embeds.ndim == 2:
            text_embeds = text_embeds.unsqueeze(1)
        if text_embeds.ndim != 3 or text_embeds.shape[1] != config.num_prompts:
            raise ValueError(
                f"text_embeds must be (num_classes, {config.num_prompts}, dim) or (num_classes, dim) for one "
                f"template, got {tuple(text_embeds.shape)}; compute them with `model.get_text_embeddings(input_ids)`."
            )
        if text_embeds.shape[-1] != config.projection_dim:
            raise ValueError(
                f"text_embeds have width {text_embeds.shape[-1]} but this model's CLIP joint space has "
                f"projection_dim={config.projection_dim}; compute them with this model's `get_text_embeddings`."
            )
        if text_embeds.shape[0] == 0:
            raise ValueError("the class vocabulary is empty: text_embeds has 0 classes.")
        if not text_embeds.is_floating_point():
            raise ValueError(f"text_embeds must be a floating-point tensor, got {text_embeds.dtype}.")
        if not is_torchdynamo_compiling() and not torch.isfinite(text_embeds).all():
            raise ValueError("text_embeds contain NaN or inf values; recompute them with `model.get_text_embeddings`.")
        return text_embeds

    @staticmethod
    def _check_labels(labels: torch.Tensor, batch: int) -> None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(
                f"labels must be a tensor of class ids (batch, height, width), got {type(labels).__name__}."
            )
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(
                f"labels must hold integer class ids (torch.long), got dtype {labels.dtype}; convert class-id maps "
                "with labels.long() (one-hot or probability maps are not accepted: take argmax over classes first)."
            )
        if labels.ndim != 3:
            hint = " add the batch axis with labels.unsqueeze(0)." if labels.ndim == 2 else ""
            raise ValueError(
                f"labels must be (batch, height, width) class-id maps, got shape {tuple(labels.shape)};{hint}"
            )
        if labels.shape[0] != batch:
            raise ValueError(
                f"labels hold {labels.shape[0]} maps but pixel_values holds {batch} images: pass one map per image."
            )

    # ------------------------------------------------------------------ forward
    # `return_dict` is handled by `can_return_tuple` (as in CLIPModel); attention weights and hidden states are
    # recorded by CLIP's vision tower itself (its `capture_outputs`), never re-captured here.
    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.FloatTensor,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        text_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        output_saliency: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        prompt_templates: list[str] | None = None,
    ) -> DiSaSegmentationOutput | tuple:
        r"""
        Args:
            pixel_values (`(B, 3, H, W)`): CLIP-normalised images (see `DiSaImageProcessor`); resized to
                `config.clip_resolution` inside.
            input_ids / attention_mask (`(T * P, L)`): class prompts shared by the batch (see `DiSaProcessor`).
            prompt_templates (`list[str]`, *optional*): the templates the prompts (or `text_embeds`) were built with,
                as `DiSaProcessor` returns them; refused unless equal to `config.prompt_templates`.
            text_embeds (`(T, P, C)` or `(T, C)`): precomputed prompt embeddings (`get_text_embeddings`) instead of
                `input_ids`; the way to reuse one vocabulary's encoding across calls.
            labels (`(B, H', W')` long): class ids in `[0, T)`, `config.ignore_index` for unlabelled pixels.
            output_saliency (`bool`): with SDM, also return the saliency maps and foreground masks.
            output_attentions / output_hidden_states (*optional*, default from the config): return what the CLIP
                vision tower records, in `vision_model_output`. As in every transformers model, attention weights
                are only computed by eager attention: under SDPA (the default) `attentions` is empty and
                transformers logs a warning; load with `attn_implementation="eager"` to get them.
                `output_hidden_states` may also be an index or a list of indices (the other entries are None).
            return_dict (`bool`, *optional*, default `config.return_dict`): `False` returns `to_tuple()`.

        Unknown keyword arguments are refused (`TypeError`), so that a misspelt `labels=` cannot pass silently.
        """
        config = self.config
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        )
        self._check_pixel_values(pixel_values)
        self.check_prompt_templates(prompt_templates)
        batch = pixel_values.shape[0]
        if labels is not None:
            self._check_labels(labels, batch)

        # 1. resolve the vocabulary: prompt embeddings (T, P, C) from text_embeds, input_ids or the default one
        if text_embeds is None:
            if input_ids is None:
                input_ids, attention_mask = self.default_vocabulary_tokens(pixel_values.device)
            text_embeds = self.get_text_embeddings(input_ids, attention_mask)
        elif input_ids is not None:
            raise ValueError("pass either input_ids (class prompts) or text_embeds (their embeddings), not both.")
        text_embeds = self._check_text_embeds(text_embeds)
        num_classes = text_embeds.shape[0]

        # 2. CLIP: dense image embeddings (B, C, h, w), mid-layer guidance taps, dense tokens
        features = dense_clip_features(
            self.clip,
            pixel_values,
            config.clip_resolution,
            list(config.guidance_layers),
            config.dense_residual,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        image_embeds = features.image_embeds
        text = text_embeds.to(image_embeds.dtype).unsqueeze(0).expand(batch, -1, -1, -1)

        # 3. cost volume (B, P, K, h, w) of the K <= class_cap classes kept per image, embedded to (B, D, K, h, w)
        text, cost, class_indices = cap_classes(
            image_embeds, text, cosine_cost_volume(image_embeds, text), config.class_cap
        )
        volume = self.cost_embedding(cost)

        # 4. guidance: appearance (B, G, h, w), text (B, K, G) from one normalised embedding per class (prompt
        # average, also SDM's queries), decoder guidance at 2x and 4x
        appearance_guidance = self.appearance_guidance(image_embeds)
        class_embeds = F.normalize(F.normalize(text, dim=-1).mean(dim=2), dim=-1)
        text_guidance = self.text_guidance(class_embeds)
        decoder_guidance = self.guidance_upsampler(features.guidance_features)
        pooling = tuple(config.class_pooling_train if self.training else config.class_pooling_eval)

        # 5. SDM saliency: presence logits and the foreground split, the route of every token
        saliency = route = None
        if self.sdm is not None:
            saliency = self.sdm(class_embeds, features.dense_tokens, volume)
            route = TokenRoute(saliency.foreground_mask)

        # 6. aggregation (HRM inside every layer), each token through its branch's weights with SDM
        volume = self.aggregator(volume, appearance_guidance, text_guidance, pooling, route)
        if self.sdm is not None:
            # 7. fusion of the branches
            volume = self.sdm.fusion.routed(volume, saliency.foreground_mask)

        # 8. decoder (HRM after every stage): (B, K, 4h, 4w) logits, pruned classes back as pruned_class_logit
        logits = scatter_classes(
            self.decoder(volume, decoder_guidance), class_indices, num_classes, config.pruned_class_logit
        )

        # 9. loss
        loss = seg_loss = aux_loss = None
        if labels is not None:
            itm = saliency.itm_logits if saliency is not None else None
            loss, seg_loss, aux_loss = disa_loss(config, logits, labels, itm, class_indices)

        itm_logits = sal_maps = fg_masks = None
        if saliency is not None:
            itm_logits = scatter_classes(saliency.itm_logits, class_indices, num_classes, config.pruned_class_logit)
            if output_saliency:
                sal_maps = scatter_classes(saliency.saliency, class_indices, num_classes, 0.0)
                fg_masks = scatter_classes(saliency.foreground_mask, class_indices, num_classes, False)

        output = DiSaSegmentationOutput(
            loss=loss,
            logits=logits,
            segmentation_loss=seg_loss,
            itm_loss=aux_loss,
            itm_logits=itm_logits,
            saliency=sal_maps,
            foreground_mask=fg_masks,
            class_indices=class_indices,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            vision_model_output=(
                BaseModelOutputWithPooling(
                    last_hidden_state=features.last_hidden_state,
                    pooler_output=features.pooler_output,
                    hidden_states=features.hidden_states,
                    attentions=features.attentions,
                )
                if features.hidden_states is not None or features.attentions is not None
                else None
            ),
        )
        return output


def _warn_if_pickle_checkpoint(pretrained_model_name_or_path, kwargs: dict) -> None:
    """Warn when `from_pretrained` will read pickle weights (`pytorch_model.bin`) because the folder or repo has no
    safetensors file. transformers reads them with `torch.load(weights_only=True)`, which refuses arbitrary objects,
    but does so silently."""
    if kwargs.get("gguf_file") or kwargs.get("variant") or kwargs.get("use_safetensors") is False:
        return
    if not isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
        return
    lookup = {k: kwargs[k] for k in ("cache_dir", "revision", "subfolder", "token", "local_files_only") if k in kwargs}

    def present(filename):
        try:
            return cached_file(
                pretrained_model_name_or_path,
                filename,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
                **lookup,
            )
        except Exception:  # noqa: BLE001 - the real loading reports problems with the path itself
            return None

    if present(SAFE_WEIGHTS_NAME) or present(SAFE_WEIGHTS_INDEX_NAME):
        return
    pickle_file = next((name for name in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME) if present(name)), None)
    if pickle_file is not None:
        warnings.warn(
            f"{pretrained_model_name_or_path}: no {SAFE_WEIGHTS_NAME}, reading the pickle checkpoint {pickle_file} "
            "(with torch.load(weights_only=True), which refuses arbitrary Python objects). Convert it once with "
            "`DiSaForOpenVocabSegmentation.from_pretrained(folder).save_pretrained(folder)`, which writes "
            f"{SAFE_WEIGHTS_NAME}.",
            UserWarning,
            stacklevel=3,
        )


DiSaForOpenVocabSegmentation.register_for_auto_class("AutoModel")

__all__ = ["DiSaForOpenVocabSegmentation", "DiSaPreTrainedModel", "DiSaSegmentationOutput"]
