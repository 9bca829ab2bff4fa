"""Models written the way people write PyTorch, shared by the tests (no timm, no torchvision).

One residual network, ``ResNet``, serves every CIFAR-style case: the paper's ResNet-(6n+2)
(``cifar_resnet``), a small one with its blocks in a ``Sequential`` (``small_resnet``), and the
random widths and strides of the property tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "ResNet", "cifar_resnet", "small_resnet", "RootResidualNet", "PlainCNN", "TokenMLP",
           "M5", "ShuffleNet", "Video3d", "NHWCConvNet", "VectorMLP", "TinyGPT",
           "MaskedTextClassifier", "ImageWithMetadata",
           "CSPNet", "DenseNet", "ClassTokenNet", "UNet", "ShapeReadNet", "SplitQKVViT"]


class BasicBlock(nn.Module):
    """ResNet basic block; the residual add lives inside the block (1x1-conv shortcut when channels or
    resolution change, as in the AugLocal reference code)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride == 1 and cin == cout:
            self.shortcut = nn.Sequential()
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem + one basic block per ``widths`` entry (with its ``strides`` entry) + pool + fc.

    Layers as the paper counts them: L = 1 (stem) + len(widths). ``container`` holds the blocks in
    a ``ModuleList`` (looped over in forward) or a ``Sequential``.
    """

    def __init__(self, widths: Sequence[int], strides: Sequence[int], num_classes: int = 10,
                 container: str = "list"):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, cin = [], widths[0]
        for w, s in zip(widths, strides):
            blocks.append(BasicBlock(cin, w, s))
            cin = w
        self.blocks = nn.ModuleList(blocks) if container == "list" else nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def cifar_resnet(n: int = 1, num_classes: int = 10) -> ResNet:
    """ResNet-(6n+2) for 3x32x32: three stages of n blocks (16/32/64 channels). n=5 is ResNet-32
    (L=16), n=18 is ResNet-110 (L=55)."""
    widths = [c for c in (16, 32, 64) for _ in range(n)]
    strides = [2 if (i == 0 and stage > 0) else 1 for stage in range(3) for i in range(n)]
    return ResNet(widths, strides, num_classes)


def small_resnet(num_classes: int = 10) -> ResNet:
    """Six narrow blocks (8, 8, 16, 16, 32, 32 channels) in a Sequential: L = 7."""
    return ResNet((8, 8, 16, 16, 32, 32), (1, 1, 2, 1, 2, 1), num_classes, container="sequential")


class RootResidualNet(nn.Module):
    """Residual adds written in the root forward (``x = x + block(x)``), not inside the blocks."""

    def __init__(self, width: int = 8, depth: int = 3, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
            for _ in range(depth))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.fc(self.pool(x).flatten(1))


class PlainCNN(nn.Module):
    """conv-BN-ReLU layers without residuals, one per ``widths`` entry."""

    def __init__(self, widths: Sequence[int], strides: Sequence[int], num_classes: int = 10):
        super().__init__()
        layers, cin = [], 3
        for w, s in zip(widths, strides):
            layers.append(nn.Sequential(nn.Conv2d(cin, w, 3, s, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()))
            cin = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class TokenBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class TokenMLP(nn.Module):
    """Patches -> tokens (T, D) -> residual MLP blocks -> mean over tokens -> classifier."""

    def __init__(self, dim: int, depth: int, patch: int = 4, num_classes: int = 10):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.Sequential(*[TokenBlock(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        return self.fc(self.norm(self.blocks(x)).mean(1))


# -- models whose blocks hand on several tensors (bundle cuts) ---------------------------------------
def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(c, c), nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return F.relu(x + self.body(x))


class CSPStage(nn.Module):
    """Cross-stage partial stage: half the channels skip the blocks and rejoin at the end, so the
    skipped half is live across every block boundary inside the stage."""

    def __init__(self, cin: int, cout: int, depth: int):
        super().__init__()
        self.down = _conv_bn(cin, cout, 2)
        self.blocks = nn.Sequential(*[Residual(cout // 2) for _ in range(depth)])
        self.merge = nn.Conv2d(cout, cout, 1, bias=False)

    def forward(self, x):
        skip, x = self.down(x).chunk(2, dim=1)
        return self.merge(torch.cat([skip, self.blocks(x)], dim=1))


class CSPNet(nn.Module):
    def __init__(self, num_classes: int = 10, depth: int = 3):
        super().__init__()
        self.stem = _conv_bn(3, 16)
        self.stages = nn.Sequential(CSPStage(16, 32, depth), CSPStage(32, 64, depth))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(self.stages(self.stem(x)).mean((2, 3)))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.conv = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, growth, 3, 1, 1, bias=False))

    def forward(self, features: list[torch.Tensor]):
        return self.conv(torch.cat(features, dim=1))


class DenseNet(nn.Module):
    """One dense block: every layer reads all earlier features, so the feature list is live across
    every layer boundary."""

    def __init__(self, num_classes: int = 10, layers: int = 4, growth: int = 8):
        super().__init__()
        self.stem = _conv_bn(3, 16)
        self.layers = nn.ModuleList(DenseLayer(16 + i * growth, growth) for i in range(layers))
        self.fc = nn.Linear(16 + layers * growth, num_classes)

    def forward(self, x):
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(features))
        return self.fc(torch.cat(features, dim=1).mean((2, 3)))


class ClassTokenBlock(nn.Module):
    """A transformer-style block on (class token, patch tokens) kept as two tensors (as PiT does)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, cls, x):
        t = torch.cat([cls, x], dim=1)
        t = t + self.mix(self.norm(t)).mean(1, keepdim=True)  # every token sees the others
        t = t + self.mlp(t)
        return t[:, :1], t[:, 1:]


class ClassTokenNet(nn.Module):
    def __init__(self, num_classes: int = 10, dim: int = 16, depth: int = 4, patch: int = 4):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(ClassTokenBlock(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        for block in self.blocks:
            cls, x = block(cls, x)
        return self.fc(self.norm(cls[:, 0]))


class Up(nn.Module):
    """Decoder stage: upsample, concatenate the encoder's skip, convolve."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential(_conv_bn(cin + cskip, cout), _conv_bn(cout, cout))

    def forward(self, x, skip):
        return self.conv(torch.cat([F.interpolate(x, scale_factor=2.0, mode="nearest"), skip], dim=1))


class UNet(nn.Module):
    """Encoder/decoder with long skip connections; per-pixel logits N x classes x H x W."""

    def __init__(self, num_classes: int = 3, width: int = 8):
        super().__init__()
        w = width
        self.enc1 = nn.Sequential(_conv_bn(3, w), _conv_bn(w, w))
        self.enc2 = nn.Sequential(_conv_bn(w, 2 * w, 2), _conv_bn(2 * w, 2 * w))
        self.mid = nn.Sequential(_conv_bn(2 * w, 4 * w, 2), _conv_bn(4 * w, 4 * w))
        self.up2 = Up(4 * w, 2 * w, 2 * w)
        self.up1 = Up(2 * w, w, w)
        self.out = nn.Conv2d(w, num_classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        b = self.mid(e2)
        return self.out(self.up1(self.up2(b, e2), e1))


class ShapeReadNet(nn.Module):
    """Reads ``B, C, H, W = x.shape`` before a stack of token blocks and uses the sizes after it (as
    PiT and Twins do): the sizes are live across every block boundary, beside the tokens."""

    def __init__(self, num_classes: int = 10, dim: int = 16, depth: int = 3):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.ModuleList(TokenBlock(dim) for _ in range(depth))
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x)
        B, C, H, W = x.shape
        t = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            t = block(t)
        x = self.conv(t.transpose(1, 2).reshape(B, C, H // 1, W))
        return self.fc(x.mean((2, 3)))


# -- one model per tensor layout (issue 25: axes measured, adapters along what each axis is) ---------
class M5(nn.Module):
    """M5 (Dai et al. 2017) as torchaudio's speech-command tutorial writes it, on raw waveforms
    (N, 1, T): four Conv1d / BatchNorm1d / ReLU / MaxPool1d(4) stages over time, mean over time, a
    linear classifier. Its maps (N, C, T) have channels first."""

    def __init__(self, num_classes: int = 35, width: int = 32, stride: int = 16):
        super().__init__()
        w = width
        self.stages = nn.Sequential(*[
            nn.Sequential(nn.Conv1d(cin, cout, k, stride=s), nn.BatchNorm1d(cout), nn.ReLU(), nn.MaxPool1d(4))
            for cin, cout, k, s in [(1, w, 80, stride), (w, w, 3, 1), (w, 2 * w, 3, 1), (2 * w, 2 * w, 3, 1)]])
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x):
        return self.fc(self.stages(x).mean(-1))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    """A ShuffleNet-v2-style unit: split the channels, convolve one half, concatenate, shuffle."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.short = nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                                       nn.BatchNorm2d(cin), nn.Conv2d(cin, half, 1, bias=False), nn.BatchNorm2d(half),
                                       nn.ReLU())
        body_in = cin if stride > 1 else half
        self.body = nn.Sequential(nn.Conv2d(body_in, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
                                  nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False), nn.BatchNorm2d(half),
                                  nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU())

    def forward(self, x):
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat([a, self.body(b)], dim=1)
        else:
            out = torch.cat([self.short(x), self.body(x)], dim=1)
        return channel_shuffle(out, 2)


class ShuffleNet(nn.Module):
    """Channel shuffle between units (``view(b, g, c/g, h, w)``): a reshape that keeps W last, which a
    layout guess from the graph alone once took for a channels-last map (torchvision's shufflenet_v2)."""

    def __init__(self, num_classes: int = 10, widths=(24, 48, 96), repeats=(1, 2, 1)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        units, cin = [], widths[0]
        for w, r in zip(widths, repeats):
            units.append(ShuffleUnit(cin, w, 2))
            units += [ShuffleUnit(w, w, 1) for _ in range(r)]
            cin = w
        self.units = nn.Sequential(*units)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.units(self.stem(x)).mean((2, 3)))


class Video3d(nn.Module):
    """A small 3-d conv net on clips (N, 3, D, H, W): Conv3d / BatchNorm3d residual blocks."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv3d(3, w, 3, 1, 1, bias=False), nn.BatchNorm3d(w), nn.ReLU())
        self.blocks = nn.ModuleList([self._block(w, w, 1), self._block(w, 2 * w, 2), self._block(2 * w, 2 * w, 1),
                                     self._block(2 * w, 4 * w, 2)])
        self.fc = nn.Linear(4 * w, num_classes)

    @staticmethod
    def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv3d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm3d(cout), nn.ReLU())

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean((2, 3, 4)))


class LayerNormLast(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = nn.LayerNorm(c)

    def forward(self, x):
        return self.norm(x)


class NHWCConvNet(nn.Module):
    """ConvNeXt-style blocks that keep maps channels-last (N, H, W, C) between blocks: a depthwise conv
    on a permuted view, LayerNorm and Linear layers over C, downsampling by a strided conv."""

    def __init__(self, num_classes: int = 10, widths=(16, 16, 32, 32)):
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 4, 4)
        self.blocks = nn.ModuleList()
        self.downs = nn.ModuleDict()
        cin = widths[0]
        for i, w in enumerate(widths):
            if w != cin:
                self.downs[str(i)] = nn.Conv2d(cin, w, 2, 2)
            self.blocks.append(_NHWCBlock(w))
            cin = w
        self.norm = nn.LayerNorm(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)
        for i, block in enumerate(self.blocks):
            if str(i) in self.downs:
                x = self.downs[str(i)](x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            x = block(x)
        return self.fc(self.norm(x.mean((1, 2))))


class _NHWCBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, x):
        y = self.dw(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(self.norm(y))


class VectorMLP(nn.Module):
    """Residual MLP on flat feature vectors (N, D): tabular data."""

    def __init__(self, num_classes: int = 10, features: int = 20, dim: int = 32, depth: int = 4):
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
                                    for _ in range(depth))
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = x + block(x)
        return self.fc(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class GPTBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """nanoGPT's shape: token and position embeddings, pre-norm causal blocks, a final norm and an LM
    head. Takes token ids (N, T) and returns per-token logits (N, T, vocab)."""

    def __init__(self, vocab: int = 64, block_size: int = 32, dim: int = 32, heads: int = 4, depth: int = 6):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(block_size, dim)
        self.blocks = nn.ModuleList(GPTBlock(dim, heads) for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class MaskedBlock(nn.Module):
    """A pre-norm encoder block whose attention skips padding: ``mask`` (N, T) is True at tokens."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, mask):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class MaskedTextClassifier(nn.Module):
    """A BERT-shaped classifier of two inputs, as Hugging Face models take them: token ids (N, T) and
    an attention mask (N, T), True at tokens and False at padding; mean over the tokens, a linear head."""

    def __init__(self, vocab: int = 64, max_len: int = 32, dim: int = 32, heads: int = 4, depth: int = 4,
                 classes: int = 5):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(MaskedBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids, mask):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x, mask)
        keep = mask.unsqueeze(-1).to(x.dtype)
        return self.head((self.norm(x) * keep).sum(1) / keep.sum(1).clamp(min=1))


class ImageWithMetadata(nn.Module):
    """An image (N, 3, H, W) and a metadata vector per sample (N, M): age, site, scanner. A small
    conv net on the image; its pooled features meet the embedded metadata at the classifier."""

    def __init__(self, meta: int = 6, width: int = 16, classes: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.stages = nn.Sequential(*(nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False),
                                                    nn.BatchNorm2d(width), nn.ReLU()) for _ in range(4)))
        self.embed_meta = nn.Sequential(nn.Linear(meta, width), nn.ReLU())
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, image, meta):
        x = self.stages(self.stem(image)).mean((2, 3))
        return self.fc(torch.cat([x, self.embed_meta(meta)], 1))


class SplitQKVAttention(nn.Module):
    """Attention as it is often written: q, k, v from a generator over ``qkv(x).split(C, 2)``, which
    torch.fx cannot trace (a proxy cannot be iterated), and attention dropout as a function of
    ``self.training``, which a trace fixes to the mode it was made in."""

    def __init__(self, dim: int, heads: int, drop: float = 0.1):
        super().__init__()
        self.heads, self.drop = heads, drop
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in self.qkv(x).split(C, 2))
        a = F.dropout((q @ k.transpose(-2, -1) * (C // self.heads) ** -0.5).softmax(-1), self.drop, self.training)
        return self.proj((a @ v).transpose(1, 2).reshape(B, T, C))


class SplitQKVBlock(nn.Module):
    def __init__(self, dim: int, heads: int, drop: float):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), SplitQKVAttention(dim, heads, drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(drop), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SplitQKVViT(nn.Module):
    """A small ViT of ``SplitQKVAttention`` blocks over 4x4 patches, with a batch-normed stem:
    only the torch.export front end traces it."""

    def __init__(self, depth: int = 4, dim: int = 32, heads: int = 4, num_classes: int = 10, drop: float = 0.1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 4, 4), nn.BatchNorm2d(dim))
        self.blocks = nn.Sequential(*[SplitQKVBlock(dim, heads, drop) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(1))
