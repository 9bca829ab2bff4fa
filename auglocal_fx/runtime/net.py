"""The rewritten, trainable module: gradient-isolated blocks, their aux nets and the model's head.

The per-block backward itself is ``blockwise.blockwise_step``."""

from __future__ import annotations

import copy
import types

import torch
from torch import nn

from ..assemble.shapecheck import check_units, on_meta
from ..errors import AugLocalError
from ..plan import Plan
from ..rules import IMAGENET_MEAN, IMAGENET_STD, AuxContext, get_rule
from .aux_precision import hold_in
from .blockwise import LocalUnit, StepOutput, blockwise_step
from .bundles import call, detach
from .checkpoint import save_net
from .graphs import CapturedStep
from .inputs import as_bundle, check_fixed_args, split_inputs
from .offload import AuxOffload
from .overlap import overlapped_step
from .unit_optim import UnitOptimizers, fused_kwargs

__all__ = ["AugLocalNet", "unique_parameters"]


class AugLocalNet(nn.Module):
    """``model`` cut into ``plan``'s blocks, each with its aux net; parameters shared with ``model``.

    In eval mode ``net(x)`` computes exactly what ``model(x)`` does. In train mode the blocks'
    outputs are detached, and ``training_step`` trains block by block: block i's backward finishes
    (and frees its activations) before block i+1's forward starts.

    Example:
        >>> net = to_auglocal(timm.create_model("resnet50"), blocks=16)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> out = net.training_step(x, y); opt.step(); opt.zero_grad()
    """

    def __init__(self, model: nn.Module, plan: Plan, blocks, head, aux, options: dict):
        super().__init__()
        self.model = model  # the backbone, trained in place
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.aux = nn.ModuleList(hold_in(a, plan.config.aux_dtype) for a in aux)  # aux_precision.py
        self.plan = plan
        self.recompute = plan.config.recompute  # what each unit recomputes in its backward (recompute.py)
        self.options = dict(options)
        # per-sample shapes of the inputs the units are known to run at
        self._sizes_checked = {tuple(size for size, _ in plan.config.input_specs())}
        self._image_stats = _model_image_stats(model, plan.config.input_size[0] if plan.config.input_size else 0)
        # the rule's local loss per aux net (parameter-free: no state-dict keys); empty when the
        # aux nets' outputs are logits for the step's loss_fn
        self.aux_losses = nn.ModuleList(_build_losses(plan, head, *self._image_stats) if aux else [])
        # builds the aux nets a lazy conversion left on the meta device (materialize_aux); None: all built
        self.aux_factory = None

    # -- inference -----------------------------------------------------------------------------
    def forward(self, *inputs, **kwargs) -> torch.Tensor:
        """The model's logits for its input ``x`` (``net(x)``), or for its several inputs
        (``net(ids, mask)``, when it was converted with ``example_inputs=(ids, mask)``). The model's
        other forward arguments were fixed at conversion; passing one with another value is an
        ``AugLocalError``."""
        h, args, kwargs = split_inputs(self.model, self.plan.config.inputs, inputs, kwargs)
        if args or kwargs:
            check_fixed_args(self.model, self.plan.config.inputs, args, kwargs)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            h = call(block, h)
            if self.training and i < last:
                h = detach(h)
        return call(self.head, h)

    def head_outputs(self, x) -> list[torch.Tensor]:
        """Logits of every aux head, then of the model's head: ``[aux_0, ..., aux_{M-2}, final]``.

        One pass through the blocks; used to report each local module's test accuracy. ``x``: the
        input, or a tuple of the model's inputs.
        """
        outs, h = [], as_bundle(self.model, self.plan.config.inputs, x)
        for i, block in enumerate(self.blocks):
            h = call(block, h)
            if i < len(self.aux):
                out = call(self.aux[i], h)
                outs.append(self.aux_losses[i].logits(out) if self.aux_losses else out)
        return outs + [call(self.head, h)]

    # -- the input's normalisation -------------------------------------------------------------
    @property
    def image_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(mean, std)`` per channel that the input images are normalised with; losses that
        compare with the image itself (``infopro``) restore it with these. Defaults to the timm
        model's ``pretrained_cfg`` mean/std, else ImageNet's; set it when your data is normalised
        otherwise (``auglocal-train`` sets the dataset's). Saved with the net (``options``).

        Example:
            >>> net.image_stats = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))  # CIFAR-10
        """
        return self._image_stats

    @image_stats.setter
    def image_stats(self, stats) -> None:
        mean, std = (tuple(float(v) for v in s) for s in stats)
        self.options["image_stats"] = [list(mean), list(std)]  # saved with the net; load_auglocal sets it back
        self._image_stats = (mean, std)
        for loss in self.aux_losses:
            loss.set_image_stats(mean, std)

    # -- training ------------------------------------------------------------------------------
    def local_units(self) -> list[LocalUnit]:
        """The gradient-isolated units, in order: (block i, aux net i), ..., (last block, head).

        They share this net's modules but are not registered as its children (no duplicate state
        dict keys). To train data-parallel, wrap each unit in its own DistributedDataParallel and
        pass the list to ``training_step(units=...)``: each block's gradients are then averaged by
        its own backward, while the next block computes.
        """
        tops = list(self.aux) + [self.head]
        losses = list(self.aux_losses) or [None] * len(self.aux)
        return [LocalUnit(block, top, self.recompute, loss)
                for block, top, loss in zip(self.blocks, tops, [*losses, None])]

    def training_step(self, x: torch.Tensor | tuple, target: torch.Tensor, loss_fn=None,
                      autocast_dtype: torch.dtype | None = None, units=None,
                      scaler: torch.amp.GradScaler | None = None,
                      optimizer: torch.optim.Optimizer | None = None, offload: AuxOffload | None = None,
                      overlap: bool = False) -> StepOutput:
        """Forward and backward, block by block; the caller steps its optimizer afterwards.

        ``x`` is the input batch, or for a model converted with several inputs the tuple of them
        (``(ids, mask)``).

        ``loss_fn(logits, target)`` defaults to cross-entropy and serves every local loss too, or,
        where the rule brings its own local loss (``infopro``, ``predsim``), is handed to it.
        ``autocast_dtype`` (``torch.bfloat16``, ``torch.float16``) runs every forward pass and loss
        under autocast and every backward outside it. ``scaler`` (a ``torch.amp.GradScaler``, for
        float16) scales each unit's loss before its backward; the losses returned are unscaled, and
        the caller runs ``scaler.step(opt); scaler.update()``. ``units`` replaces ``local_units()``,
        e.g. with DDP-wrapped units. ``optimizer``: stepped after each unit's backward, its gradients
        freed at once (at most one unit's gradients alive); the updates equal one ``optimizer.step()``
        after the step for per-parameter optimizers (SGD, Adam, AdamW), and you then call only your
        scheduler. ``offload`` (``offload_aux(optimizer)``): the aux nets live in host memory but for the
        unit that trains and the next. ``overlap``: each block's forward runs beside the previous
        unit's aux net, backward and update, on two CUDA streams (``overlap.py``; the same updates).
        """
        h = as_bundle(self.model, self.plan.config.inputs, x)
        self._check_size(h)
        units = self.local_units() if units is None else units
        image = h[0] if isinstance(h, tuple) else None  # what a rule's loss compares with
        if overlap:
            if scaler is not None:
                raise AugLocalError("training_step(overlap=True, scaler=...): use bfloat16 autocast, which needs no "
                                    "GradScaler, or train without overlap")
            return overlapped_step(units, h, target, loss_fn, autocast_dtype, optimizer, image=image, offload=offload)
        return blockwise_step(units, h, target, loss_fn, autocast_dtype, scaler, optimizer, image=image,
                              offload=offload)

    def _check_size(self, h) -> None:
        """Before the first step at an input size other than the plan's, run every unit on fake
        tensors at that size: it either works (adapters scale as the backbone does) or fails now in
        one line naming the planned size, not with a RuntimeError inside some aux net."""
        sizes = tuple(tuple(x.shape[1:]) for x in (h if isinstance(h, tuple) else (h,)))
        if sizes not in self._sizes_checked:
            check_units(self, sizes)
            self._sizes_checked.add(sizes)

    # -- a process's share (pipeline stages) ------------------------------------------------------
    def materialize_aux(self, indices) -> None:
        """Build aux nets ``indices`` for real, on the backbone's device, where a conversion with
        ``lazy_aux=True`` left them on the meta device: each holds exactly what the eager conversion
        gives (``AuxFactory``). The others stay on the meta device and take no memory."""
        todo = [k for k in indices if on_meta(self.aux[k])]
        if todo and self.aux_factory is None:
            raise AugLocalError("this net's aux nets on the meta device cannot be built any more: convert with "
                                "to_auglocal(..., lazy_aux=True) and call materialize_aux before drop_aux_factory")
        device = next((t.device for t in self.model.parameters() if t.device.type != "meta"), None)
        for k in todo:
            aux = self._build_aux(k)
            self.aux[k] = aux.to(device) if device is not None else aux

    def unit_copy(self, i: int) -> LocalUnit:
        """A copy of local unit ``i`` to run on its own (stage timing), its aux net built for it when
        this net holds that one on the meta device."""
        unit = self.local_units()[i]
        if i < len(self.aux) and on_meta(self.aux[i]) and self.aux_factory is not None:
            return LocalUnit(copy.deepcopy(unit.block), self._build_aux(i), unit.recompute, copy.deepcopy(unit.loss))
        return copy.deepcopy(unit)

    def _build_aux(self, k: int) -> nn.Module:
        """Aux net ``k`` as the eager conversion built it, held in the plan's aux dtype."""
        return hold_in(self.aux_factory(k), self.plan.config.aux_dtype)

    def drop_aux_factory(self) -> None:
        """Let go of what building aux nets needs (a fresh model for ``aux_init="model"``, the
        per-layer graph pieces): call once this process has built its aux nets."""
        self.aux_factory = None

    def unit_optimizers(self, optimizer_cls: type[torch.optim.Optimizer] = torch.optim.SGD, units=None,
                        **kwargs) -> UnitOptimizers:
        """One ``optimizer_cls(params, **kwargs)`` per local unit over that unit's own parameters, as one
        optimizer to schedulers and checkpoints (``UnitOptimizers``); on CUDA the fused implementation
        unless ``fused`` / ``foreach`` is given. ``training_step(optimizer=...)`` then steps each unit's
        right after its backward, without walking the other units' parameters. ``units``: the units it
        steps (default ``local_units()``; DDP-wrapped ones for data-parallel training).

        Example:
            >>> opt = net.unit_optimizers(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True)
            >>> out = net.training_step(x, y, optimizer=opt)
        """
        device = next((p.device for p in self.parameters() if p.device.type != "meta"), torch.device("cpu"))
        if "fused" not in kwargs and "foreach" not in kwargs:
            kwargs.update(fused_kwargs(optimizer_cls, device))
        return UnitOptimizers(self.local_units() if units is None else units,
                              lambda params: optimizer_cls(params, **kwargs), order=list(self.parameters()))

    def capture(self, example_batch: tuple, optimizer: UnitOptimizers, *, loss_fn=None,
                autocast_dtype: torch.dtype | None = None, clip_grad: float | None = None, warmup: int = 3,
                units=None, log=print) -> CapturedStep:
        """A training step in which every local unit's whole step (forward, local loss, backward, its
        optimizer update) replays as one CUDA graph (``graphs.py``): one launch per unit instead of
        hundreds. ``example_batch``: ``(x, y)`` of the shape to capture at (not trained on);
        ``optimizer``: the units' own (``unit_optimizers``; fused on CUDA). The first ``warmup``
        batches run eagerly, the next is captured; a batch of another shape runs eagerly. Returns the
        step: ``step(x, y)`` gives a ``StepOutput`` whose losses are device tensors. Needs a CUDA device.

        Example:
            >>> net.cuda(); opt = net.unit_optimizers(torch.optim.SGD, lr=0.1, momentum=0.9)
            >>> step = net.capture((x, y), opt, autocast_dtype=torch.bfloat16)
            >>> for x, y in loader: out = step(x.cuda(), y.cuda()); sched.step()
        """
        return CapturedStep(self.local_units() if units is None else units, optimizer, example_batch,
                            loss_fn=loss_fn, autocast_dtype=autocast_dtype, clip_grad=clip_grad, warmup=warmup,
                            log=log)

    def offload_aux(self, optimizer: UnitOptimizers, units=None) -> AuxOffload:
        """Keep every aux net's weights and optimizer state in pinned host memory but for the unit that
        trains and the next (``offload.py``); pass the result to ``training_step(offload=...)`` with
        the same ``optimizer`` (the units' own, ``unit_optimizers``), made after any
        ``optimizer.load_state_dict``. Evaluate every aux head inside ``with offload.resident():``;
        call ``offload.synchronize()`` before reading the aux nets' weights on the CPU. Needs a CUDA
        device.

        Example:
            >>> net.cuda(); opt = net.unit_optimizers(torch.optim.SGD, lr=0.1, momentum=0.9)
            >>> off = net.offload_aux(opt)
            >>> out = net.training_step(x, y, optimizer=opt, offload=off)
        """
        device = next((p.device for p in self.model.parameters() if p.device.type != "meta"), None)
        return AuxOffload(self.local_units() if units is None else units, optimizer, device)

    # -- parameter groups ----------------------------------------------------------------------
    def backbone(self) -> nn.Module:
        """The original model object, whose parameters the blocks train in place."""
        return self.model

    def aux_parameters(self):
        """Parameters of all aux nets (none for the ``bp`` rule)."""
        return self.aux.parameters()

    def block_parameters(self, i: int) -> list[nn.Parameter]:
        """Parameters trained by block ``i``'s loss: the block's own (the last block: plus the head)."""
        return unique_parameters([self.blocks[i]] + ([self.head] if i == len(self.blocks) - 1 else []))

    # -- torch.compile -------------------------------------------------------------------------
    def compile(self, *args, **kwargs) -> None:
        """Compile every block, aux net and the head in place with ``torch.compile(*args, **kwargs)``.

        ``training_step`` (and ``net(x)``) then run the compiled modules, each compiled on its
        first call in each mode. ``torch.compile(net)`` instead returns a wrapper that compiles
        ``net(x)`` only: its ``training_step`` is this net's and runs uncompiled.

        Example:
            >>> net.compile()  # torch.compile's arguments: mode=..., backend=..., dynamic=...
            >>> out = net.training_step(x, y)
        """
        for module in [*self.blocks, *self.aux, self.head]:
            _own_forward(module)
            module.compile(*args, **kwargs)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def save(self, path) -> None:
        """Write weights, plan and options to ``path`` atomically; read back with ``load_auglocal``."""
        if on_meta(self):
            raise AugLocalError(f"cannot save {path}: part of this net is on the meta device (a lazy conversion's "
                                "aux nets, or another pipeline stage's blocks); call materialize_aux(range(len(net.aux))) "
                                "first, or save from the run's checkpoint")
        save_net(self, path)


def unique_parameters(modules) -> list[nn.Parameter]:
    """The parameters of ``modules``, each once (blocks, aux nets and heads may share some)."""
    seen, out = set(), []
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _model_image_stats(model: nn.Module, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """timm's ``pretrained_cfg`` mean/std when they fit the input's channels, else ImageNet's (one
    channel: their average)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None or len(mean) != channels or len(std) != channels:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if channels != len(mean):
            mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _build_losses(plan: Plan, head: nn.Module, mean: tuple, std: tuple) -> list[nn.Module]:
    """The rule's ``LocalLoss`` for every aux net, or none when the rule has no loss of its own."""
    rule = get_rule(plan.config.rule)
    if rule.build_loss is None:
        return []
    classes = plan.head.out_shape[-1] if plan.head.out_shape else 0
    return [rule.build_loss(AuxContext(plan, recipe, [], head, classes, image_mean=mean, image_std=std))
            for recipe in plan.aux]


def _own_forward(module: nn.Module) -> None:
    """Give ``module`` a forward with a code object of its own before it is compiled.

    torch.compile keeps a code object's compiled graphs together, at most ``recompile_limit`` (8)
    of them; every block runs ``DualModeGraph.forward`` and every aux net ``Chain.forward``, so from
    the ninth block on the rest would fall back to eager, silently. A copy of the code is a cache of
    its own.
    """
    fn = type(module).forward
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    module.forward = types.MethodType(own, module)
