"""A dozen diverse timm families and three torchvision models through the zoo check's stages (the whole zoo: tools/zoo_check.py).

convert (K = min(16, L)) -> axis audit (every adapter and aux head, of auglocal and of the dgl /
infopro / predsim rules, contracts the measured channel axis alone) -> eval parity -> one training
step in which every parameter that backprop trains gets a gradient -> ONNX export with onnxruntime parity.
"""

from __future__ import annotations

import pytest

from auglocal_fx.testing.zoo import STAGES, check_model

FAMILIES = {
    "mobilenetv1_100": "plain CNN (depthwise-separable stack, no shortcuts)",
    "test_resnet": "residual CNN",
    "mobilenetv3_small_050": "inverted residuals, depthwise, squeeze-excite",
    "test_efficientnet": "EfficientNet blocks",
    "regnetx_002": "RegNet",
    "densenet121": "DenseNet: concatenating dense blocks",
    "test_convnext": "ConvNeXt",
    "cs3darknet_focus_s": "cross-stage partial network",
    "test_vit": "ViT: class token, attention",
    "mixer_s32_224": "MLP-Mixer",
    "test_maxvit": "hierarchical transformer (MaxViT: window and grid attention)",
    "pvt_v2_b0": "hierarchical transformer (PVT v2)",
}


# the slowest models run in the slow tier, to keep make test in budget (14-24 s each on 2 cores; a
# MobileNetV3's blocks are test_efficientnet's, swin_t's channels-last maps are in tests/test_axes.py)
SLOW_FAMILIES = {"densenet121", "mixer_s32_224", "mobilenetv3_small_050", "test_maxvit", "pvt_v2_b0"}
SLOW_TORCHVISION = {"swin_t", "shufflenet_v2_x0_5"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_FAMILIES else n
                                  for n in FAMILIES])
def test_family_passes_every_stage(name):
    result = check_model(name, name)
    assert result.ok, f"{name} ({FAMILIES[name]}) fails at {result.failed}: {result.error}"
    assert result.passed == list(STAGES)
    assert result.axes_checked and not result.axes_wrong and result.axes_disagree == 0
    assert result.blocks == min(16, result.layers) and result.blocks >= 2
    assert result.parity_diff <= 1e-5 and result.onnx_diff <= 1e-4


TORCHVISION = {
    "squeezenet1_1": "Fire modules, classifier conv",
    "shufflenet_v2_x0_5": "channel shuffle, split and concatenate",
    "swin_t": "channels-last maps (N, H, W, C)",
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_TORCHVISION else n
                                  for n in TORCHVISION])
def test_torchvision_model_passes_every_stage(name):
    result = check_model(name, name, source="torchvision")
    assert result.ok, f"{name} ({TORCHVISION[name]}) fails at {result.failed}: {result.error}"
    assert result.axes_checked and not result.axes_wrong and result.axes_disagree == 0
    assert result.blocks == min(16, result.layers) and result.blocks >= 2
