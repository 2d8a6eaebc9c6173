"""Losses: CAT-Seg's per-class binary cross-entropy on upsampled logits, and DiSa's auxiliary ITM loss."""

import torch
import torch.nn.functional as F


def check_label_values(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Return the mask of labelled pixels; raise if a pixel holds neither a class id nor the ignore value."""
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        values = torch.unique(labels[bad])[:10].tolist()
        raise ValueError(
            f"labels hold values {values} that are neither a class id in [0, {num_classes}) nor the ignore value "
            f"{ignore_index}; pass the class list that matches the label maps or set `config.ignore_index`."
        )
    return valid


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, mode: str) -> torch.Tensor:
    """
    Per-pixel, per-class binary cross-entropy with one-hot targets.

    Args:
        logits (`(B, T, h, w)`): class logits; bilinearly upsampled to the label size.
        labels (`(B, H, W)` long): class ids, `ignore_index` for unlabelled pixels.
        mode: `"catseg"` = unlabelled pixels become all-negative targets and stay in the mean (CAT-Seg);
            `"mask"` = unlabelled pixels are left out of the mean.
    """
    num_classes = logits.shape[1]
    valid = check_label_values(labels, num_classes, ignore_index)
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    targets = torch.zeros_like(logits)
    targets.scatter_(1, torch.where(valid, labels, 0).unsqueeze(1), valid.unsqueeze(1).to(logits.dtype))
    if mode == "catseg":
        return F.binary_cross_entropy_with_logits(logits, targets)
    losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    weight = valid.unsqueeze(1).to(losses.dtype)
    return (losses * weight).sum() / (weight.sum() * num_classes).clamp_min(1)


def class_presence(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """`(B, H, W)` label maps -> `(B, T)` 0/1 "class occurs in the crop" targets."""
    valid = check_label_values(labels, num_classes, ignore_index)
    presence = torch.zeros(labels.shape[0], num_classes, device=labels.device)
    flat = torch.where(valid, labels, 0).flatten(1)
    presence.scatter_add_(1, flat, valid.flatten(1).float())
    return presence.clamp_max(1.0)


def itm_loss(
    itm_logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    num_classes: int | None = None,
    class_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """BCE between ITM class-presence logits `(B, K)` and the presence derived from `labels`.

    With `class_indices` `(B, K)`, the logits belong to those classes of a `num_classes` vocabulary."""
    presence = class_presence(labels, num_classes or itm_logits.shape[1], ignore_index)
    if class_indices is not None:
        presence = torch.gather(presence, 1, class_indices)
    return F.binary_cross_entropy_with_logits(itm_logits, presence.to(itm_logits.dtype))


def disa_loss(
    config,
    logits: torch.Tensor,
    labels: torch.Tensor,
    itm_logits: torch.Tensor | None = None,
    class_indices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The training loss: segmentation BCE, plus `config.itm_loss_weight` times the ITM loss with SDM.

    Args:
        logits (`(B, T, h, w)`): all classes' logits (pruned ones hold `config.pruned_class_logit`).
        labels (`(B, H, W)` long).
        itm_logits (`(B, K)`, optional): SDM presence logits of the processed classes (`class_indices` `(B, K)`
            under the class cap): presence targets of the processed classes only, pruned classes carry no ITM logit.

    Returns:
        `(loss, segmentation_loss, itm_loss or None)`.
    """
    seg = segmentation_loss(logits, labels, config.ignore_index, config.loss_ignore_mode)
    if itm_logits is None:
        return seg, seg, None
    aux = itm_loss(itm_logits, labels, config.ignore_index, logits.shape[1], class_indices)
    return seg + config.itm_loss_weight * aux, seg, aux
