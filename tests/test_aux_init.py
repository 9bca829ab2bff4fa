"""aux_init: "model" (default) starts aux nets as the model initialises itself, "fresh" and "copy" as before."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

from auglocal_fx import to_auglocal
from auglocal_fx.assemble.adapters import Adapter
from auglocal_fx.assemble.emit import DualModeGraph
from auglocal_fx.assemble.widen import WidenedCopy
from auglocal_fx.errors import AugLocalError, AugLocalWarning

from handwritten import cifar_resnet

SIZE = (3, 32, 32)


def _copies(net) -> dict[str, list[torch.Tensor]]:
    """Every aux copy's parameters by the qualified name they have in the model (a widened copy's
    convolutions that read its input, and the adapter it holds, are new layers: left out)."""
    out: dict[str, list[torch.Tensor]] = {}
    for aux in net.aux:
        for piece in (m for m in aux.modules() if isinstance(m, DualModeGraph)):
            new = {id(p) for p in _widened_params(piece)}
            for name, p in piece.train_graph.named_parameters():
                if id(p) not in new:
                    out.setdefault(name, []).append(p)
    return out


def _widened_params(piece) -> list[torch.Tensor]:
    if not isinstance(piece, WidenedCopy):
        return []
    g = piece.train_graph
    x = next(n for n in g.graph.nodes if n.op == "placeholder")
    return [p for u in x.users if u.op == "call_module" for p in g.get_submodule(u.target).parameters()]


def _scramble(model: nn.Module) -> None:
    """Make the backbone unlike any init (as trained or pretrained weights are)."""
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)


@pytest.mark.parametrize("name, kwargs", [("resnet50", {}), ("vit_tiny_patch16_224", {"img_size": 32})])
def test_model_init_copies_are_a_fresh_timm_model_under_the_same_seed(name, kwargs):
    model = timm.create_model(name, num_classes=10, **kwargs)
    _scramble(model)
    torch.manual_seed(7)
    with torch.no_grad():
        net = to_auglocal(model, 4, input_size=SIZE)  # kwargs (img_size for the ViT) read off the model
    torch.manual_seed(7)
    ref = dict(timm.create_model(name, num_classes=10, **kwargs).named_parameters())
    copies = _copies(net)
    assert len(copies) > 10
    for qual, params in copies.items():
        for p in params:
            assert torch.equal(p, ref[qual]), qual
    if name == "resnet50":  # timm zero-inits each bottleneck's last BN gamma (zero_init_last)
        gammas = [p for q, ps in copies.items() if q.endswith("bn3.weight") for p in ps]
        assert gammas and all(torch.count_nonzero(g) == 0 for g in gammas)
        convs = [m for aux in net.aux for a in aux.modules() if isinstance(a, Adapter)
                 for m in a.modules() if isinstance(m, nn.Conv2d)]
        widened = [p for aux in net.aux for w in aux.modules() for p in _widened_params(w) if p.dim() == 4]
        assert convs and widened  # adapters and widened convs are no copies: kaiming-normal fan-out
        for w in [c.weight for c in convs] + widened:
            fan_out = w.shape[0] * w.shape[2] * w.shape[3]
            assert abs(float(w.detach().std()) / math.sqrt(2 / fan_out) - 1) < 0.1
    else:  # ViT linears are trunc-normal std 0.02, none left at the scrambled backbone's 0.5
        linears = [p for q, ps in copies.items() if q.endswith("fc1.weight") for p in ps]
        assert linears and all(abs(float(w.std()) - 0.02) < 0.002 for w in linears)


def test_model_kwargs_are_the_keywords_the_model_was_made_with():
    model = timm.create_model("resnet18", num_classes=10, zero_init_last=False)
    net = to_auglocal(model, 3, input_size=SIZE, model_kwargs={"num_classes": 10, "zero_init_last": False})
    gammas = [p for q, ps in _copies(net).items() if q.endswith("bn2.weight") for p in ps]
    assert gammas and all(torch.equal(g, torch.ones_like(g)) for g in gammas)
    with pytest.warns(AugLocalWarning, match=r"^aux_init='model': resnet18 could not be re-created"):
        to_auglocal(model, 3, input_size=SIZE, model_kwargs={"num_classes": 3})


def test_model_init_falls_back_to_kaiming_normal_convs_and_unit_norms_on_other_models():
    torch.manual_seed(0)
    model = cifar_resnet(2)
    _scramble(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.fill_(3.0)
    net = to_auglocal(model, 4, input_size=SIZE)
    convs = [m for aux in net.aux for m in aux.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for aux in net.aux for m in aux.modules() if isinstance(m, nn.BatchNorm2d)]
    linears = [m for aux in net.aux for m in aux.modules() if isinstance(m, nn.Linear)]
    assert convs and norms and linears
    big = [c for c in convs if c.weight.numel() >= 2000]
    assert big and all(abs(float(c.weight.detach().std()) / math.sqrt(2 / (c.out_channels * 9)) - 1) < 0.15
                       for c in big if c.kernel_size == (3, 3))
    for n in norms:
        assert torch.equal(n.weight, torch.ones_like(n.weight)) and torch.count_nonzero(n.bias) == 0
        assert torch.count_nonzero(n.running_mean) == 0
    for lin in linears:  # PyTorch's default: uniform within 1/sqrt(fan_in)
        assert float(lin.weight.abs().max()) <= 1 / math.sqrt(lin.in_features)


def test_fresh_and_copy_are_unchanged_on_a_timm_model():
    model = timm.create_model("resnet18", num_classes=10)
    _scramble(model)
    copied = _copies(to_auglocal(model, 3, input_size=SIZE, aux_init="copy"))
    fresh = _copies(to_auglocal(model, 3, input_size=SIZE, aux_init="fresh"))
    backbone = dict(model.named_parameters())
    assert all(torch.equal(p, backbone[q]) for q, ps in copied.items() for p in ps)
    bn2 = [p for q, ps in fresh.items() if q.endswith("bn2.weight") for p in ps]
    assert bn2 and all(torch.equal(g, torch.ones_like(g)) for g in bn2)  # reset_parameters: no zero-init
    convs = [p for q, ps in fresh.items() if q.endswith("conv1.weight") for p in ps]
    assert convs and all(float(p.abs().max()) < 0.5 for p in convs)


def test_each_aux_net_starts_alike_whichever_others_a_process_builds():
    """A pipeline stage's process converts lazily (aux nets on the meta device) and builds only its
    own: each holds exactly what the eager conversion gives, and the random stream after the
    conversion is the same, so the stage trains what the one-process run trains."""
    def convert(**kw):
        torch.manual_seed(3)
        model = cifar_resnet(n=3)
        torch.manual_seed(5)
        net = to_auglocal(model, 6, input_size=SIZE, **kw)
        return net, torch.rand(3)

    eager, after_eager = convert()
    lazy, after_lazy = convert(lazy_aux=True)
    assert torch.equal(after_eager, after_lazy)
    assert all(t.device.type == "meta" for t in [*lazy.aux.parameters(), *lazy.aux.buffers()])
    assert lazy.plan.aux == eager.plan.aux  # the figures of every aux net, measured before it left
    lazy.materialize_aux([3, 1, 0])
    lazy.drop_aux_factory()
    for k, (a, b) in enumerate(zip(eager.aux, lazy.aux)):
        on_meta = any(t.device.type == "meta" for t in b.parameters())
        assert on_meta == (k not in (0, 1, 3)), k
        if not on_meta:
            sa, sb = a.state_dict(), b.state_dict()
            assert sa.keys() == sb.keys() and all(torch.equal(sa[n], sb[n]) for n in sa), k
    # the units still shape-check with aux nets on the meta device, and the built ones train
    from auglocal_fx.assemble.shapecheck import check_units
    check_units(lazy)
    x, y = torch.randn(4, *SIZE), torch.randint(0, 10, (4,))
    out = lazy.training_step(x, y, units=lazy.local_units()[:2])  # a first stage of units 0 and 1
    assert len(out.local_losses) == 1 and all(math.isfinite(v) for v in [out.loss, *out.local_losses])
    with pytest.raises(AugLocalError, match="cannot be built any more"):
        lazy.materialize_aux([2])
