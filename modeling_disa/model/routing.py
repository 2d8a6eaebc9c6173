"""Token routing between DiSa's foreground and background branches (SDM).

A `TokenRoute` is the one thing SDM threads through the aggregation layers, as transformers threads an attention
mask: it says which branch's weights every token goes through. Each block that has a background branch owns its
weights as a `background` child. Two ways to run a block's per-token layers, both giving every token its branch's
layers (so two branches cost about as much as one):

- spatial aggregation: split the tokens into the foreground rows and the background rows (`TokenRoute.split`), run
  each branch on its own rows, and merge them back (`TokenRoute.merge`) only where tokens mix (attention);
- class aggregation, whose layout is mostly background (the padding classes up to `class_cap` always are): run the
  background branch on every token and overwrite the few foreground rows with the foreground branch's
  (`TokenRoute.foreground_rows`, `TokenRoute.overwrite`), which copies the foreground rows only.
"""

import torch
import torch.nn.functional as F

# A pooled cell of the class-aggregation layout is foreground when at least this share of its tokens is.
POOLED_FOREGROUND_SHARE = 0.5


class TokenRoute:
    """Which branch every token takes: a foreground mask (`True` = foreground) with its flat foreground /
    background indices (computed once and shared by every per-token computation on the same token layout)."""

    def __init__(self, mask: torch.Tensor, _indices=None):
        self.mask = mask
        self._pooled = {}
        if _indices is None:
            flat = mask.reshape(-1)
            _indices = (flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1))
        self.foreground, self.background = _indices

    def view(self, *shape) -> "TokenRoute":
        """The same route on a reshaped token layout (same flat order, so the indices are reused)."""
        return TokenRoute(self.mask.view(*shape), _indices=(self.foreground, self.background))

    def permute_rows(self, order: torch.Tensor) -> "TokenRoute":
        """The route with the tokens of every row (last axis) reordered: position p holds token `order[p]`. The
        indices keep the token order, so `split` on the reordered layout returns the same rows as before."""
        length = self.mask.shape[-1]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(length, device=order.device)
        mapped = tuple(
            (index // length) * length + inverse[index % length] for index in (self.foreground, self.background)
        )
        return TokenRoute(self.mask[..., order], _indices=mapped)

    def class_layout(self, pooling: tuple[int, int], class_cap: int) -> "TokenRoute":
        """Route `(B, T, h, w)` -> the class-aggregation layout `(B * pooled pixels, class_cap or T)`: a pooled cell
        is foreground when `POOLED_FOREGROUND_SHARE` of its tokens are; padding classes are background. Cached per
        pooling, since every aggregation layer uses the same layout."""
        key = (tuple(pooling), class_cap)
        if key not in self._pooled:
            batch, classes, height, width = self.mask.shape
            share = F.avg_pool2d(self.mask.flatten(0, 1).unsqueeze(1).float(), pooling)
            pixels = share.shape[-2] * share.shape[-1]
            pooled = (share >= POOLED_FOREGROUND_SHARE).view(batch, classes, pixels).transpose(1, 2)
            if class_cap > 0:
                pooled = torch.cat([pooled, pooled.new_zeros(batch, pixels, class_cap - classes)], dim=2)
            self._pooled[key] = TokenRoute(pooled.flatten(0, 1))
        return self._pooled[key]

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(..., C)` on the route's token layout -> its foreground rows and background rows, each `(n, C)` in
        token order."""
        flat = x.reshape(-1, x.shape[-1])
        return flat.index_select(0, self.foreground), flat.index_select(0, self.background)

    def foreground_rows(self, x: torch.Tensor) -> torch.Tensor:
        """`(..., C)` on the route's token layout -> its foreground rows `(n_fg, C)`, in token order."""
        return x.reshape(-1, x.shape[-1]).index_select(0, self.foreground)

    def overwrite(self, full: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
        """`full` `(..., C)`, every token's values from the background branch, with its foreground rows replaced in
        place by `foreground` `(n_fg, C)` -> `(..., C)` on the route's layout. `full` must be a fresh result that its
        producer does not keep for backward (a linear layer's or a sum's output)."""
        channels = full.shape[-1]
        # an elementwise result keeps its inputs' layout: tokens permuted into the class layout (no class padding)
        # give a non-contiguous sum, which has no flat row view to write into
        full = full.contiguous()
        full.view(-1, channels).index_copy_(0, self.foreground, foreground)
        return full.view(*self.mask.shape, channels)

    def project(self, layers, foreground, guidance_foreground, background, guidance_background):
        """q, k, v `(..., D)` of the route's tokens: the foreground rows `(n_fg, D)` through `layers`, the
        background rows through `layers.background` (their `projection_inputs` and `projections`), merged one
        projection at a time, so that only one projection's per-branch halves are alive besides the merged ones (the
        same values as projecting each branch in full, then merging)."""
        inputs = (
            layers.projection_inputs(foreground, guidance_foreground),
            layers.background.projection_inputs(background, guidance_background),
        )
        branches = (layers.projections(), layers.background.projections())
        # q and k read [LN(x); guidance] (input 1), v reads LN(x) (input 0)
        return tuple(
            self.merge(branches[0][i](inputs[0][source]), branches[1][i](inputs[1][source]))
            for i, source in enumerate((1, 1, 0))
        )

    def merge(self, fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
        """Inverse of `split`: foreground rows `(n_fg, C)` and background rows `(n_bg, C)` -> `(..., C)`."""
        out = fg.new_empty(fg.shape[0] + bg.shape[0], fg.shape[-1])
        out.index_copy_(0, self.foreground, fg)
        out.index_copy_(0, self.background, bg)
        return out.view(*self.mask.shape, fg.shape[-1])
