"""Gradients with respect to activations only, shared by attribution patching, relevancy and gradient maps."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """Parameters without gradients for the block (only activations need them), restored afterwards."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def leaf(value: Tensor, ctx) -> Tensor | None:
    """With parameters frozen nothing upstream wants a gradient: the first site reached becomes a leaf that does
    (later sites then hang off it in the graph, so every gradient is the total derivative)."""
    return None if value.requires_grad else value.detach().requires_grad_()
