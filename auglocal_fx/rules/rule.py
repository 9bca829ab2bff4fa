"""What a rule is: what trains each block besides the block itself — its aux net and its local
loss — and the registry.

Each rule lives in a module of its own in this package and registers a ``Rule``; callers ask the
rule what they need to know (does it build aux nets, are they copies of later layers, does it
bring its own loss) instead of comparing names, and every list of choices (CLI flags, recipe keys)
comes from ``RULES``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..assemble.adapters import Permute
from ..errors import AugLocalError
from ..passes.layouts import (
    channel_axis,
    has_channels,
    is_channels_last,
    kind_of,
    resolve_layout,
    spatial_axes,
)
from ..plan import AuxRecipe, Plan
from ..registry import Registry

__all__ = ["AuxContext", "MapView", "IMAGENET_MEAN", "IMAGENET_STD", "LocalLoss", "Rule", "RULES", "register_rule", "get_rule"]

# what the input is normalised with when the model says nothing (timm's default, torchvision's too)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class AuxContext:
    """What a rule may use to build block ``recipe.block``'s aux net."""

    plan: Plan
    recipe: AuxRecipe
    layers: list[nn.Module]  # per-layer templates (graph pieces sharing the backbone's weights)
    head: nn.Module  # the model's head as a graph piece
    num_classes: int
    norm2d: Callable[[int], nn.Module] = nn.BatchNorm2d  # the model's kind of 2-d norm (norm2d_like)
    # what the input images were normalised with (per channel), so a loss can restore them;
    # ``AugLocalNet.image_stats`` changes them after conversion (the trainer sets the dataset's)
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD

    @property
    def in_shape(self) -> list[int]:
        """Per-sample shape of the block's output, which the aux net takes."""
        return self.plan.layers[self.plan.blocks[self.recipe.block].layers[-1]].out_shape

    @property
    def in_layout(self) -> str:
        """The layout of the block's output (``layouts.py``: "nchw", "nhwc", "ncl", "ntc", "nc", ...)."""
        return resolve_layout(self.in_shape, self.plan.layers[self.plan.blocks[self.recipe.block].layers[-1]].layouts[-1])

    def view(self, rule: str, maps: tuple[int, ...] = (1, 2, 3)) -> MapView:
        """What the block's output is, for a head built on it; a one-line error naming ``rule`` for a
        tensor whose channel axis is unknown, or a map with a number of spatial axes not in ``maps``."""
        shape, layout = self.in_shape, self.in_layout
        c = channel_axis(layout)
        if not has_channels(shape, layout):
            raise AugLocalError(f"the {rule} rule needs to know which axis of block {self.recipe.block}'s output "
                                f"{shape} holds the channels (its layout is {layout!r}); use rule='auglocal'")
        kind = kind_of(layout)
        spatial = [shape[a] for a in spatial_axes(layout)]
        if kind == "map" and len(spatial) not in maps:
            raise AugLocalError(f"the {rule} rule has no aux net for {len(spatial)}-d maps ({layout}) such as block "
                                f"{self.recipe.block}'s output {shape}; use rule='dgl' or 'auglocal'")
        to_first = Permute(0, len(shape), *range(1, len(shape))) if is_channels_last(layout) else None
        return MapView(kind, shape[c], spatial, to_first)

    @property
    def index(self) -> int:
        """Which aux net this is: 0 .. ``num_aux`` - 1, in block order."""
        return next(i for i, r in enumerate(self.plan.aux) if r.block == self.recipe.block)

    @property
    def num_aux(self) -> int:
        """How many aux nets the net has (M - 1 for M blocks)."""
        return len(self.plan.aux)

    @property
    def image_shape(self) -> list[int]:
        """Per-sample shape of the model's input, e.g. [3, 32, 32]."""
        return list(self.plan.config.input_size)

    @property
    def max_channels(self) -> int:
        """The widest activation any layer hands on (channels of a map, D of tokens)."""
        return max((_channels(layer.out_shape, layer.layouts[-1]) for layer in self.plan.layers), default=0)


@dataclass
class MapView:
    """The block's output as a rule's head sees it: ``kind`` "map" (``channels``, then ``spatial``
    sizes, after ``to_first`` for a channels-last map), "tokens" (``spatial`` = [T]) or "vector"."""

    kind: str
    channels: int
    spatial: list[int]
    to_first: nn.Module | None = None


def _channels(shape: list[int], layout: str) -> int:
    c = channel_axis(resolve_layout(shape, layout)) if shape else None
    return shape[c] if c is not None and c < len(shape) else 0


class LocalLoss(nn.Module):
    """A rule's local loss for one aux net: parameter-free (buffers may hold constants).

    ``loss(out, target, image, criterion)`` returns ``(loss, logits)``: ``out`` is what the aux
    net returned (a tensor or a tuple), ``target`` the labels, ``image`` the model's input batch
    (normalised, as the model sees it), ``criterion`` the step's ``loss_fn`` (cross-entropy by
    default). ``logits`` is what aux accuracy is measured on; ``logits(out)`` gives it without a
    loss (test accuracy). It runs in float32, outside autocast.
    """

    # whether the loss reads ``image`` (a pipeline then sends the input batch to every stage)
    needs_image = False

    def logits(self, out):
        return out[0] if isinstance(out, tuple) else out

    def set_image_stats(self, mean, std) -> None:
        """The per-channel mean and std the input is normalised with (for losses that restore it)."""


@dataclass(frozen=True)
class Rule:
    """A local-learning rule.

    ``build_aux(ctx)`` returns block ``ctx.recipe.block``'s aux net; a rule without one (``bp``)
    trains the whole model as one block. ``copies_layers``: the aux nets are copies of the
    uniformly selected downstream layers, so selection and pyramid depths apply, and their cost is
    known from the backbone's profile. ``build_loss(ctx)`` returns that aux net's ``LocalLoss``;
    without one, an aux net's loss is the step's ``loss_fn`` on its output (cross-entropy).

    Example:
        >>> register_rule(Rule("infopro_r110", "InfoPro with ResNet-110's weights", infopro.build_aux,
        ...                    build_loss=functools.partial(infopro.build_loss, rec=(5, 0.5), cls=(0, 1))))
    """

    name: str
    summary: str  # one line, for --help and the docs
    build_aux: Callable[[AuxContext], nn.Module] | None = None
    copies_layers: bool = False
    build_loss: Callable[[AuxContext], LocalLoss] | None = None

    @property
    def one_block(self) -> bool:
        return self.build_aux is None


RULES: Registry[Rule] = Registry("rule", "a rule")


def register_rule(rule: Rule) -> Rule:
    """Make ``rule`` selectable as ``rule=rule.name`` (CLI ``--rule``, recipe ``conversion.rule``)."""
    return RULES.register(rule.name, rule)


def get_rule(name: str) -> Rule:
    """The registered rule called ``name``, or a one-line error listing the choices."""
    return RULES.lookup(name)
