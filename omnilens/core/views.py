"""Views: how a raw module tensor maps to a site's named axes and back.

A view is data (a small frozen object), so executors can apply it locally or ship it to a remote
backend. ``view(raw, ctx)`` returns the named tensor; ``unview(new, raw, ctx)`` turns an edited
named tensor back into the raw module tensor. ``ctx`` carries the hooked module and its call
(arguments and output) for views that need weights, such as the per-head ``hook_result``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch


@dataclass
class CallContext:
    """The module call a site fires in: the module, its positional args and (for outputs) its output."""

    module: torch.nn.Module
    args: tuple[Any, ...] = ()
    output: Any = None


class View:
    """Identity view: the raw tensor is the site's tensor.

    ``aliases``: the viewed tensor shares memory with the raw one, so an in-place edit of the view
    already is an edit of the raw tensor (views computing a new tensor set it to ``False``).
    """

    aliases: ClassVar[bool] = True

    def view(self, raw: torch.Tensor, ctx: CallContext | None = None) -> torch.Tensor:
        """The site's tensor (shaped by ``HookSpec.axes``) from the raw module value ``raw``."""
        return raw

    def unview(self, new: torch.Tensor, raw: torch.Tensor, ctx: CallContext | None = None) -> torch.Tensor:
        """The raw module value carrying the edited site tensor ``new`` (same shape as ``view(raw)``)."""
        return new

    def __repr__(self) -> str:
        return "identity"


IDENTITY = View()


@dataclass(frozen=True, repr=False)
class SplitHeads(View):
    """``[..., n_heads * d_head]`` <-> ``[..., n_heads, d_head]`` (q/k/v projections, o_proj input)."""

    n_heads: int
    d_head: int

    def view(self, raw, ctx=None):
        return raw.view(*raw.shape[:-1], self.n_heads, self.d_head)

    def unview(self, new, raw, ctx=None):
        return new.reshape(raw.shape)

    def __repr__(self) -> str:
        return f"split last axis into {self.n_heads} heads x {self.d_head}"


@dataclass(frozen=True, repr=False)
class HeadsFirst(View):
    """``[batch, head, pos, d_head]`` (attention-internal layout) <-> ``[batch, pos, head, d_head]``."""

    def view(self, raw, ctx=None):
        return raw.transpose(1, 2)

    def unview(self, new, raw, ctx=None):
        return new.transpose(1, 2)

    def __repr__(self) -> str:
        return "transpose (batch head pos d) -> (batch pos head d)"


@dataclass(frozen=True, repr=False)
class PerHeadResult(View):
    """Per-head contribution of a linear output projection, from its input.

    Hooked on the projection's output: ``view`` returns ``[..., n_heads, d_model]`` with
    ``result[..., h, :] = z[..., h, :] @ W[:, h]ᵀ`` (bias excluded); ``unview`` sums the heads and adds
    the bias. An unchanged result leaves the raw output untouched, bit for bit.
    """

    n_heads: int
    d_head: int
    aliases: ClassVar[bool] = False

    def view(self, raw, ctx=None):
        z = ctx.args[0]
        z = z.view(*z.shape[:-1], self.n_heads, self.d_head)
        w = ctx.module.weight.view(ctx.module.weight.shape[0], self.n_heads, self.d_head)
        return torch.einsum("...hd,mhd->...hm", z, w)

    def unview(self, new, raw, ctx=None):
        if torch.equal(new, self.view(raw, ctx)):  # the unwritten result: the module's own output, bit for bit
            return ctx.output
        out = new.sum(-2)
        bias = getattr(ctx.module, "bias", None)
        return out + bias if bias is not None else out

    def __repr__(self) -> str:
        return f"per-head o_proj contribution ({self.n_heads} heads, bias excluded)"


@dataclass(frozen=True, repr=False)
class TupleItem(View):
    """Element ``index`` of a tuple output (e.g. ``self_attn`` returns ``(out, weights)``)."""

    index: int

    def view(self, raw, ctx=None):
        return raw[self.index]

    def unview(self, new, raw, ctx=None):
        items = list(raw)
        items[self.index] = new
        return type(raw)(items) if isinstance(raw, tuple) else items

    def __repr__(self) -> str:
        return f"output[{self.index}]"
