"""The compiler in one call: ``to_auglocal`` plans a model, emits its blocks and synthesizes their
aux nets; ``load_auglocal`` rebuilds a saved net the same way from the plan in its checkpoint."""

from __future__ import annotations

import dataclasses
import os
import warnings

import torch
from torch import nn

from .assemble.emit import emit_pieces
from .assemble.shapecheck import check_units
from .assemble.synthesize import AUX_INITS, synthesize_aux
from .errors import AugLocalError, AugLocalWarning, first_line
from .fingerprint import check_fingerprint
from .models import create_from_factory, create_model
from .options import resolve
from .plan import Plan, PlanConfig
from .planner import build_plan
from .rules import get_rule
from .runtime.checkpoint import read_checkpoint
from .runtime.net import AugLocalNet

__all__ = ["to_auglocal", "load_auglocal"]


def to_auglocal(model: nn.Module, options: PlanConfig | int | None = None, /, *, plan: Plan | None = None,
                example_inputs=None, model_kwargs: dict | None = None, lazy_aux: bool = False,
                **overrides) -> AugLocalNet:
    """Compile ``model`` (a timm model, a Hugging Face transformers model or any module that torch.fx or
    torch.export traces: ``frontend``) for local learning.

    ``options``: a ``PlanConfig`` or the number of blocks K; keywords override its fields
    (``to_auglocal(model, 16, aux_depth=3)``). Every option, its default and its help is a field of
    ``PlanConfig`` (the docs' options reference lists them); the main ones: ``rule`` (``auglocal``:
    aux nets copy downstream layers; the baselines ``dgl``, ``infopro``, ``predsim``; ``bp``: one
    block, plain backprop), ``aux_depth`` / ``pyramid`` (the method's d and tau), ``balance``,
    ``aux_init`` ("model": the aux copies start as a fresh ``timm.create_model`` of the same
    architecture would, made with ``model_kwargs`` when given), ``aux_head`` (a copy of the model's
    head or a light head), ``layers`` (module-path globs naming the layers), ``output`` (the entry
    of a dict / tuple output that trains), and two memory options, ``recompute`` and ``aux_dtype``.
    ``example_inputs`` (a tensor, batch first, or a tuple of the model's inputs) plans a model whose
    input is not one float image. Pass ``plan`` instead of options to rebuild a net from a saved
    ``Plan`` (no profiling; ``aux_init`` may still be given); a plan made for another model is
    refused, naming the first difference (``fingerprint.py``). A plan's notes (e.g. far fewer layers
    than the model has blocks) are issued as ``AugLocalWarning``.

    Each aux net's random init is seeded from one number drawn from torch's generator here and its
    index, so it does not depend on which other aux nets are built. ``lazy_aux=True`` builds each
    aux net only to measure it and leaves it on the meta device (no memory);
    ``net.materialize_aux(indices)`` then builds the ones this process trains, exactly as the eager
    conversion would have (a pipeline stage's process does this).

    Example:
        >>> net = to_auglocal(timm.create_model("resnet50"), blocks=16)
        >>> len(net.blocks), len(net.aux)
        (16, 15)
    """
    if plan is not None:
        given = [] if options is None else ["options"] if isinstance(options, PlanConfig) else ["blocks"]
        clash = given + [k for k in overrides if k != "aux_init"] + (["example_inputs"] if example_inputs is not None else [])
        if clash:
            raise AugLocalError(f"pass either plan= or planning arguments, not both: the plan already fixes "
                                f"{', '.join(f'{k}=' for k in clash)}")
        check_fingerprint(model, plan)  # a plan made for another model would build a net, silently wrong
    config = plan.config if plan is not None else resolve(PlanConfig, options, overrides)
    if plan is None and config.blocks is None and not get_rule(config.rule).one_block:
        raise AugLocalError("pass blocks=K, the number of local blocks")
    aux_init = overrides.get("aux_init", config.aux_init)  # with a plan: how to start its aux nets this time
    found = AUX_INITS.lookup(aux_init)
    set_classes(model, config.num_classes)
    # before planning draws random numbers (aux_init="model" builds a fresh model: same seed, same weights)
    init = None if get_rule(config.rule).one_block else found.prepare(model, model_kwargs)
    # every aux net's init is seeded from this and its index (a rule without aux nets draws nothing)
    seed = 0 if init is None else int(torch.randint(0, 2 ** 62, ()))
    if plan is None:
        plan = build_plan(model, config, example_inputs=example_inputs)
        _check_head_classes(model, plan, config.num_classes)
        for note in plan.notes:  # e.g. far fewer layers than blocks: the method barely applies
            warnings.warn(note, AugLocalWarning, stacklevel=2)
    block_mods, head, layers, layer_head = emit_pieces(model, plan)
    aux_nets, built, factory = synthesize_aux(model, plan, layers, layer_head, init or aux_init, seed=seed,
                                              lazy=lazy_aux)
    plan = dataclasses.replace(plan, aux=built)  # the net's plan: the planned one with the built aux nets' figures
    net = AugLocalNet(model, plan, block_mods, head, aux_nets, {"rule": plan.config.rule, "aux_init": aux_init})
    if lazy_aux:
        net.aux_factory = factory
    check_units(net)  # a shape problem is an error here, not in the first step
    return net


def set_classes(model: nn.Module, num_classes: int | None) -> None:
    """Give ``model`` ``num_classes`` outputs through timm's ``reset_classifier`` (None: as it is)."""
    if num_classes is not None and getattr(model, "num_classes", num_classes) != num_classes:
        if not hasattr(model, "reset_classifier"):
            raise AugLocalError(f"{type(model).__name__} has no reset_classifier; build it with {num_classes} classes")
        model.reset_classifier(num_classes)


def _check_head_classes(model: nn.Module, plan: Plan, num_classes: int | None) -> None:
    """``num_classes`` can only be set on a model that knows how (timm's ``reset_classifier``); any
    other model must already give that many outputs, or the plan and the net would disagree."""
    out = plan.head.out_shape
    if num_classes is not None and out and out[-1] != num_classes:
        raise AugLocalError.bad_value("num_classes", num_classes, f"differs from the {out[-1]} outputs "
                                      f"{type(model).__name__} gives, and it has no reset_classifier to change "
                                      f"them: build the model with {num_classes} outputs, or leave num_classes out")


def load_auglocal(path: str | os.PathLike, model: nn.Module | None = None, **create_kwargs) -> AugLocalNet:
    """Rebuild the net saved at ``path``. For a timm model the architecture is re-created by name
    (``create_kwargs`` go to ``timm.create_model`` too, e.g. ``exportable=True``); for a net
    ``auglocal-train`` made with ``model.factory`` by importing and calling that factory with the
    keywords it was called with (``create_kwargs`` only where its signature names them); otherwise
    pass a freshly constructed ``model`` of the same architecture.

    Example:
        >>> net.save("converted.pt")
        >>> net2 = load_auglocal("converted.pt")
    """
    payload = read_checkpoint(path)
    plan = Plan.from_dict(payload["plan"])
    options = payload.get("options", {})
    created = model is None
    if created and options.get("model_factory"):  # auglocal-train with model.factory: import it and call it
        ref = options["model_factory"]
        model = create_from_factory(ref, dict(options.get("model_kwargs") or {}), optional=create_kwargs,
                                    what=f"{path} was made by model factory", key="the checkpoint's model_kwargs")
    elif created:
        c = plan.config
        # auglocal-train records the timm kwargs it used (img_size, norm_layer, ...)
        kwargs = options.get("model_kwargs") or {"num_classes": plan.head.out_shape[-1],
                                                 "in_chans": c.input_size[0]}
        try:
            model = create_model(c.model, **kwargs, **create_kwargs)
        except AugLocalError as exc:
            raise AugLocalError(f"{c.model!r} is not a timm model, so {path} cannot be re-created by name: in "
                                f"Python, net = load_auglocal(path, model={c.model}(...)) with the architecture built "
                                "as it was, then export_onnx(net, 'model.onnx')") from exc
    given = plan.config.model if created else f"the {type(model).__name__} given"
    check_fingerprint(model, plan, lead=f"{path} holds weights for another model than {given}",
                      fix="load it with the model it was saved from")
    net = to_auglocal(model, plan=plan, aux_init="copy")
    net.options.update(options)
    if "image_stats" in options:  # what the losses that restore the input (infopro) were trained with
        net.image_stats = options["image_stats"]
    try:
        net.model.load_state_dict(payload["model_state"])
        net.aux.load_state_dict(payload["aux_state"])
    except RuntimeError as exc:  # load_state_dict lists the offending keys after a header line
        lines = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
        detail = lines[0][:160] if lines else first_line(exc, 160, with_type=False)
        raise AugLocalError(f"{path} holds weights for another model than {plan.config.model} ({detail}); "
                            "load it with the model it was saved from") from exc
    return net
