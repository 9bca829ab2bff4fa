"""What a rule is: what trains each block besides the block itself — its aux net — and the registry.

Each rule lives in a module of its own in this package and registers a ``Rule``; callers ask the
rule what they need to know (does it build aux nets, are they copies of later layers) instead of
comparing names, and every list of choices (CLI flags, recipe keys) comes from ``RULES``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..plan import AuxRecipe, Plan
from ..registry import Registry

__all__ = ["AuxContext", "Rule", "RULES", "register_rule", "get_rule"]


@dataclass
class AuxContext:
    """What a rule may use to build block ``recipe.block``'s aux net."""

    plan: Plan
    recipe: AuxRecipe
    layers: list[nn.Module]  # per-layer templates (graph pieces sharing the backbone's weights)
    head: nn.Module  # the model's head as a graph piece
    num_classes: int
    norm2d: Callable[[int], nn.Module] = nn.BatchNorm2d  # the model's kind of 2-d norm (norm2d_like)

    @property
    def in_shape(self) -> list[int]:
        """Per-sample shape of the block's output, which the aux net takes."""
        return self.plan.layers[self.plan.blocks[self.recipe.block].layers[-1]].out_shape

    @property
    def in_layout(self) -> str:
        """"nhwc" when the block's output is a channels-last map (``in_shape`` is then H, W, C), else ""."""
        return self.plan.layers[self.plan.blocks[self.recipe.block].layers[-1]].layouts[-1]


@dataclass(frozen=True)
class Rule:
    """A local-learning rule.

    ``build_aux(ctx)`` returns block ``ctx.recipe.block``'s aux net; a rule without one (``bp``)
    trains the whole model as one block. ``copies_layers``: the aux nets are copies of the
    uniformly selected downstream layers, so selection and pyramid depths apply, and their cost is
    known from the backbone's profile.
    """

    name: str
    summary: str  # one line, for --help and the README
    build_aux: Callable[[AuxContext], nn.Module] | None = None
    copies_layers: bool = False

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
