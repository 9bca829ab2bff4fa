"""The plan: one plain dataclass that travels between passes, prints as a table, round-trips YAML."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import yaml

from .errors import AugLocalError, first_line
from .models import check_num_classes
from .options import option
from .passes.cuts import MAX_BUNDLE

__all__ = ["LayerInfo", "BlockInfo", "AuxRecipe", "PlanConfig", "Plan", "is_size_kind", "check_input_size",
           "check_pattern_list", "available_memory"]


def is_size_kind(kind: str) -> bool:
    """A ``crossing_dtypes`` entry for a slot that holds no tensor: a batch size ("batch"), a fixed
    size ("int=V") or None ("none")."""
    return kind in ("batch", "none") or kind.startswith("int=")


@dataclass
class LayerInfo:
    """A layer as the paper counts it (stem, residual block, transformer block), or the head."""

    name: str
    boundary: str  # fx node whose value leaves the layer ("output" for the head)
    in_shape: list[int]
    out_shape: list[int]
    params: int
    flops: int  # forward FLOPs for one sample
    act_bytes: int  # bytes autograd saves for backward, one sample
    # every tensor handed on after the layer (a bundle when more than one), oldest first; the last
    # is out_shape. Empty in plans written before bundles: one tensor, out_shape.
    crossing: list[list[int]] = field(default_factory=list)
    crossing_dtypes: list[str] = field(default_factory=list)  # e.g. "float32", "bool" (a mask)
    carried_bytes: int = 0  # per sample: the tensors the layer takes besides the newest (skips held while it runs)
    # per slot: its layout, measured ("nchw", "nhwc", "ncl", "ntc", "nc", ... layouts.py; "?" unknown, "" a
    # size); plans written before held "nhwc" for channels-last maps and "" for any other tensor
    crossing_layouts: list[str] = field(default_factory=list)
    # per sample: bytes of what this layer saves for backward that the layer before saves too (the
    # tensor handed between them, saved on both sides): counted once when both run in one block
    shared_bytes: int = 0
    # the plain convolutions (nn.ConvNd, one group) that read the layer's input, one tensor, directly:
    # [in channels, out channels, kernel elements, bias 0/1] each; a widened copy rebuilds them
    # (PlanConfig.adapters); and what else reads that input: "" nothing, "reads", "saves" (for backward)
    entry_convs: list[list[int]] = field(default_factory=list)
    entry_others: str = "reads"

    @property
    def layouts(self) -> list[str]:
        """Per slot of ``bundle``: its layout (``layouts.resolve_layout`` reads the "" of older plans)."""
        return self.crossing_layouts or [""] * len(self.bundle)

    @property
    def bundle(self) -> list[list[int]]:
        """Per-sample shapes of the tensors that leave the layer, oldest first."""
        return self.crossing or [self.out_shape]

    @property
    def kinds(self) -> list[str]:
        """Per slot of ``bundle``: its dtype or size kind (plans before dtypes were kept: float32)."""
        return self.crossing_dtypes or ["float32"] * len(self.bundle)

    @property
    def bundle_bytes(self) -> int:
        """Per-sample bytes of the tensors that leave the layer (sizes riding along are free)."""
        import torch  # for dtype sizes only: the plan module itself stays plain data

        return sum(0 if is_size_kind(d) else getattr(torch, d).itemsize * math.prod(t)
                   for t, d in zip(self.bundle, self.kinds))

    @property
    def tensors(self) -> int:
        """How many tensors leave the layer (sizes riding along not counted)."""
        return sum(not is_size_kind(d) for d in self.crossing_dtypes) or 1


@dataclass
class BlockInfo:
    """A gradient-isolated local block: consecutive layer indices."""

    index: int
    layers: list[int]


@dataclass
class AuxRecipe:
    """Aux net of one block: copies of ``selected_layers`` (pyramid ``depth``) then the head, or a
    light head (``light_head``: the plan's ``aux_head`` policy found the model's head too heavy to copy)."""

    block: int
    selected_layers: list[int]
    depth: int
    light_head: bool = False
    adapters: list[str] = field(default_factory=list)  # filled when the aux net is built
    params: int = 0
    flops: int = 0  # forward FLOPs for one sample
    act_bytes: int = 0  # bytes saved for backward, one sample (filled when built)


def _check_model_name(value) -> None:
    if value is not None and not isinstance(value, str):
        raise AugLocalError.bad_value("model_name", value, "is not a name: give a string, e.g. 'resnet50'")


def _check_blocks(value) -> None:  # its upper bound is the model's layer count: build_plan checks it
    if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1):
        raise AugLocalError.bad_value("blocks", value, "is not a number of blocks: give an integer >= 1")


def check_input_size(size) -> tuple[int, ...]:
    """``size`` as a tuple of positive ints (per sample, no batch), or a one-line error."""
    try:
        size = tuple(size)
    except TypeError:
        size = (size,)
    # any integer type (NumPy's, a 0-d tensor's .item()) is fine; bools and floats are not
    if not size or any(not isinstance(s, numbers.Integral) or isinstance(s, bool) or s < 1 for s in size):
        raise AugLocalError.bad_value("input_size", size, "is not a shape: give positive integers "
                                      "without the batch, e.g. (3, 224, 224)")
    size = tuple(int(s) for s in size)
    # profiling runs on fake tensors, but its one-sample input is real: refuse before allocating
    # what cannot fit, rather than die with an allocator traceback (or the OOM killer)
    need, have = 4 * math.prod(size), available_memory()
    if have is not None and need > have:
        raise AugLocalError.bad_value("input_size", size, f"needs {need / 2**30:,.1f} GiB for one float32 sample, "
                                      f"more than the {have / 2**30:,.1f} GiB of memory available; give a smaller size")
    return size


def available_memory() -> int | None:
    """Bytes of memory this process could still allocate: Linux's ``MemAvailable``, else the
    physical memory (macOS), else None (unknown: no check)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def _check_input_size(value) -> None:
    if value is not None:
        check_input_size(value)


def check_pattern_list(patterns) -> None:
    """Refuse ``layers=`` that is not a non-empty list of module-path globs (None: automatic)."""
    if patterns is None:
        return
    if isinstance(patterns, str) or not isinstance(patterns, Sequence) or not patterns or \
            not all(isinstance(p, str) and p for p in patterns):
        raise AugLocalError.bad_value("layers", patterns, "is not a list of module-path patterns, "
                                      "e.g. ['encoder.layers.*'] (fnmatch globs over model.named_modules())")


def _check_output(value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, str | int)):
        raise AugLocalError.bad_value("output", value, "is not a key, index or field name of the model's output")


@dataclass
class PlanConfig:
    """Every planning option, with its default, check and help (``options.py``), and what planning
    measured about the model's input. ``to_auglocal(model, PlanConfig(blocks=16, aux_depth=3))``
    takes it; ``auglocal-convert``'s flags and a recipe's ``conversion:`` keys are made from it."""

    model: str | None = option(None, "the model's name (timm's; default: the registered name or the class name)",
                               check=_check_model_name, cli=False, recipe=False, keyword="model_name")
    blocks: int | None = option(None, "number of local blocks K", check=_check_blocks,
                                cli={"short": "-k", "required": True})
    aux_depth: int = option(2, "aux net depth d: layers each aux net copies", low=0)
    pyramid: float = option(0.5, "pyramidal depth coefficient tau in [0, 1]; 0 = off", low=0, most=1,
                            problem="is outside [0, 1]: the pyramid coefficient tau goes from 0 (off) to 1")
    balance: str = option("layers", "how layers are shared out among blocks", choices="passes.partition:BALANCERS",
                          kind="a balance")
    tail: str = option("exact", "exact: K blocks; reference: the paper's code, last d+1 blocks merged (M = K - d)",
                       choices="passes.selection:TAILS", kind="a tail")
    rule: str = option("auglocal", "what trains each block", choices="rules:RULES", kind="a rule")
    input_size: list[int] | None = option(None, "input size without the batch (default: the model's "
                                          "pretrained_cfg input_size)", check=_check_input_size,
                                          cli={"nargs": 3, "metavar": ("C", "H", "W")}, recipe=False)
    num_classes: int | None = option(None, "classifier classes (default: the model's)", check=check_num_classes,
                                     recipe=False)
    max_bundle: int = option(MAX_BUNDLE, "the most tensors a cut between two layers may hand on", low=1)
    layers: list[str] | None = option(None, "name the layers yourself: module paths as globs, e.g. stem "
                                      "'stages.*.blocks.*' (default: timm's group_matcher / the module tree, "
                                      "refined to repeated blocks)", check=check_pattern_list,
                                      cli={"nargs": "+", "metavar": "GLOB"})
    output: str | int | None = option(None, "the entry of a dict / tuple / dataclass output that trains "
                                      "(default: 'logits', else the first)", check=_check_output, cli=False,
                                      recipe=False)
    batch: int = option(32, "the batch size the memory estimate and balance=memory assume", low=1,
                        problem="is not a batch size: give an integer >= 1", recipe=False)
    recompute: str = option("none", "lower memory: block recomputes each block's forward in its backward "
                            "(one more block forward per step), aux the aux net's; none: the method as published",
                            choices="runtime.recompute:RECOMPUTE", kind="a recompute option")
    aux_dtype: str = option("float32", "lower memory: bfloat16 holds aux nets' weights, gradients and optimizer "
                            "state in half the bytes", choices="runtime.aux_precision:AUX_DTYPES", kind="an aux dtype")
    aux_head: str = option("auto", "what aux nets end with: copy: the model's head; light: global pool + small "
                           "MLP; auto: light when the head holds over a quarter of the parameters (VGG), else copy",
                           choices="assemble.light_head:AUX_HEADS", kind="an aux head policy")
    aux_init: str = option("model", "how aux nets' weights start", choices="assemble.aux_init:AUX_INITS", kind="an aux init")
    adapters: str = option("widen", "where a copied layer sees another shape than in the backbone: widen: its "
                           "first convolutions take the aux net's tensor (input channels, stride), as the reference "
                           "builds them, an adapter only on its other paths; front: an adapter in front of an "
                           "unchanged copy", choices="assemble.widen:ADAPTER_MODES", kind="an adapter mode")
    light_width: int = option(512, "hidden width of a light aux head's MLP (aux_head light, or auto on a heavy head; "
                              "512 as the reference's VGG aux heads)", low=1)
    frontend: str = option("auto", "how the model is traced: fx (torch.fx symbolic trace), export (torch.export, "
                           "non-strict: through Python fx cannot read, Hugging Face transformers), auto: fx, and "
                           "export where fx fails", choices="passes.frontend:FRONTENDS", kind="a front end")
    # measured by planning, not options
    traced_with: str = option("fx", measured=True)  # the front end that traced the model: "fx" or "export"
    input_dtype: str = option("float32", measured=True)  # the model's input: "float32" images, "int64" token ids
    input_layout: str = option("", measured=True)  # the input's measured layout ("nchw", "ncl", "nl" for ids, ...)
    # the model's inputs after the first (example_inputs=(ids, mask)): per input {"size": per-sample
    # shape, "dtype": "int64", "layout": "nl"}; empty for a model of one input
    extra_inputs: list[dict] = option(measured=True, factory=list)

    @property
    def inputs(self) -> int:
        """How many tensors the model takes (its forward's first arguments)."""
        return 1 + len(self.extra_inputs)

    def input_specs(self, size=None) -> list[tuple[tuple[int, ...], str]]:
        """``(per-sample shape, dtype)`` of every input; ``size`` replaces the first input's."""
        first = (tuple(size if size is not None else self.input_size), self.input_dtype)
        return [first, *((tuple(x["size"]), x["dtype"]) for x in self.extra_inputs)]


@dataclass
class Plan:
    """Layers, blocks and aux recipes of one model. ``Plan.from_dict(p.to_dict()) == p``."""

    config: PlanConfig
    layers: list[LayerInfo]
    head: LayerInfo
    blocks: list[BlockInfo]
    aux: list[AuxRecipe]
    notes: list[str] = field(default_factory=list)  # one line each: what the user should know (coarse layers)
    # what the plan was made on (fingerprint.py): digests of each layer's parameter names and shapes, the
    # head's, the model's, and the input size. Empty in plans written before fingerprints: not checked.
    fingerprint: dict = field(default_factory=dict)

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        try:
            return cls(
                # a plan written before copies were widened built adapters in front: it still does
                config=PlanConfig(**{"adapters": "front", **d["config"]}),
                layers=[LayerInfo(**x) for x in d["layers"]],
                head=LayerInfo(**d["head"]),
                blocks=[BlockInfo(**x) for x in d["blocks"]],
                aux=[AuxRecipe(**x) for x in d["aux"]],
                notes=list(d.get("notes", [])),
                fingerprint=dict(d.get("fingerprint") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise AugLocalError(f"not an auglocal-fx plan: {exc}; write one with auglocal-convert --out") from exc

    def to_json(self, memory: dict | None = None) -> str:
        """JSON of ``to_dict()``; with ``memory`` (``costs.memory_summary``) under that key too
        (derived: ``from_dict`` ignores it)."""
        return json.dumps(self._document(memory), indent=2)

    def to_yaml(self, memory: dict | None = None) -> str:
        return yaml.safe_dump(self._document(memory), sort_keys=False)

    def _document(self, memory: dict | None) -> dict:
        return self.to_dict() if memory is None else {**self.to_dict(), "memory": memory}

    @classmethod
    def from_yaml(cls, text: str) -> Plan:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise AugLocalError(f"plan is not valid YAML: {first_line(exc, with_type=False)}") from exc
        if not isinstance(data, dict):
            raise AugLocalError("plan YAML must be a mapping with config, layers, head, blocks, aux")
        return cls.from_dict(data)

    # -- derived figures ----------------------------------------------------------------------
    def block_sum(self, block: BlockInfo, attr: str) -> int:
        return sum(getattr(self.layers[i], attr) for i in block.layers)

    def block_act_bytes(self, block: BlockInfo) -> int:
        """Activation bytes per sample the block's layers save, each storage once."""
        return self.block_sum(block, "act_bytes") - sum(self.layers[i].shared_bytes for i in block.layers[1:])

    def bundle_into(self, j: int) -> list[list[int]]:
        """Shapes of the tensors layer ``j`` takes (``j == len(layers)``: the head), oldest first."""
        return self.layers[j - 1].bundle if j > 0 else [self.layers[0].in_shape]

    def layouts_into(self, j: int) -> list[str]:
        """``LayerInfo.layouts`` of the bundle layer ``j`` takes (the model's input: its measured layout)."""
        return self.layers[j - 1].layouts if j > 0 else [self.config.input_layout]

    def aux_for(self, block_index: int) -> AuxRecipe | None:
        return next((a for a in self.aux if a.block == block_index), None)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    # -- display --------------------------------------------------------------------------------
    def __str__(self) -> str:
        """The plan as a text table (``print(plan)``); ``repr`` stays the dataclass's."""
        return str(self.table())

    def table(self, memory: dict | None = None, wide: bool = False):
        """The plan as a ``rich`` table that prints as text too (``plan_table.py``): one row per
        block with its aux recipe; with ``memory`` (``costs.memory_summary``) each unit's activations
        and the step's estimated peak; compact columns unless ``wide``."""
        from .plan_table import plan_table  # display, not data: loaded when a table is asked for

        return plan_table(self, memory, wide)
