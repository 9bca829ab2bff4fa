"""ONNX export of the trained backbone: onnxruntime parity, no aux-net nodes, strict state-dict loading."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import timm
import torch
import yaml
from onnx import numpy_helper
from torch import nn

import auglocal_fx.export as export_module
from auglocal_fx import AugLocalError, load_auglocal, to_auglocal
from auglocal_fx.cli.convert import main as convert_main
from auglocal_fx.cli.export import main as export_main
from auglocal_fx.cli.train import main as train_main
from auglocal_fx.export import FLOAT32_REFERENCE_ERROR, OPSETS, export_onnx, save_backbone_state

from handwritten import cifar_resnet

# name -> (factory, timm kwargs for a fresh copy or None, K, input size)
MODELS = {
    "resnet50": (lambda: timm.create_model("resnet50", num_classes=10), {"num_classes": 10}, 4, (3, 64, 64)),
    "vit_tiny_patch16_224": (lambda: timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=64),
                             {"num_classes": 10, "img_size": 64}, 4, (3, 64, 64)),
    "convnext_atto": (lambda: timm.create_model("convnext_atto", num_classes=10), {"num_classes": 10}, 4,
                      (3, 64, 64)),
    "efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", num_classes=10), {"num_classes": 10}, 4,
                        (3, 64, 64)),
    "hand_resnet": (cifar_resnet, None, 4, (3, 32, 32)),
}


def _trained(name):
    """The model converted and trained for one step (so exported weights differ from a fresh init)."""
    factory, _, k, size = MODELS[name]
    torch.manual_seed(0)
    model = factory()
    net = to_auglocal(model, k, input_size=size)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(4, *size), torch.randint(0, 10, (4,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net.train().training_step(x, y)
    opt.step()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    return model, net


def _ort(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


# resnet50, efficientnet_b0 and convnext_atto (11-17 s each on 2 cores) in the slow tier, to keep make test in budget
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("resnet50", "efficientnet_b0", "convnext_atto") else n
                                  for n in MODELS])
def test_export_after_training_step(tmp_path, name):
    model, net = _trained(name)
    size = MODELS[name][3]
    report = export_onnx(net, tmp_path / "m.onnx")
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    assert report.batches == (1, 3) and report.input_shape[0] == "batch"
    assert report.exporter == "dynamo" and report.fallback is None  # auto: dynamo whenever it can
    # independent check at another batch size: the file computes what the trained backbone does
    x = torch.randn(5, *size)
    with torch.no_grad():
        ref = model.eval()(x)
    torch.testing.assert_close(_ort(tmp_path / "m.onnx", x), ref, rtol=0, atol=1e-4)
    # aux nets stripped: the same graph as a direct export of the original architecture
    torch.manual_seed(1)
    fresh = MODELS[name][0]()
    direct = export_onnx(fresh, tmp_path / "direct.onnx", input_size=size, verify=False)
    assert report.nodes == direct.nodes == len(onnx.load(str(tmp_path / "m.onnx")).graph.node)


@pytest.mark.parametrize("name", [n for n, (_, kw, _, _) in MODELS.items() if kw is not None])
def test_state_dict_loads_strictly_into_fresh_timm_model(tmp_path, name):
    model, net = _trained(name)
    save_backbone_state(net, tmp_path / "b.pth")
    fresh = timm.create_model(name, **MODELS[name][1])
    fresh.load_state_dict(torch.load(tmp_path / "b.pth", weights_only=True), strict=True)
    x = torch.randn(2, *MODELS[name][3])
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_torchscript_exporter_and_static_batch(tmp_path):
    _, net = _trained("hand_resnet")
    report = export_onnx(net, tmp_path / "m.onnx", exporter="torchscript", dynamic_batch=False)
    assert report.exporter == "torchscript" and report.input_shape == [1, 3, 32, 32] and report.batches == (1,)
    assert report.max_abs_diff <= 1e-4


def test_parity_failure_names_the_figure_and_writes_nothing(tmp_path):
    _, net = _trained("hand_resnet")
    with pytest.raises(AugLocalError, match=r"differs from PyTorch by .* \(> 1e-30\)"):
        export_onnx(net, tmp_path / "m.onnx", atol=1e-30)
    assert list(tmp_path.iterdir()) == []  # no half-verified file, no temp file


class _FiveDimAttention(nn.Module):
    """Attention over 5-D tensors (as hiera's): dynamo's ONNX translation takes 4-D only."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        qkv = self.qkv(x.flatten(2).transpose(1, 2)).reshape(x.shape[0], 1, 2, -1, 24)
        q, k, v = qkv.chunk(3, dim=-1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.fc(out.mean((1, 2, 3)))


def test_auto_falls_back_to_torchscript_and_says_why(tmp_path):
    report = export_onnx(_FiveDimAttention(), tmp_path / "m.onnx", input_size=(8, 4, 4))
    assert report.exporter == "torchscript" and "dynamo exporter failed" in report.fallback
    assert report.max_abs_diff <= 1e-4


def test_bad_arguments(tmp_path):
    with pytest.raises(AugLocalError, match="exporter='tf' is not an exporter; choose one of auto, dynamo, torchscript"):
        export_onnx(cifar_resnet(), tmp_path / "m.onnx", input_size=(3, 32, 32), exporter="tf")
    with pytest.raises(AugLocalError, match=r"input_size=\(3, 0, 32\) is not a shape"):
        export_onnx(cifar_resnet(), tmp_path / "m.onnx", input_size=(3, 0, 32))
    with pytest.raises(AugLocalError, match="does not exist"):
        export_onnx(cifar_resnet(), tmp_path / "nowhere" / "m.onnx", input_size=(3, 32, 32))
    with pytest.raises(AugLocalError, match=r"atol=-1\.0 is not a number >= 0"):
        export_onnx(cifar_resnet(), tmp_path / "m.onnx", input_size=(3, 32, 32), atol=-1.0)


def test_a_folder_path_is_refused_in_one_line(tmp_path):
    for call in (lambda: export_onnx(cifar_resnet(), tmp_path, input_size=(3, 32, 32)),
                 lambda: save_backbone_state(cifar_resnet(), tmp_path)):
        with pytest.raises(AugLocalError, match=r"^path .* is a folder; give a file path") as err:
            call()
        assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


# -- opsets: written as asked, or refused ----------------------------------------------------------
def _pooled_cnn():
    """A global average pool: the dynamo exporter's ReduceMean, which ONNX's converter cannot lower to 17."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


@pytest.mark.parametrize("exporter, opset", [("dynamo", OPSETS["dynamo"][1]), ("dynamo", 18),
                                             ("torchscript", OPSETS["torchscript"][0]),
                                             ("torchscript", OPSETS["torchscript"][1])])
def test_opset_is_written_as_asked(tmp_path, exporter, opset):
    report = export_onnx(_pooled_cnn(), tmp_path / "m.onnx", input_size=(3, 8, 8), opset=opset, exporter=exporter)
    assert report.opset == opset == export_module._opset(onnx.load(str(tmp_path / "m.onnx")))
    assert report.exporter == exporter and report.max_abs_diff <= 1e-4


def test_opset_below_18_dynamo_lowers_it_or_refuses_and_auto_falls_back(tmp_path, capfd):
    # a graph ONNX's version converter can lower: the dynamo exporter writes opset 17
    mlp = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 4))
    report = export_onnx(mlp, tmp_path / "mlp.onnx", input_size=(16,), opset=17, exporter="dynamo")
    assert report.opset == 17 and report.exporter == "dynamo"
    # one it cannot lower: refused (it used to write opset 18 and print the converter's traceback)
    with pytest.raises(AugLocalError, match=r"failed with the dynamo exporter \(.*it wrote opset 18, not 17: "
                                            r"ONNX's version converter could not lower this graph.*try --exporter torchscript"):
        export_onnx(_pooled_cnn(), tmp_path / "cnn.onnx", input_size=(3, 8, 8), opset=17, exporter="dynamo")
    assert not (tmp_path / "cnn.onnx").exists()
    # auto: the torchscript exporter writes it, and the report says why
    report = export_onnx(_pooled_cnn(), tmp_path / "cnn.onnx", input_size=(3, 8, 8), opset=17)
    assert report.opset == 17 and report.exporter == "torchscript" and "it wrote opset 18" in report.fallback
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("exporter, opset, allowed", [("auto", 6, "7 to 25"), ("auto", 26, "7 to 25"),
                                                      ("dynamo", 26, "7 to 25"), ("torchscript", 24, "7 to 23")])
def test_opset_out_of_range_is_refused_with_the_true_range(tmp_path, exporter, opset, allowed):
    with pytest.raises(AugLocalError, match=rf"^opset={opset} is out of range .*: use {allowed}, or leave it out"):
        export_onnx(_pooled_cnn(), tmp_path / "m.onnx", input_size=(3, 8, 8), opset=opset, exporter=exporter)


# -- the verification's tolerance: what float32 itself can promise --------------------------------
class _IllConditioned(nn.Module):
    """mobileone_s4's trouble in small: activations of 1e3 and a sigmoid gate driven by the difference of
    two nearly equal ones (a twin convolution), so float32 rounding in the means moves the gate, and
    the output misses float64's by ~5e-4 relative in PyTorch and in onnxruntime alike."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.twin = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)
        with torch.no_grad():
            self.twin.weight.copy_(self.conv.weight * (1 + 1e-4 * torch.randn(self.conv.weight.shape)))
            self.twin.bias.copy_(self.conv.bias)

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean((2, 3)) * 1e4
        t = torch.relu(self.twin(x)).mean((2, 3)) * 1e4
        return self.head(h * torch.sigmoid((h - t) * 3))


def _perturbing(monkeypatch, name, factor):
    """Make the exporter write a wrong graph: initializer ``name`` times ``factor``."""
    export = export_module._export

    def wrong(model, example, tmp, exporter, opset, dynamic):
        export(model, example, tmp, exporter, opset, dynamic)
        proto = onnx.load(str(tmp))
        (init,) = [i for i in proto.graph.initializer if i.name == name]
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * factor, name))
        onnx.save(proto, str(tmp))

    monkeypatch.setattr(export_module, "_export", wrong)


def test_ill_conditioned_network_is_judged_by_its_own_float32_error(tmp_path):
    report = export_onnx(_IllConditioned(), tmp_path / "m.onnx", input_size=(3, 32, 32))
    # the old rule (atol times the output magnitude) refused this file: float32 noise, not a wrong graph
    assert report.max_abs_diff > 2 * 1e-4 * max(1.0, report.output_scale)
    # PyTorch's own float32 result is as far from float64 as onnxruntime's is from PyTorch's
    assert report.max_abs_diff < 10 * report.float32_error
    assert report.tolerance_scale == pytest.approx(report.float32_error / 1e-6)
    assert report.max_abs_diff <= 1e-4 * report.tolerance_scale


def test_a_wrong_graph_is_still_caught_on_an_ill_conditioned_network(tmp_path, monkeypatch):
    _perturbing(monkeypatch, "head.weight", 1.1)  # the classifier's weights 10% off
    with pytest.raises(AugLocalError, match=r"differs from PyTorch by \S+ \(> \S+\); not written; PyTorch's own "
                                            r"float32 error is \S+ \(float32 vs float64\)"):
        export_onnx(_IllConditioned(), tmp_path / "m.onnx", input_size=(3, 32, 32))
    assert list(tmp_path.iterdir()) == []


def test_a_wrong_graph_is_caught_on_a_healthy_network(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = cifar_resnet()
    _perturbing(monkeypatch, "fc.weight", 1.01)  # 1% off
    with pytest.raises(AugLocalError, match="differs from PyTorch"):
        export_onnx(model, tmp_path / "m.onnx", input_size=(3, 32, 32))


# -- the CLI -------------------------------------------------------------------------------------
def test_cli_convert_save_then_export(tmp_path, capsys):
    ckpt, out, sd = tmp_path / "c.pt", tmp_path / "r.onnx", tmp_path / "b.pth"
    assert convert_main(["--model", "resnet18", "--blocks", "4", "--input-size", "3", "64", "64",
                         "--num-classes", "10", "--save", str(ckpt)]) == 0
    capsys.readouterr()
    out.write_text("an older export")  # an existing output is refused, and kept ...
    assert export_main([str(ckpt), "--out", str(out), "--state-dict", str(sd)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err and out.read_text() == "an older export"
    # ... or, with --overwrite, replaced: the command says so first
    assert export_main([str(ckpt), "--out", str(out), "--state-dict", str(sd), "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"replacing existing {out} with the ONNX export if it passes verification\n")
    assert f"replacing existing {sd}" not in printed
    assert "max abs difference" in printed and "resnet18" in printed and "PyTorch's own float32 error" in printed
    diff = float(printed.split("max abs difference ")[1].split()[0])
    assert diff <= 1e-4
    fresh = timm.create_model("resnet18", num_classes=10)
    fresh.load_state_dict(torch.load(sd, weights_only=True), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(_ort(out, x), fresh.eval()(x), rtol=0, atol=1e-4)


def test_cli_exports_a_training_checkpoint(tmp_path, capsys):
    recipe = {"model": {"name": "resnet20_cifar"},
              "data": {"dataset": "synthetic", "image_size": 16, "train_limit": 64, "test_limit": 32,
                       "num_workers": 0},
              "conversion": {"blocks": 4}, "epochs": 1, "batch_size": 32, "device": "cpu",
              "output": str(tmp_path / "run")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert train_main([str(tmp_path / "r.yaml")]) == 0
    capsys.readouterr()
    last = tmp_path / "run" / "last.pt"
    assert export_main([str(last), "--out", str(tmp_path / "m.onnx"), "--static-batch"]) == 0
    assert "max abs difference" in capsys.readouterr().out
    net = load_auglocal(last)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(_ort(tmp_path / "m.onnx", x), net.model.eval()(x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", ["out is the checkpoint", "state dict is the checkpoint", "out is a link to it",
                                  "out is the state dict", "out is a folder", "state dict is a folder"])
def test_cli_refuses_outputs_that_destroy_files_before_any_work(tmp_path, capsys, case):
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"never read: the outputs are checked first")
    (tmp_path / "d").mkdir()
    (tmp_path / "link.pt").symlink_to(ckpt)
    out, sd = {"out is the checkpoint": ("c.pt", None), "state dict is the checkpoint": ("m.onnx", "c.pt"),
               "out is a link to it": ("link.pt", None), "out is the state dict": ("m.onnx", "./m.onnx"),
               "out is a folder": ("d", None), "state dict is a folder": ("m.onnx", "d")}[case]
    argv = [str(ckpt), "--out", str(tmp_path / out), *(["--state-dict", str(tmp_path / sd)] if sd else [])]
    assert export_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("auglocal-export: error: --")
    assert {"out is the checkpoint": "is also this command's input", "state dict is the checkpoint":
            "--state-dict", "out is a link to it": "is also this command's input", "out is the state dict":
            "is also --out", "out is a folder": "is a folder", "state dict is a folder": "is a folder"}[case] in err
    assert ckpt.read_bytes() == b"never read: the outputs are checked first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "d", "link.pt"] and not any((tmp_path / "d").iterdir())


@pytest.mark.parametrize("case", ["missing", "corrupt", "not a checkpoint", "bad opset"])
def test_cli_errors_are_one_line(tmp_path, capsys, case):
    path = tmp_path / "c.pt"
    args = []
    if case == "corrupt":
        path.write_bytes(b"PK\x03\x04 truncated")
    elif case == "not a checkpoint":
        torch.save({"weights": torch.zeros(1)}, path)
    elif case == "bad opset":
        args = ["--opset", "99"]
    assert export_main([str(path), "--out", str(tmp_path / "m.onnx"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("auglocal-export: error:")
    assert {"missing": "does not exist", "corrupt": "unreadable or corrupt",
            "not a checkpoint": "is not an auglocal-fx checkpoint",
            "bad opset": "--opset 99 is out of range for ONNX export: use 7 to 25"}[case] in err


@pytest.mark.slow
def test_mobileone_s4_after_a_step_passes_on_its_float32_error(tmp_path):
    """The case of issue 16 (15 to 50 s): random init, one SGD step through the AugLocal net at 64 px.
    Its float32 output misses float64's by units on logits of ~5e4, in PyTorch and onnxruntime alike
    (how far depends on the random draw: 3.7 now, ~1e3 when the issue was filed)."""
    torch.manual_seed(0)
    model = timm.create_model("mobileone_s4", num_classes=10)
    net = to_auglocal(model, 4, input_size=(3, 64, 64))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net.train().training_step(torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,)))
    opt.step()
    report = export_onnx(net, tmp_path / "m.onnx")
    # the premise, with a wide margin on any machine's kernels: float32 itself is far off here
    assert report.float32_error > 1e5 * FLOAT32_REFERENCE_ERROR
    assert report.max_abs_diff < 20 * report.float32_error
