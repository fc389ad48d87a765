"""Truncated scoring: the modules of the top L transformer blocks, and a forward that records a
graph from there on only (``SelectionConfig.score_layers``).

With ``score_layers = L`` the selection step captures the per-sample gradients of the trainable
modules inside the last L of the model's N blocks and of those after the blocks (the final
norm, an untied head), and nothing below. Its capture runs the forward without autograd until
block N−L starts (``graph_from``): the lower blocks keep no activations for backward, and the
backward ``autograd.grad(Σ_i ℓ_i, outputs)`` ends at block N−L's input. The update then comes
from a second forward+backward over the k selected (``SelectionStep``), which reaches every
trainable parameter.

A head tied to the input embedding is not scored: its gradient is the sum of both uses, and
the embedding's use sits below every block.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from gradsift.layers import resolve_modules


@dataclass(frozen=True)
class TopLayers:
    """The modules scored with the top ``L`` blocks.

    Attributes:
        names: captured module names (model order): the top L blocks' and those above them.
        first_block: the name of block N−L, where the capture's graph starts.
        blocks: N, the model's number of transformer blocks.
        left_out: captured modules left out because they share a weight with a module below
            (a tied head).
    """

    names: list[str]
    first_block: str
    blocks: int
    left_out: list[str]


def transformer_blocks(model: nn.Module) -> tuple[str, list[str]]:
    """The name of the model's list of transformer blocks and the blocks' names, in order:
    the ``nn.ModuleList`` holding the most parameters (``model.layers`` in Llama,
    ``transformer.h`` in GPT-2, the same inside a peft wrapper).

    Raises:
        ValueError: the model has no ``nn.ModuleList`` of modules.
    """
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError("score_layers: the model has no nn.ModuleList of transformer blocks")
    name, blocks = max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
    return name, [f"{name}.{child}" for child, _ in blocks.named_children()]


def _within(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def top_layers(model: nn.Module, score_layers: int,
               modules: Iterable[str] | None = None) -> TopLayers:
    """The trainable modules of the top ``score_layers`` blocks and of everything registered
    after the block list (final norm, head), among ``modules`` when given (else among every
    module ``resolve_modules`` captures by default). A module whose weight is shared with one
    outside that set (a head tied to the input embedding) is left out.

    Raises:
        ValueError: more layers than blocks, or no module left to score (the message says
            which modules were asked for and which blocks were kept).
    """
    list_name, blocks = transformer_blocks(model)
    if score_layers > len(blocks):
        raise ValueError(f"score_layers={score_layers}, but the model has {len(blocks)} "
                         f"transformer blocks ({list_name})")
    kept = blocks[len(blocks) - score_layers :]
    order = [n for n, _ in model.named_modules()]
    after = order.index(list_name)
    scored = {n for i, n in enumerate(order)
              if _within(n, kept) or (i > after and not _within(n, [list_name]))}
    eligible = resolve_modules(model, modules)
    names = [n for n in eligible if n in scored]
    named = dict(model.named_modules())
    owners: dict[int, list[str]] = {}
    for n, m in model.named_modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(n)
    chosen = set(names)
    left_out = [n for n in names if not set(owners[id(named[n].weight)]) <= chosen]
    names = [n for n in names if n not in left_out]
    if not names:
        asked = "every trainable module" if modules is None else f"modules {list(modules)}"
        raise ValueError(f"score_layers={score_layers}: none of {asked} lies in the top "
                         f"{score_layers} blocks ({kept[0]} .. {kept[-1]}) or above them"
                         + (f" (left out, weight shared below: {left_out})" if left_out else ""))
    return TopLayers(names=names, first_block=kept[0], blocks=len(blocks), left_out=left_out)


@contextmanager
def graph_from(model: nn.Module, start: nn.Module) -> Iterator[None]:
    """While inside, a forward of ``model`` runs without autograd until ``start`` begins,
    then with autograd as before: nothing below ``start`` is recorded for backward, so no
    backward can reach it. Hooks removed and the grad mode restored in ``finally``."""
    enabled = torch.is_grad_enabled()

    def off(module: nn.Module, args: tuple) -> None:
        torch.set_grad_enabled(False)

    def on(module: nn.Module, args: tuple) -> None:
        torch.set_grad_enabled(enabled)

    handles = [model.register_forward_pre_hook(off), start.register_forward_pre_hook(on)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        torch.set_grad_enabled(enabled)
