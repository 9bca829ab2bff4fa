"""The compiler in one call: ``to_auglocal`` plans a model, emits its blocks and synthesizes their
aux nets; ``load_auglocal`` rebuilds a saved net the same way from the plan in its checkpoint."""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from .checkpoint import read_checkpoint
from .cuts import MAX_BUNDLE
from .emit import emit_pieces
from .errors import AugLocalError, AugLocalWarning, first_line
from .fingerprint import check_fingerprint
from .models import check_num_classes, create_model
from .net import AugLocalNet
from .plan import Plan
from .planner import build_plan
from .rules import get_rule
from .shapecheck import check_units
from .synthesize import AUX_INITS, synthesize_aux

__all__ = ["to_auglocal", "load_auglocal"]

_PLANNING_DEFAULTS = {"blocks": None, "aux_depth": 2, "pyramid": 0.5, "balance": "layers", "tail": "exact",
                      "rule": "auglocal", "input_size": None, "model_name": None, "max_bundle": MAX_BUNDLE,
                      "layers": None, "output": None, "batch": 32,
                      "recompute": "none", "aux_dtype": "float32", "aux_head": "auto", "example_inputs": None}


def to_auglocal(
    model: nn.Module,
    blocks: int | None = None,
    *,
    aux_depth: int = 2,
    pyramid: float = 0.5,
    balance: str = "layers",
    tail: str = "exact",
    aux_init: str = "model",
    rule: str = "auglocal",
    input_size=None,
    num_classes: int | None = None,
    model_name: str | None = None,
    max_bundle: int = MAX_BUNDLE,
    layers=None,
    output: str | int | None = None,
    batch: int = 32,
    recompute: str = "none",
    aux_dtype: str = "float32",
    aux_head: str = "auto",
    model_kwargs: dict | None = None,
    plan: Plan | None = None,
    example_inputs=None,
) -> AugLocalNet:
    """Compile ``model`` (a timm model or any fx-traceable module returning logits) for local learning.

    ``rule``: ``auglocal`` (aux nets copy downstream layers), the baselines ``dgl`` (small aux heads),
    ``infopro`` (a classifier and an image decoder) and ``predsim`` (similarity matching), each as
    its authors built it (``rules/``), or ``bp`` (one block, plain backprop). ``aux_init="model"`` initialises the aux nets as the model
    initialises itself (the copies from a fresh ``timm.create_model`` of the same architecture, made
    with ``model_kwargs`` when given, else with keywords read off the model; other models and layers:
    kaiming-normal convs, norms 1/0; ``aux_init.py``); ``"fresh"`` runs PyTorch's
    ``reset_parameters`` on every aux layer; ``"copy"`` keeps the backbone's current weights.
    ``aux_head="auto"`` ends each aux net with a copy of the model's head unless that head holds
    more than a quarter of the model's parameters (VGG's ConvMlp), then with a light head (global
    pool + a small MLP; ``light_head.py``); ``"copy"`` / ``"light"`` force one. A cut may hand
    on up to ``max_bundle`` tensors. ``layers`` (module-path globs, e.g. ``["encoder.layers.*"]``)
    names the layers when the automatic grouping gets them wrong. A model returning a dict, tuple
    or dataclass trains on (and ``net(x)`` returns) its ``output`` entry: a key, index or field name
    (default ``"logits"``, else the first, with a note). ``batch`` is the batch size the plan's
    memory estimate assumes and ``balance="memory"`` minimises the peak at. Two options lower the
    memory of training (both off by default, faithful to the method): ``recompute="block"`` recomputes
    each block's forward during its backward, so a block's activations and its aux net's are never
    alive together (one more block forward per step); ``aux_dtype="bfloat16"`` holds the aux nets'
    weights, gradients and optimizer state in bfloat16 (half their bytes; coarser aux updates).
    Pass ``plan`` instead of the planning arguments to rebuild a
    net from a saved plan (no profiling); a plan made for another model is refused, naming the
    first difference (the plan's fingerprint: ``fingerprint.py``). A plan's notes (e.g. far
    fewer layers than the model has blocks) are issued as ``AugLocalWarning``.

    Example:
        >>> net = to_auglocal(timm.create_model("resnet50"), blocks=16)
        >>> len(net.blocks), len(net.aux)
        (16, 15)
    """
    check_num_classes(num_classes)  # 0 would drop the classifier: features taken as logits
    found = AUX_INITS.lookup(aux_init)
    if num_classes is not None and getattr(model, "num_classes", num_classes) != num_classes:
        if not hasattr(model, "reset_classifier"):
            raise AugLocalError(f"{type(model).__name__} has no reset_classifier; build it with {num_classes} classes")
        model.reset_classifier(num_classes)
    if plan is None and blocks is None and not get_rule(rule).one_block:
        raise AugLocalError("pass blocks=K, the number of local blocks")
    if plan is not None:  # a plan made for another model would build a net, silently wrong
        check_fingerprint(model, plan)
    # before planning draws random numbers (aux_init="model" builds a fresh model: same seed, same weights)
    init = None if get_rule(plan.config.rule if plan else rule).one_block else found.prepare(model, model_kwargs)
    if plan is None:
        plan = build_plan(model, 1 if blocks is None else blocks, aux_depth=aux_depth, pyramid=pyramid,
                          balance=balance, tail=tail, input_size=input_size, model_name=model_name,
                          num_classes=num_classes, rule=rule, max_bundle=max_bundle, layers=layers, output=output,
                          batch=batch, recompute=recompute, aux_dtype=aux_dtype, aux_head=aux_head,
                          example_inputs=example_inputs)
        _check_head_classes(model, plan, num_classes)
        for note in plan.notes:  # e.g. far fewer layers than blocks: the method barely applies
            warnings.warn(note, AugLocalWarning, stacklevel=2)
    else:
        given = {"blocks": blocks, "aux_depth": aux_depth, "pyramid": pyramid, "balance": balance, "tail": tail,
                 "rule": rule, "input_size": input_size, "model_name": model_name, "max_bundle": max_bundle,
                 "layers": layers, "output": output, "batch": batch, "recompute": recompute, "aux_dtype": aux_dtype,
                 "aux_head": aux_head, "example_inputs": example_inputs}
        clash = [k for k, v in given.items() if v is not _PLANNING_DEFAULTS[k] and (
            isinstance(v, torch.Tensor) or v != _PLANNING_DEFAULTS[k])]
        if clash:
            raise AugLocalError(f"pass either plan= or planning arguments, not both: the plan already fixes "
                                f"{', '.join(f'{k}=' for k in clash)}")
    block_mods, head, layers, layer_head = emit_pieces(model, plan)
    aux_nets = synthesize_aux(model, plan, layers, layer_head, init or aux_init)
    net = AugLocalNet(model, plan, block_mods, head, aux_nets, {"rule": plan.config.rule, "aux_init": aux_init})
    check_units(net)  # a shape problem is an error here, not in the first step
    return net


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
    (``create_kwargs`` go to ``timm.create_model`` too, e.g. ``exportable=True``); otherwise pass a
    freshly constructed ``model`` of the same architecture.

    Example:
        >>> net.save("converted.pt")
        >>> net2 = load_auglocal("converted.pt")
    """
    payload = read_checkpoint(path)
    plan = Plan.from_dict(payload["plan"])
    options = payload.get("options", {})
    created = model is None
    if created:
        c = plan.config
        # auglocal-train records the timm kwargs it used (img_size, norm_layer, ...)
        kwargs = options.get("model_kwargs") or {"num_classes": plan.head.out_shape[-1],
                                                 "in_chans": c.input_size[0]}
        try:
            model = create_model(c.model, **kwargs, **create_kwargs)
        except AugLocalError as exc:
            raise AugLocalError(f"{c.model!r} is not a timm model: pass model= with the architecture "
                                f"to load {path}") from exc
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
