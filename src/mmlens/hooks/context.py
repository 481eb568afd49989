"""What a hook function is told about the value it receives."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class HookContext:
    """Passed as the second argument of every hook: `fn(value, ctx) -> Tensor | None`.

    name: canonical name; path: HF/diffusers module path; step: denoising step index (diffusion, else None);
    timestep: the scheduler's timestep at that step; branches: how dim 0 splits into classifier-free-guidance
    halves, e.g. `("uncond", "cond")` (the value always holds the whole batch the module saw), else None.
    """

    name: str
    path: str
    step: int | None = None
    timestep: float | None = None
    branches: tuple[str, ...] | None = None
