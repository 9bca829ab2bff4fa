"""``to_auglocal``: the whole compiler in one call — plan, emit blocks, synthesize aux nets."""

from __future__ import annotations

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC2701  (public in all but name)
from torch.utils.flop_counter import FlopCounterMode

from .adapters import Adapter, norm2d_like
from .emit import emit_pieces
from .errors import AugLocalError
from .net import AugLocalNet
from .pipeline import build_plan, eval_mode
from .plan import Plan
from .rules import RULES, AuxContext, reset_parameters

__all__ = ["to_auglocal", "AUX_INITS"]

AUX_INITS = ("fresh", "copy")


def to_auglocal(
    model: nn.Module,
    blocks: int | None = None,
    *,
    aux_depth: int = 2,
    pyramid: float = 0.5,
    balance: str = "layers",
    tail: str = "exact",
    aux_init: str = "fresh",
    rule: str = "auglocal",
    input_size=None,
    num_classes: int | None = None,
    model_name: str | None = None,
    plan: Plan | None = None,
) -> AugLocalNet:
    """Compile ``model`` (a timm model or any fx-traceable module returning logits) for local learning.

    ``rule``: ``auglocal`` (aux nets copy downstream layers), ``dgl`` (small aux heads) or ``bp``
    (one block, plain backprop). ``aux_init="fresh"`` re-initialises the copied layers, as the
    paper's code builds new ones; ``"copy"`` keeps the backbone's current weights. Pass ``plan`` to
    rebuild a net from a saved plan (no profiling).

    Example:
        >>> net = to_auglocal(timm.create_model("resnet50"), blocks=16)
        >>> len(net.blocks), len(net.aux)
        (16, 15)
    """
    if rule not in RULES:
        raise AugLocalError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    if aux_init not in AUX_INITS:
        raise AugLocalError(f"unknown aux_init {aux_init!r}; choose one of {', '.join(AUX_INITS)}")
    if num_classes is not None and getattr(model, "num_classes", num_classes) != num_classes:
        if not hasattr(model, "reset_classifier"):
            raise AugLocalError(f"{type(model).__name__} has no reset_classifier; build it with {num_classes} classes")
        model.reset_classifier(num_classes)
    if plan is None:
        if rule == "bp":
            blocks = 1
        if blocks is None:
            raise AugLocalError("pass blocks=K, the number of local blocks")
        plan = build_plan(model, blocks, aux_depth=aux_depth, pyramid=pyramid, balance=balance, tail=tail,
                          input_size=input_size, model_name=model_name, num_classes=num_classes, rule=rule)
    block_mods, head, layers, layer_head = emit_pieces(model, plan)
    builder = RULES[plan.config.rule]
    aux_nets = []
    if builder is not None:
        classes = plan.head.out_shape[-1] if plan.head.out_shape else 0
        norm2d = norm2d_like(model)
        for recipe in plan.aux:
            aux = builder(AuxContext(plan, recipe, layers, layer_head, classes, norm2d))
            if aux_init == "fresh":
                reset_parameters(aux)
            recipe.adapters = [m.summary for m in aux.modules() if isinstance(m, Adapter)]
            recipe.params = sum(p.numel() for p in aux.parameters())
            recipe.flops = _aux_flops(aux, recipe, plan)
            aux_nets.append(aux)
    options = {"rule": plan.config.rule, "aux_init": aux_init}
    return AugLocalNet(model, plan, block_mods, head, aux_nets, options)


def _aux_flops(aux: nn.Module, recipe, plan: Plan) -> int:
    """Forward FLOPs of one aux net per sample. Copied layers see the shapes they see in the
    backbone, so their FLOPs are the profiled ones; only adapters and other new modules are counted."""
    if plan.config.rule != "auglocal":
        return _flops(aux, plan.layers[plan.blocks[recipe.block].layers[-1]].out_shape)
    copied = sum(plan.layers[j].flops for j in recipe.selected_layers) + plan.head.flops
    return copied + sum(_flops(a, a.in_shape) for a in aux.modules() if isinstance(a, Adapter))


def _flops(module: nn.Module, shape: list[int]) -> int:
    """Forward FLOPs of ``module`` for one sample of ``shape`` (eval mode, so batch-norm can take 1).

    Counted on fake tensors: shapes propagate and the counter sees every op, but nothing is
    computed (running real aux nets was most of ``to_auglocal``'s time).
    """
    counter = FlopCounterMode(display=False)
    with eval_mode(module), torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as fake, counter:
        module(fake.from_tensor(torch.zeros(1, *shape)))
    return int(counter.get_total_flops())
