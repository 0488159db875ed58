"""Attribution: how much each element of a model's input moved a scalar score of its output.

Both methods are "mean gradient x input", with the gradient taken at different points:

- ``smoothgrad``: the gradient averaged over copies of the input with Gaussian noise
  (SmoothGrad, Smilkov et al. 2017), which removes the speckle of a single gradient;
- ``integrated``: Integrated Gradients (Sundararajan et al. 2017) from an all-zero input (black
  after windowing: no image, to these models), midpoint rule over ``samples`` steps; the
  attributions then sum to score(input) - score(0) up to the rule's error.

Captum implements both; these are the few lines they need here, run one point at a time (a large
model's backward pass fits beside its weights only at batch 1) and with the model's parameters
frozen, so that no parameter gradient is ever stored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from .cancel import Cancelled, CancelToken
from .errors import Med3DVLMError

METHODS = ("smoothgrad", "integrated")
Progress = Callable[[int, int], None]  # (passes done, passes in all)
NOISE = 0.1  # SmoothGrad's standard deviation on inputs in [0, 1] (the paper advises 10-20 % of the range)


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """No parameter of ``modules`` requires a gradient inside; the flags are restored after."""
    params = [p for module in modules for p in module.parameters()]
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)


def attribute(score: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, method: str = "smoothgrad",
              samples: int = 8, *, noise: float = NOISE, seed: int = 0, save_memory: bool = False,
              cancel: CancelToken | None = None, progress: Progress | None = None) -> torch.Tensor:
    """Attribution of ``score`` (a differentiable scalar function of a tensor shaped like
    ``inputs``) to each element of ``inputs``; float32, same shape.

    ``save_memory`` keeps the activations that the backward pass needs in host memory
    (``torch.autograd.graph.save_on_cpu``), so that on a GPU the backward of a 7B model fits where
    its forward does, at the cost of copying them there and back. ``progress(done, samples)`` is
    called after each pass; ``cancel`` is checked before each and raises Cancelled (a mean over
    fewer passes than asked would be a different map, not a partial one).
    """
    if method not in METHODS:
        raise Med3DVLMError(f"Unknown attribution method {method!r}; use one of {', '.join(METHODS)}.")
    if samples < 1:
        raise Med3DVLMError(f"Attribution needs at least one sample, got {samples}.")
    inputs = inputs.detach().float()
    generator = torch.Generator(device=inputs.device).manual_seed(seed)
    total = torch.zeros_like(inputs)
    for step in range(samples):
        if cancel is not None and cancel.cancelled:
            raise Cancelled("The evidence map was stopped before it was complete.")
        if method == "smoothgrad":
            point = inputs + noise * torch.randn(inputs.shape, generator=generator, device=inputs.device)
        else:
            point = inputs * ((step + 0.5) / samples)
        point.requires_grad_(True)
        offload = torch.autograd.graph.save_on_cpu(pin_memory=inputs.is_cuda) if save_memory else nullcontext()
        with torch.enable_grad(), offload:
            (gradient,) = torch.autograd.grad(score(point), point)
        total += gradient
        if progress is not None:
            progress(step + 1, samples)
    return total / samples * inputs
