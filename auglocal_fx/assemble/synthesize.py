"""Pass 4b — synthesize: build every block's aux net from the plan, with the plan's rule.

The rule (``rules/``) builds the module; this pass initialises it (``aux_init.AUX_INITS``), and
records in the plan's aux recipes what was built: adapters, parameter count, forward FLOPs and the
bytes it saves for backward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from ..aux_costs import aux_act_bytes
from ..modes import eval_mode
from ..passes.profiler import fake_state
from ..plan import AuxRecipe, Plan
from ..rules import AuxContext, get_rule
from ..runtime.bundles import Chain, PickLast
from ..runtime.memory import SavedTensorMeter
from .adapters import Adapter, norm2d_like
from .aux_init import AUX_INITS, reset_parameters
from .light_head import LightHead
from .widen import WidenedCopy

__all__ = ["AUX_INITS", "AuxFactory", "aux_seed", "reset_parameters", "synthesize_aux"]


def synthesize_aux(model: nn.Module, plan: Plan, layers: list[nn.Module], layer_head: nn.Module,
                   aux_init: str | Callable[[nn.Module], nn.Module] = "model",
                   model_kwargs: dict | None = None, seed: int = 0,
                   lazy: bool = False) -> tuple[list[nn.Module], list[AuxRecipe], AuxFactory | None]:
    """One aux net per ``plan.aux`` recipe (none for a rule without aux nets), each recipe with
    the built net's figures (``adapters``, ``params``, ``flops``, ``act_bytes``) filled in (new
    recipes: the compiler makes the net's plan from both), and the ``AuxFactory`` that built them.
    ``layers`` / ``layer_head`` are the per-layer graph pieces from ``emit_pieces`` that copying
    rules copy. ``aux_init`` is a name in ``AUX_INITS`` (prepared here, with ``model_kwargs``) or an
    init already prepared (``AuxInit.prepare``); ``seed`` seeds each aux net's init (``AuxFactory``).
    ``lazy``: each aux net is built, measured and moved to the meta device at once (one aux net's
    memory at a time); ``AuxFactory`` builds the real ones a process trains later."""
    rule = get_rule(plan.config.rule)
    if rule.one_block:
        return [], list(plan.aux), None
    found = AUX_INITS.lookup(aux_init) if isinstance(aux_init, str) else None
    init = found.prepare(model, model_kwargs) if found is not None else aux_init
    factory = AuxFactory(model, plan, layers, layer_head, init, seed)
    nets, built = [], []
    for k, recipe in enumerate(plan.aux):
        aux = factory(k)
        if rule.copies_layers:  # copies save what the profiled layers do
            flops = _copied_flops(aux, recipe, plan)
            act = aux_act_bytes(plan.layers, plan.head, plan.blocks[recipe.block].layers[-1],
                                recipe.selected_layers, recipe.light_head, plan.config.light_width,
                                plan.config.adapters == "widen")
        else:
            flops, act = _profile(aux, _in_shape(plan, recipe))
        built.append(dataclasses.replace(recipe, adapters=_adapter_summaries(aux),
                                         params=sum(p.numel() for p in aux.parameters()), flops=flops, act_bytes=act))
        nets.append(aux.to("meta") if lazy else aux)
    return nets, built, factory


class AuxFactory:
    """Builds aux net ``k`` of ``plan``, initialised alike whichever process builds it and whichever
    others it builds: each aux net's random draws (adapters, heads, the fallback init) come from its
    own generator state, seeded from ``seed`` and ``k``, and the global stream is left as it was. So
    a pipeline stage that builds only its own aux nets holds what the one-process run holds."""

    def __init__(self, model: nn.Module, plan: Plan, layers: list[nn.Module], layer_head: nn.Module,
                 init: Callable[[nn.Module], nn.Module], seed: int):
        self.plan, self.layers, self.layer_head, self.init, self.seed = plan, layers, layer_head, init, seed
        self.rule = get_rule(plan.config.rule)
        self.classes = plan.head.out_shape[-1] if plan.head.out_shape else 0
        self.norm2d = norm2d_like(model)

    def __call__(self, k: int) -> nn.Module:
        recipe = self.plan.aux[k]
        # seed the CPU generator and those of CUDA devices already in use, each restored afterwards
        # (torch.manual_seed would also queue a seed for CUDA not yet initialised, replacing the user's)
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):
            torch.default_generator.manual_seed(aux_seed(self.seed, k))
            for i in cuda:
                torch.cuda.default_generators[i].manual_seed(aux_seed(self.seed, k))
            aux = self.init(self.rule.build_aux(AuxContext(self.plan, recipe, self.layers, self.layer_head,
                                                           self.classes, self.norm2d)))
        if not self.rule.copies_layers and len(self.plan.layers[self.plan.blocks[recipe.block].layers[-1]].bundle) > 1:
            aux = Chain(PickLast(), aux)  # a head of its own takes the bundle's newest tensor
        return aux


def aux_seed(seed: int, k: int) -> int:
    """Aux net ``k``'s seed: distinct per net, and unrelated between neighbouring run seeds."""
    return (seed * 1_000_003 + 7_919 * (k + 1)) % (2 ** 63)


def _in_shape(plan: Plan, recipe: AuxRecipe) -> list[int]:
    return plan.layers[plan.blocks[recipe.block].layers[-1]].out_shape


def _adapter_summaries(aux: nn.Module) -> list[str]:
    """What each shape adapter of ``aux`` does: a widened copy's label stands for the adapter it holds."""
    inside = {id(m) for w in aux.modules() if isinstance(w, WidenedCopy) for m in w.modules() if m is not w}
    return [m.summary for m in aux.modules() if isinstance(m, Adapter | WidenedCopy) and id(m) not in inside]


def _copied_flops(aux: nn.Module, recipe: AuxRecipe, plan: Plan) -> int:
    """Forward FLOPs per sample of an aux net made of copied layers: they see the shapes they see
    in the backbone, so their FLOPs are the profiled ones; only adapters, widened copies (with the
    adapter they hold) and a light head are counted anew."""
    copied = sum(plan.layers[j].flops for j in recipe.selected_layers)
    if not recipe.light_head:
        copied += plan.head.flops
    widened = [w for w in aux.modules() if isinstance(w, WidenedCopy)]
    inside = {id(m) for w in widened for m in w.modules()}
    anew = [a for a in aux.modules() if isinstance(a, Adapter | LightHead) and id(a) not in inside]
    return (copied + sum(_flops(a, a.in_shape) for a in anew)
            + sum(_flops(w, w.in_shape) - plan.layers[w.layer].flops for w in widened))


def _flops(module: nn.Module, shape: list[int]) -> int:
    return _profile(module, shape)[0]


def _profile(module: nn.Module, shape: list[int]) -> tuple[int, int]:
    """Forward FLOPs of ``module`` for one sample of ``shape``, and the bytes it saves for backward
    (its own parameters left out; eval mode, so batch-norm can take one sample).

    Counted on fake tensors: shapes propagate and the counter sees every op, but nothing is
    computed (running real aux nets was most of ``to_auglocal``'s time).
    """
    counter = FlopCounterMode(display=False)
    with (eval_mode(module), FakeTensorMode(allow_non_fake_inputs=True) as fake,
          fake_state(module, fake) as resident, counter, SavedTensorMeter(exclude_keys=resident) as meter):
        module(fake.from_tensor(torch.zeros(1, *shape)))
    return int(counter.get_total_flops()), meter.peak
