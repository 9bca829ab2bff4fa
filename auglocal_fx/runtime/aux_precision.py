"""Aux nets held in a lower precision (``aux_dtype="bfloat16"``): their weights, gradients and
optimizer state take half the bytes, which matters because the method's aux nets can hold several
times the backbone's parameters (resnet50 K=16: 125M beside 23.5M).

The aux net takes the block's float32 output cast to its dtype (the cast is differentiable, so the
block still gets its gradient in float32) and hands float32 outputs to the loss. Hooks, not a
wrapper module, do the casts, so state-dict keys stay those of a float32 net. The cost is coarser
aux updates: a bfloat16 weight keeps 8 bits of mantissa, and updates far below that are lost.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AUX_DTYPES", "hold_in"]

AUX_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def hold_in(aux: nn.Module, name: str) -> nn.Module:
    """Cast ``aux``'s parameters and buffers to dtype ``name`` and make it take and give float32."""
    dtype = AUX_DTYPES[name]
    if dtype is torch.float32:
        return aux
    aux.to(dtype)

    def cast_inputs(module, args):
        return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)

    def float_output(module, args, out):
        if isinstance(out, tuple):  # an aux net with more than logits (infopro, predsim)
            return tuple(float_output(module, args, o) for o in out)
        return out.float() if isinstance(out, torch.Tensor) and out.is_floating_point() else out

    aux.register_forward_pre_hook(cast_inputs)
    aux.register_forward_hook(float_output)
    return aux
