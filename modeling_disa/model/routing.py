"""Token routing between DiSa's foreground and background branches: every token goes through the per-token layers
of its own branch only, so two branches cost about as much as one."""

import torch


class TokenRoute:
    """A foreground mask `(...)` with its flat foreground / background indices, computed once and shared by every
    per-token computation on the same token layout."""

    def __init__(self, mask: torch.Tensor):
        flat = mask.reshape(-1)
        self.mask = mask
        self.shape = mask.shape
        self.foreground = flat.nonzero().squeeze(1)
        self.background = (~flat).nonzero().squeeze(1)

    def _take(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1]).index_select(0, index)

    def _merge(self, fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
        out = fg.new_empty(fg.shape[0] + bg.shape[0], fg.shape[-1])
        out.index_copy_(0, self.foreground, fg)
        out.index_copy_(0, self.background, bg)
        return out.view(*self.shape, fg.shape[-1])

    def apply(self, foreground_fn, background_fn, *tensors):
        """Run `foreground_fn(*fg_parts)` on the foreground tokens of `tensors` (each `(..., channels)`) and
        `background_fn` on the others; merge every returned tensor back into the token layout. Gathering once
        per group of per-token layers (not once per layer) keeps the copies few."""
        fg = foreground_fn(*(self._take(t, self.foreground) for t in tensors))
        bg = background_fn(*(self._take(t, self.background) for t in tensors))
        if isinstance(fg, torch.Tensor):
            return self._merge(fg, bg)
        return tuple(self._merge(a, b) for a, b in zip(fg, bg))


def as_route(route) -> "TokenRoute | None":
    if route is None or isinstance(route, TokenRoute):
        return route
    return TokenRoute(route)


def per_branch(function, module, twin, route, *tensors):
    """`function(module, *tensors)` without routing; with a route, `function(module, ...)` on foreground tokens
    and `function(twin, ...)` on background tokens."""
    if route is None or twin is None:
        return function(module, *tensors)
    return as_route(route).apply(lambda *t: function(module, *t), lambda *t: function(twin, *t), *tensors)
