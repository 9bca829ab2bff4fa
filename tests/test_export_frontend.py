"""The torch.export front end: what fx cannot trace converts; where both trace, the plans agree; the
emitted net keeps train/eval behaviour, eval parity and gradient isolation; Hugging Face models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from auglocal_fx import AugLocalError, build_plan, export_onnx, to_auglocal
from auglocal_fx.models import create_model
from auglocal_fx.testing.hf_zoo import next_token_loss

from checks import assert_gradient_isolation, fixed_batch_losses
from handwritten import SplitQKVViT, small_resnet


def _plan_figures(plan):
    """What a plan decides, without the names: per layer its parameters, FLOPs and output shape, the
    blocks' layers and the aux nets' copies. (Layer names may differ where fx keeps an Identity
    module export never sees: ``patch_embed..norm_pre`` against ``patch_embed..pos_embed``.)"""
    return ([(x.params, x.flops, x.out_shape) for x in plan.layers], (plan.head.params, plan.head.out_shape),
            [b.layers for b in plan.blocks], [a.selected_layers for a in plan.aux])


@pytest.mark.parametrize("name, size, blocks", [("resnet18", 64, 4), ("vit_tiny_patch16_224", 224, 6)])
def test_both_front_ends_make_the_same_plan_where_both_trace(name, size, blocks):
    model = create_model(name, num_classes=10)
    fx_plan = build_plan(model, blocks, frontend="fx", input_size=(3, size, size))
    export_plan = build_plan(model, blocks, frontend="export", input_size=(3, size, size))
    assert (fx_plan.config.traced_with, export_plan.config.traced_with) == ("fx", "export")
    assert _plan_figures(export_plan) == _plan_figures(fx_plan)
    assert build_plan(model, blocks, input_size=(3, size, size)).config.traced_with == "fx"  # auto: fx first


def test_auto_exports_what_fx_cannot_trace_one_layer_per_block():
    torch.manual_seed(0)
    model = SplitQKVViT(drop=0.0)  # the isolation check compares two steps: no random draws
    with pytest.raises(AugLocalError, match="torch.fx cannot trace SplitQKVViT"):
        build_plan(model, 4, frontend="fx", input_size=(3, 16, 16))
    net = to_auglocal(model, 5, input_size=(3, 16, 16))
    assert net.plan.config.traced_with == "export"
    assert [x.name for x in net.plan.layers] == ["stem.0..stem.1", "blocks.0", "blocks.1", "blocks.2", "blocks.3..norm"]
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))  # another batch than export saw
    with torch.no_grad():
        assert torch.equal(net.eval()(x), model.eval()(x))
    assert_gradient_isolation(net, x, y)


def test_exported_blocks_train_with_the_model_weights_and_its_train_mode():
    """The leaf modules are the model's own (a step changes the model's weights and batch-norm
    statistics); dropout written as F.dropout(..., self.training) drops in training only."""
    torch.manual_seed(0)
    model = SplitQKVViT()
    net = to_auglocal(model, 5, input_size=(3, 16, 16))
    stats = model.stem[1].running_mean.clone()
    weight = model.blocks[0].attn.qkv.weight.detach().clone()
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net.train().training_step(x, y)
    opt.step()
    assert not torch.equal(model.stem[1].running_mean, stats)  # batch norm ran in train mode
    assert not torch.equal(model.blocks[0].attn.qkv.weight, weight)  # the model's weight trained
    net.train()
    with torch.no_grad():
        assert not torch.equal(net(x), net(x))  # dropout draws anew in train mode
        net.eval()
        assert torch.equal(net(x), net(x))


class _ModeDependent(nn.Module):
    """Batch norm (its train-mode ops read the batch size export then shares with a later view) and
    dropout written as a function between the layers: the train and eval graphs differ inside."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.g = nn.Parameter(torch.ones(1))
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = F.dropout(self.stem(x), 0.1, self.training) * self.g
        x = self.layer(x)
        return self.head(x.view(x.shape[0], -1))


def test_train_and_eval_graphs_cut_alike_and_keep_batch_norm_whole():
    from auglocal_fx.passes.export_trace import export_trace

    model, x = _ModeDependent(), torch.randn(1, 3, 8, 8)
    graphs = {mode: export_trace(model.train(mode), (x,)) for mode in (True, False)}
    for gm in graphs.values():  # in both modes batch norm is the model's module, not its operators
        assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == [
            "stem.0", "stem.1", "stem.2", "layer.0", "layer.1", "layer.2", "head"]
    names = [{n.name for n in gm.graph.nodes if n.op == "call_module" or n.target is torch.ops.aten.mul.Tensor}
             for gm in graphs.values()]
    assert names[0] == names[1]  # the names cuts go by are the same in both modes
    net = to_auglocal(model, 2, input_size=(3, 8, 8), frontend="export")
    xb = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(net.eval()(xb), model.eval()(xb))


class _Upsampler(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        y = self.up(self.down(x).relu(), output_size=x.shape[-2:])  # a keyword fx's call_module(x) would lose
        return self.head(y.mean((2, 3)))


def test_a_module_called_with_more_than_its_input_stays_as_its_operators():
    from auglocal_fx.passes.export_trace import export_trace

    model, x = _Upsampler().eval(), torch.randn(2, 3, 8, 8)
    gm = export_trace(model, (x[:1],))
    assert "up" not in {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert torch.equal(gm(x), model(x))


class MyDropPath(nn.Module):
    """A model's own stochastic depth, as Hugging Face writes one per model (no weights)."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        keep = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) >= self.p
        return x * keep / (1 - self.p)


class _BuildsInForward(nn.Module):
    """Residual blocks with a drop path of their own, and an activation module made in forward (fx
    cannot trace a module that is not the model's)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.drop = nn.ModuleList(MyDropPath(0.5) for _ in range(3))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        for block, drop in zip(self.blocks, self.drop):
            x = x + drop(nn.GELU()(block(x)))
        return self.head(x)


def test_a_models_own_drop_path_stays_whole_and_a_module_made_in_forward_exports():
    model = _BuildsInForward()
    net = to_auglocal(model, 3, input_size=(8,))
    assert net.plan.config.traced_with == "export"  # fx: "module is not installed as a submodule"
    assert [b.layers for b in net.plan.blocks] == [[0], [1], [2]]
    train_graph = net.blocks[1].train_graph  # drop path is one call, deciding train/eval as it runs
    assert "drop.1" in {n.target for n in train_graph.graph.nodes if n.op == "call_module"}
    x = torch.randn(64, 8)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), model.eval()(x))
        net.train()
        assert not torch.equal(net.blocks[1](net.blocks[0](x)), net.blocks[1](net.blocks[0](x)))


def test_a_fixed_front_end_is_a_recipe_key_and_a_plan_field(tmp_path):
    plan = build_plan(small_resnet(), 3, frontend="export", input_size=(3, 16, 16))
    again = type(plan).from_dict(copy.deepcopy(plan.to_dict()))
    assert again.config.traced_with == "export" and again.config.frontend == "export"
    net = to_auglocal(small_resnet(), plan=again)  # the same plan builds through export again
    x = torch.randn(3, 3, 16, 16)
    assert net.eval()(x).shape == (3, 10)


# -- Hugging Face transformers (the hf extra) --------------------------------------------------------
transformers = pytest.importorskip("transformers")


def _hf(kind: str):
    """A tiny randomly initialised transformers model, its input batch and targets, the loss; no
    dropout (the isolation check compares two steps)."""
    T = transformers
    torch.manual_seed(0)
    tokens = torch.randint(0, 100, (4, 16))
    image = torch.randn(4, 3, 32, 32)
    if kind == "vit":
        cfg = T.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                          image_size=32, patch_size=8, num_labels=10)
        return T.ViTForImageClassification(cfg), image, torch.randint(0, 10, (4,)), None
    if kind == "bert":
        cfg = T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                           intermediate_size=64, num_labels=3, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
        return T.BertForSequenceClassification(cfg), tokens, torch.randint(0, 3, (4,)), None
    if kind == "gpt2":
        cfg = T.GPT2Config(vocab_size=100, n_embd=32, n_layer=3, n_head=4, n_positions=32, bos_token_id=0,
                           eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                           tie_word_embeddings=False)  # tied, the first and last units share a weight
        return T.GPT2LMHeadModel(cfg), tokens, torch.roll(tokens, -1, 1), next_token_loss
    if kind == "llama":
        cfg = T.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32)
        return T.LlamaForCausalLM(cfg), tokens, torch.roll(tokens, -1, 1), next_token_loss
    if kind == "resnet":  # depths 1, 2: three bottlenecks in two stages
        cfg = T.ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 2], num_labels=10)
        return T.ResNetForImageClassification(cfg), image, torch.randint(0, 10, (4,)), None
    if kind == "convnext":
        cfg = T.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 2], num_labels=10)
        return T.ConvNextForImageClassification(cfg), image, torch.randint(0, 10, (4,)), None
    raise ValueError(kind)


def _convert(model, x):
    model.eval()
    if x.dtype == torch.long:
        return to_auglocal(model, 3, example_inputs=x[:1])
    return to_auglocal(model, 3, input_size=tuple(x.shape[1:]))


_SLOW = pytest.mark.slow


@pytest.mark.parametrize("kind", ["vit", "bert", "gpt2", pytest.param("llama", marks=_SLOW),
                                  pytest.param("resnet", marks=_SLOW), pytest.param("convnext", marks=_SLOW)])
def test_a_hugging_face_model_converts_one_layer_per_block_and_learns(kind):
    model, x, y, loss_fn = _hf(kind)
    net = _convert(model, x)
    assert net.plan.config.traced_with == "export"
    # every config has three transformer layers or residual blocks: one layer each, one per block
    assert [b.layers for b in net.plan.blocks] == [[0], [1], [2]], [x.name for x in net.plan.layers]
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), model(x).logits, rtol=0, atol=1e-5)
    assert_gradient_isolation(net, x, y, loss_fn=loss_fn)
    losses = fixed_batch_losses(net, x, y, loss_fn=loss_fn, lr=3e-3)
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vit", "gpt2"])
def test_a_hugging_face_backbone_exports_to_onnx_with_parity(kind, tmp_path):
    """The trained backbone as the plan trained it: its logits, no generation cache."""
    model, x, _, _ = _hf(kind)
    report = export_onnx(_convert(model, x), tmp_path / "m.onnx")
    assert report.exporter == "dynamo" and report.max_abs_diff <= 1e-4 * report.tolerance_scale


def test_a_recipe_trains_a_hugging_face_model_named_hf(tmp_path):
    """``model.name: hf:vit`` with config fields in model.kwargs: random init, offline, through export."""
    from test_training import tiny_recipe

    from auglocal_fx.training import recipe_from_dict, train
    from auglocal_fx.training.state import read_training

    recipe = tiny_recipe(tmp_path, epochs=1, **{
        "model.name": "hf:vit", "model.img_size": 16, "conversion.blocks": 3, "data.image_size": 16,
        "model.kwargs": {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
                         "intermediate_size": 64, "patch_size": 4}})
    summary = train(recipe_from_dict(recipe), log=lambda *a, **k: None)
    assert 0.0 <= summary["test_acc"] <= 1.0
    saved = read_training(tmp_path / "run" / "last.pt", weights=False)
    assert saved["plan"]["config"]["traced_with"] == "export"
    assert [b["layers"] for b in saved["plan"]["blocks"]] == [[0], [1], [2]]  # one ViT layer per block


def test_hf_model_names_are_checked_in_one_line():
    from auglocal_fx.models import create_model

    with pytest.raises(AugLocalError, match=r"unknown Hugging Face image classifier type 'vitt': did you mean vit"):
        create_model("hf:vitt")
    with pytest.raises(AugLocalError, match="ViTConfig has no field hidden_sizee"):
        create_model("hf:vit", hidden_sizee=3)
    with pytest.raises(AugLocalError, match="model.pretrained needs weights: hf:vit is a model type"):
        create_model("hf:vit", pretrained=True)


def test_a_decoder_that_takes_use_cache_through_kwargs_is_traced_without_its_cache():
    """GraniteMoE / Gemma 3 take ``use_cache`` through ``**kwargs``; with it on, their output holds a
    cache object that no exporter takes."""
    from types import SimpleNamespace

    from auglocal_fx.passes.export_trace import export_trace

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(use_cache=True)
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x, **kwargs):
            out = self.b(self.a(x))
            return (out, object()) if kwargs.get("use_cache", self.config.use_cache) else (out,)

    gm = export_trace(Decoder(), (torch.randn(1, 4),), output=0)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["a", "b"]
