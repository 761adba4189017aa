"""Several V1 server copies trained in one computation (docs/server.md, "Batched steps").

Steps of different devices that are pending at the same moment run as one ``torch.func`` call:
the copies' parameters are stacked along a new leading dimension, ``vmap`` runs the forward and
backward of every copy on its own batch, and each copy's optimizer then steps on its own slice of
the gradients. The arithmetic per copy is the sequential step's, so results agree with
:meth:`SplitTrainer.step` within float32 reassociation (tested within 1e-5); the gain is fewer,
larger kernels (what a GPU needs) and one Python dispatch for K steps instead of K.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, stack_module_state, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

if TYPE_CHECKING:
    from server_runtime.trainer import ServerCopy


def batched_step(copies: list[ServerCopy], xs: torch.Tensor, ys: torch.Tensor,
                 bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step of every copy in ``copies`` on its batch: ``xs`` (K, B, N, D) float32
    activations and ``ys`` (K, B) labels. Returns (K, B, N, D) activation gradients and (K,) losses.

    The caller holds every copy's lock. Parameters stay where they are (each copy keeps its own
    tensors and optimizer state); only the forward/backward is batched."""
    if len(copies) != xs.shape[0] or xs.shape[0] != ys.shape[0]:
        raise ValueError(f"{len(copies)} copies for {xs.shape[0]} activation batches and {ys.shape[0]} label batches")
    parts = [c.part for c in copies]
    params, buffers = stack_module_state(parts)
    base = parts[0]
    autocast = torch.autocast(xs.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def loss_of(p: dict, b: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast:
            logits = functional_call(base, (p, b), (x,))
        return F.cross_entropy(logits.float(), y)

    with sdpa_kernel([SDPBackend.MATH]):  # the fused kernels have no batching rule: vmap would loop
        (param_grads, x_grads), losses = vmap(grad_and_value(loss_of, argnums=(0, 2)))(params, buffers, xs, ys)
    for index, copy_ in enumerate(copies):
        copy_.optimizer.zero_grad(set_to_none=True)
        for name, param in copy_.part.named_parameters():
            param.grad = param_grads[name][index].to(param.dtype)
        copy_.optimizer.step()
    return x_grads.detach().float(), losses.detach().float()
