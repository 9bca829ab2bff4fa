"""Pass 1, second front end — trace with ``torch.export`` where ``torch.fx`` cannot.

``torch.export.export(strict=False)`` runs the model's Python as Python and records ATen operators,
so it traces what fx's proxies cannot (a generator over ``qkv(x).split(C, 2)``, Hugging Face
transformers' forward code). Its graph is not fx's, though: every module is inlined into ATen
operators, parameters are lifted to inputs, and each node only remembers the modules it ran in
(``meta["nn_module_stack"]``). This pass turns it into the graph the later passes read, the one fx
gives (``trace.trace``):

- every call of a module fx keeps whole (torch.nn's own modules, timm's not-traced ones, drop-path;
  ``trace.make_tracer().is_leaf_module``) that takes one input tensor becomes one ``call_module`` node
  on the model's own module again, so the layers' weights stay the model's trainable parameters and
  dropout and batch norm decide train or eval behaviour when they run, not at export time;
- what runs between such calls (residual adds, reshapes, attention arithmetic) stays as ATen
  operators, reading the model's parameters and buffers through ``get_attr``;
- ``nn_module_stack`` is written as fx writes it (module path -> (path, class)), so the layer rules are
  the same rules;
- the batch axis of every input is exported symbolic (``Dim.AUTO`` on a batch of two), so the graph
  takes any batch; reads of it (``sym_size``) are shape reads that may ride along a cut (``cuts.py``).

The model is exported in its current train/eval mode, as fx traces it; ``emit`` exports both.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
from collections import OrderedDict

import torch
import torch.fx as fx
from torch import nn
from torch.export import Dim
from torch.export.graph_signature import InputKind, OutputKind

from ..errors import AugLocalError, first_line
from .cuts import MODEL_INPUT
from .trace import (
    _TRACE_THROUGH,
    finish_trace,
    make_tracer,
    positional_names,
    specialised_args,
    training_kwargs,
)

__all__ = ["export_trace"]

_CPU = torch.device("cpu")
_LIFTED = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


def export_trace(model: nn.Module, examples: tuple[torch.Tensor, ...],
                 output: str | int | None = None) -> fx.GraphModule:
    """``model`` exported with ``torch.export`` (non-strict) on ``examples`` (its first inputs, batch
    first; the batch axis is made symbolic), as the GraphModule ``trace.trace`` returns: its first
    placeholders the inputs (``meta[MODEL_INPUT]``), its output the one ``output`` (``select_output``;
    a Hugging Face model's ``logits``), every parameter and leaf module the model's own."""
    inputs = len(examples)
    concrete = specialised_args(model, inputs)
    concrete.update(training_kwargs(model))
    names = positional_names(model)[:inputs]
    on_meta = any(p.is_meta for p in model.parameters())  # a model built on the meta device: traced there
    args = tuple(_batch_of_two(x).to("meta") if on_meta else _batch_of_two(x) for x in examples)
    dynamic = {**{n: {0: Dim.AUTO} for n in names}, **{k: None for k in concrete}}
    try:
        with _calls_with_more_than_one_argument(model) as several:
            ep = torch.export.export(model, args, kwargs=concrete, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:  # noqa: BLE001 - whatever the model's code raises under export is the user's to see
        raise AugLocalError(f"torch.export cannot trace {type(model).__name__}: {_where(exc)}"
                            f"{first_line(exc, 200).rstrip('.')}. Hint: the model must run on the example inputs, with "
                            "its batch axis free (no code that needs a batch of one)") from exc
    root, graph = _rebuild(model, ep, names, concrete, several)
    if on_meta:  # tensors the forward makes or moves (positions, masks) on the CPU, as a CPU trace has them
        cpu = functools.partial(fx.node.map_aggregate, fn=lambda a: _CPU if isinstance(a, torch.device) and a.type == "meta" else a)
        for n in graph.nodes:
            n.args, n.kwargs = cpu(n.args), cpu(n.kwargs)
    return finish_trace(root, graph, model, output)


@contextlib.contextmanager
def _calls_with_more_than_one_argument(model: nn.Module):
    """The paths of the modules that are called, during the export, with more than one argument or
    with keywords (``up(y, output_size=...)``): rebuilt as ``module(x)`` they would compute something
    else, so they stay as their operators."""
    several: set[str] = set()

    def hook(path):
        def record(_module, args, kwargs):
            if len(args) != 1 or kwargs:
                several.add(path)
        return record

    handles = [m.register_forward_pre_hook(hook(path), with_kwargs=True) for path, m in model.named_modules() if path]
    try:
        yield several
    finally:
        for h in handles:
            h.remove()


def _batch_of_two(x: torch.Tensor) -> torch.Tensor:
    """Two samples: export specialises an axis of size 1, so a batch of one would fix the batch."""
    return torch.cat([x[:1], x[:1]]) if x.shape[0] == 1 else x


def _where(exc: Exception) -> str:
    """``in Attention.forward: `` for the innermost module of the model's own code (not torch's) the
    error was raised in, else ""."""
    for frame in reversed(inspect.getinnerframes(exc.__traceback__, 0) if exc.__traceback__ else []):
        module = frame.frame.f_locals.get("self")
        if isinstance(module, nn.Module) and not type(module).__module__.startswith("torch."):
            return f"in {type(module).__name__}.forward: "
    return ""


def _rebuild(model: nn.Module, ep, names: list[str], concrete: dict,
             several: set[str]) -> tuple[dict, fx.Graph]:
    sig = ep.graph_signature
    lifted = {s.arg.name: s.target for s in sig.input_specs if s.kind in _LIFTED}
    user = [s.arg.name for s in sig.input_specs if s.kind == InputKind.USER_INPUT]
    root: dict = {}
    leaves = _leaf_calls(model, ep.graph, lifted, several)
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    done: set[fx.Node] = set()
    sizes: list[fx.Node] = []  # integer arithmetic on sizes (not the reads of the batch size)
    for n in ep.graph.nodes:
        if n in done:
            continue
        if n.op == "placeholder":
            if n.name in lifted:
                target = lifted[n.name]
                root[target] = _attr(model, ep, target)
                env[n] = g.get_attr(target)
            elif n.name in user[: len(names)]:  # one of the model's inputs, named as forward names it
                env[n] = g.placeholder(names[user.index(n.name)])
                env[n].meta[MODEL_INPUT] = True
            else:  # a specialised argument: it keeps its default, as fx's concrete_args do
                env[n] = g.placeholder(n.name, default_value=concrete.get(n.name))
            env[n].meta.update(_meta(n, model))
            continue
        if n.op == "output":
            g.output(_structure(_user_outputs(ep, n, env), ep.call_spec.out_spec))
            continue
        if n.op == "get_attr":  # a graph export made of a region (a higher-order op's body, torch.cond's branch)
            root[n.target] = operator.attrgetter(n.target)(ep.graph_module)
        call = leaves.get(n)
        if call is not None:  # the whole call of a leaf module: one call_module node on the model's module
            path, nodes, arg = call
            root[path] = model.get_submodule(path)
            new = g.create_node("call_module", path, (env[arg],), {}, name=path.replace(".", "_"))
            new.meta.update(_meta(nodes[-1], model, upto=path))
            env[nodes[-1]] = new
            done.update(nodes)
            continue
        # named afresh from its target, counting only this graph's nodes: export's names count the
        # operators inside leaf calls too, which differ between train and eval (batch norm's checks),
        # and the cut boundaries are node names both graphs must share
        env[n] = g.create_node(n.op, n.target, fx.map_arg(n.args, env.__getitem__),
                               fx.map_arg(n.kwargs, env.__getitem__))
        env[n].meta = _meta(n, model)
        if isinstance(n.meta.get("val"), int | torch.SymInt) and n.target is not torch.ops.aten.sym_size.int:
            sizes.append(env[n])
    for n in [n for n in g.nodes if n.op == "get_attr" and not n.users]:  # read only inside a leaf call
        g.erase_node(n)
        root.pop(n.target, None)
    _size_per_user(g, sizes)
    return root, g


def _size_per_user(g: fx.Graph, sizes: list[fx.Node]) -> None:
    """Give every user of a size computed from the batch (``B * T``) its own copy of the arithmetic.

    Export computes such a size once and every later layer reads it, so it would be live across
    every cut, where fx recomputes it in each module that needs it; only the batch reads themselves
    (``sym_size``) cross cuts, as the shape reads fx's cuts let ride along."""
    for n in reversed(sizes):  # the latest first: the copies' inputs get their own copies after
        for user in list(n.users):
            with g.inserting_before(user):
                copy = g.node_copy(n)
            user.replace_input_with(n, copy)
        g.erase_node(n)


def _user_outputs(ep, output: fx.Node, env: dict) -> list:
    """The model's own outputs. A buffer written outside every module kept whole would be an extra
    output of export's graph that nothing here writes back: refused, naming the buffer."""
    specs = ep.graph_signature.output_specs
    written = [s.target for s in specs if s.kind != OutputKind.USER_OUTPUT]
    if written:
        raise AugLocalError(f"the model's own code writes {', '.join(map(str, written))} in its forward, which the "
                            "torch.export front end cannot give back to the model; keep that state in a module of "
                            "its own, or use frontend='fx'")
    return [env[a] if isinstance(a, fx.Node) else a for a in output.args[0]]


def _attr(model: nn.Module, ep, target: str):
    """The model's own parameter / buffer / tensor attribute ``target``, or export's lifted constant."""
    try:
        return operator.attrgetter(target)(model)
    except AttributeError:
        return ep.constants[target]


def _structure(outs: list, spec):
    """The output as a dict of its named entries (a dict, a Hugging Face ModelOutput, a dataclass), a
    tuple, or the one value, from export's flat outputs and their tree spec."""
    if spec.num_leaves == 1 and spec.is_leaf():
        return outs[0]
    children, start = [], 0
    for child in (spec.children() if hasattr(spec, "children") else spec.children_specs):
        children.append(_structure(outs[start: start + child.num_leaves], child) if child.num_leaves else None)
        start += child.num_leaves
    context = spec.context
    if isinstance(context, list) and len(context) == 2 and all(isinstance(c, list) for c in context):
        context = context[0]  # a dataclass flattened by torch's default: [field names, None fields]
    if isinstance(context, list | tuple) and len(context) == len(children) and all(isinstance(k, str) for k in context):
        return dict(zip(context, children))  # a dict, a ModelOutput, a dataclass: entries by name
    return tuple(children)


def _meta(n: fx.Node, model: nn.Module, upto: str | None = None) -> dict:
    """fx's meta for a node of export's graph: ``nn_module_stack`` as fx writes it (path -> (path,
    class)), down to ``upto`` (a leaf call's module: fx's ``call_module`` node has nothing below it),
    the source line; nothing of export's own (its fake values, which later passes replace)."""
    stack = OrderedDict()
    for _key, (path, _cls) in n.meta.get("nn_module_stack", {}).items():
        if upto is not None and upto in stack:
            break
        if path and path not in stack:
            try:
                stack[path] = (path, type(model.get_submodule(path)))
            except AttributeError:  # a path export writes for a module it does not own (a lifted call)
                continue
    meta = {"nn_module_stack": stack} if stack else {}
    if "stack_trace" in n.meta:
        meta["stack_trace"] = n.meta["stack_trace"]
    return meta


def _leaf_calls(model: nn.Module, graph: fx.Graph, lifted: dict[str, str],
                several: set[str]) -> dict[fx.Node, tuple[str, list[fx.Node], fx.Node]]:
    """Each call of a module fx keeps whole that can be one ``call_module`` node again: the nodes it
    ran (a run of consecutive nodes under one ``nn_module_stack`` entry), keyed by its first node, with
    the module path and the one tensor it took. A call that read another tensor than its own weights,
    handed out more than one value, or whose module was called with more than one argument
    (``several``) or needs more stays as its operators.

    Reads of a size (``sym_size``) are never part of a call: export makes one such node at the first
    use of a size and every later use shares it (batch norm's check of the batch, then every
    ``view(B, ...)``), which would keep a call from being one node in one mode and not the other."""
    tracer = make_tracer()
    runs: list[tuple[str, str, list[fx.Node]]] = []
    last = None  # the last operator seen, size reads skipped
    for n in graph.nodes:
        if n.op != "call_function" or n.target is torch.ops.aten.sym_size.int:
            continue
        entry = _outermost_leaf(model, tracer, n)
        if entry is not None and runs and runs[-1][0] == entry[0] and runs[-1][2][-1] is last:
            runs[-1][2].append(n)
        elif entry is not None:
            runs.append((*entry, [n]))
        last = n
    calls = {}
    for _key, path, nodes in runs:
        members = set(nodes)
        outside = {a for m in nodes for a in m.all_input_nodes if a not in members}
        own = f"{path}."
        # what the call read besides its module's own weights: one tensor (and sizes read off it)
        tensors = [a for a in outside if not lifted.get(a.name, "").startswith(own)
                   and isinstance(a.meta.get("val"), torch.Tensor)]
        handed = [m for m in nodes if any(u not in members for u in m.users)]
        if (len(tensors) != 1 or handed != [nodes[-1]] or path in several
                or not _one_argument(model.get_submodule(path))):
            continue
        calls[nodes[0]] = (path, nodes, tensors[0])
    return calls


def _outermost_leaf(model: nn.Module, tracer, n: fx.Node) -> tuple[str, str] | None:
    """(stack key, module path) of the outermost module in ``n``'s stack that fx keeps whole."""
    for key, (path, _cls) in n.meta.get("nn_module_stack", {}).items():
        if not path:
            continue
        try:
            m = model.get_submodule(path)
        except AttributeError:
            return None
        if type(m) in _TRACE_THROUGH:  # traced through by the fx front end too (when called without masks)
            continue
        if tracer.is_leaf_module(m, path):
            return key, path
    return None


def _one_argument(m: nn.Module) -> bool:
    """Whether ``m.forward`` can be called with one tensor (every further parameter has a default)."""
    params = list(inspect.signature(m.forward).parameters.values())
    required = [p for p in params if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return bool(params) and len(required) <= 1
