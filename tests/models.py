"""Fixture zoo: tiny modules, one per graph pattern the passes must handle.

``ZOO`` maps a name to ``(build, example_inputs)``; both are callables so every test gets fresh,
seeded objects. When a real model breaks a rule, the smallest module that shows it goes here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class ResidualAdd(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut, summed (ResNet basic block) -> pool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        x = F.relu(x + y)
        return self.fc(x.mean((2, 3)))


class Concat(nn.Module):
    """Two conv branches concatenated on channels, then a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.mix = nn.Conv2d(10, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1))


class DepthwiseGrouped(nn.Module):
    """Pointwise expand, depthwise conv (groups=C), grouped conv (groups=2)."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 1, bias=False)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 6, 3, padding=1, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.expand(x))
        x = F.relu6(self.bn(self.dw(x)))
        return self.grouped(x)


class FlattenLinear(nn.Module):
    """conv -> ReLU -> flatten (C*H*W) -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


class AttentionHeads(nn.Module):
    """ViT-style block: LayerNorm, qkv linear, explicit q@k^T/softmax/@v over heads, projection, MLP."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(8, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        ctx = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(ctx)
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(x.mean(1))


class SDPAAttention(nn.Module):
    """Attention through F.scaled_dot_product_attention (as timm emits it)."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        ctx = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(ctx.transpose(1, 2).reshape(b, n, c))


class LayerNormMLP(nn.Module):
    """Pre-norm transformer MLP with a residual: x + fc2(GELU(fc1(LN(x))))."""

    def __init__(self, dim: int = 12) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class FunctionalOps(nn.Module):
    """Parameters used functionally: F.conv2d, F.linear, ``@`` and torch.matmul with a transpose."""

    def __init__(self) -> None:
        super().__init__()
        self.cw = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.2)
        self.cb = nn.Parameter(torch.randn(4) * 0.1)
        self.lw = nn.Parameter(torch.randn(6, 4) * 0.3)
        self.m = nn.Parameter(torch.randn(6, 5) * 0.3)
        self.m2 = nn.Parameter(torch.randn(3, 5) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(F.conv2d(x, self.cw, self.cb, padding=1)).mean((2, 3))
        y = F.linear(y, self.lw)
        y = y @ self.m
        return torch.matmul(y, self.m2.t())


class MHA(nn.Module):
    """nn.MultiheadAttention (a torch.nn leaf: gated at module level) and a linear head."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(6, dim)
        self.mha = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.out = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        a, _ = self.mha(h, h, h)
        return self.out((h + a).mean(1))


class ConvVariety(nn.Module):
    """Conv1d, ConvTranspose1d, a reflect-padded Conv1d (module-level gating) and Conv3d."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, padding=1)
        self.t1 = nn.ConvTranspose1d(4, 3, 4, stride=2, padding=1)
        self.reflect = nn.Conv1d(3, 3, 3, padding=1, padding_mode="reflect")
        self.c3 = nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.reflect(F.relu(self.t1(F.relu(self.c1(x)))))  # (B, 3, 2L)
        z = self.c3(y.unsqueeze(1).unsqueeze(-1))  # (B, 1, 3, 2L, 1) -> (B, 2, 3, 2L, 1)
        return z.mean((1, 2, 4))


class SharedWeight(nn.Module):
    """One parameter used by two linear ops (one gate), and an embedding tied to the output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.shared = nn.Linear(8, 8)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        h = F.relu(self.shared(h))
        h = F.relu(self.shared(h))
        return F.linear(h, self.emb.weight)  # tied output layer: an embedding, never gated


class StandardizedConv(nn.Module):
    """A conv whose weight is computed from its parameter (weight standardisation): reported, not gated."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        w = w / (self.weight.std((1, 2, 3), keepdim=True) + 1e-5)
        return self.fc(F.conv2d(x, w, padding=1).mean((2, 3)))


class DataDependentBlock(nn.Module):
    """Python control flow on a tensor value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return F.relu(self.bn(self.conv(x)))
        return self.bn(self.conv(x))


class WithOpaqueBlock(nn.Module):
    """A traceable model around an untraceable block: the block becomes an opaque leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = DataDependentBlock()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


class UntraceableRoot(nn.Module):
    """Control flow on a tensor value in the root forward itself: cannot be traced at all."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return self.fc(x)
        return -self.fc(x)


def _seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return build()
    return make


def _inputs(*shape: int) -> Callable[[], tuple[torch.Tensor, ...]]:
    def make() -> tuple[torch.Tensor, ...]:
        return (torch.randn(*shape, generator=torch.Generator().manual_seed(1)),)
    return make


#: name -> (build, example_inputs). Every model here traces (with fallback) and has gateable weights.
ZOO: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple[torch.Tensor, ...]]]] = {
    "residual_add": (_seeded(ResidualAdd), _inputs(2, 3, 8, 8)),
    "concat": (_seeded(Concat), _inputs(2, 3, 8, 8)),
    "depthwise_grouped": (_seeded(DepthwiseGrouped), _inputs(2, 3, 8, 8)),
    "flatten_linear": (_seeded(FlattenLinear), _inputs(2, 1, 8, 8)),
    "attention_heads": (_seeded(AttentionHeads), _inputs(2, 5, 8)),
    "sdpa_attention": (_seeded(SDPAAttention), _inputs(2, 5, 16)),
    "layernorm_mlp": (_seeded(LayerNormMLP), _inputs(2, 5, 12)),
    "functional_ops": (_seeded(FunctionalOps), _inputs(2, 3, 6, 6)),
    "mha": (_seeded(MHA), _inputs(2, 5, 6)),
    "conv_variety": (_seeded(ConvVariety), _inputs(2, 2, 6)),
    "shared_weight": (_seeded(SharedWeight), lambda: (torch.tensor([[1, 2, 3], [4, 5, 9]]),)),
    "opaque_block": (_seeded(WithOpaqueBlock), _inputs(2, 3, 8, 8)),
}


class NoBiasChain(nn.Module):
    """Bias-free convs with ReLU and no norm: a channel whose weights are all masked is exactly dead."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).mean((2, 3)))


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc(relu(fc(mean(x))))): the excitation's output channels go with x's group."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.squeeze = nn.Conv2d(8, 4, 1)
        self.excite = nn.Conv2d(4, 8, 1)
        self.proj = nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.bn(self.conv(x)))
        s = torch.sigmoid(self.excite(F.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))
        return self.proj(x * s).mean((2, 3))


class RollBranch(nn.Module):
    """An op outside the channel support table (torch.roll over channels) on one branch."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.roll(F.relu(self.a(x)), 1, dims=1)
        return self.head(torch.cat([a, F.relu(self.b(x))], dim=1)).mean((2, 3))


class DropPath(nn.Module):
    """Stochastic depth as third-party code writes it: the identity at eval, random in training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = (torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) >= self.p).to(x.dtype)
        return x * keep / (1 - self.p)


class DropoutDropPath(nn.Module):
    """A residual block whose branch goes through a drop path, and a functional dropout before the
    head, written with ``training=self.training``: eval is deterministic, training is not."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.drop_path = DropPath(0.5)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = x + self.drop_path(F.relu(self.conv(x)))
        return self.fc(F.dropout(x.mean((2, 3)), 0.3, training=self.training))


class StochasticDepthBlock(nn.Module):
    """torchvision's drop path: a ``StochasticDepth`` module, whose forward calls the traced-through
    function ``torchvision.ops.stochastic_depth(x, p, mode, self.training)``."""

    def __init__(self) -> None:
        super().__init__()
        import torchvision

        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.drop = torchvision.ops.StochasticDepth(0.5, "row")
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = x + self.drop(F.relu(self.conv(x)))
        return self.fc(x.mean((2, 3)))


class GroupedBottleneck(nn.Module):
    """ResNeXt-style: 1x1 -> BN -> 3x3 grouped (groups=4) -> BN -> 1x1 added to the stream; then a
    grouped conv reading the residual stream (groups=2, 8 -> 4): the stem and the block's last conv,
    tied by the add, are split over its groups together."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 1, bias=False)
        self.bna = _random_affine(nn.BatchNorm2d(8))
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
        self.bng = _random_affine(nn.BatchNorm2d(8))
        self.c = nn.Conv2d(8, 8, 1)
        self.g2 = nn.Conv2d(8, 4, 3, padding=1, groups=2)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        y = F.relu(self.bng(self.g(F.relu(self.bna(self.a(x))))))
        x = F.relu(x + self.c(y))
        return self.head(F.relu(self.g2(x)).mean((2, 3)))


class DepthwiseMultiplier(nn.Module):
    """A depthwise conv with a channel multiplier (8 -> 16, groups=8): input channel i owns outputs 2i, 2i+1."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.bn = _random_affine(nn.BatchNorm2d(16))
        self.pw = nn.Conv2d(16, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.dw(F.relu(self.stem(x)))))
        return self.head(F.relu(self.pw(x)).mean((2, 3)))


class ConcatBatchNorm(nn.Module):
    """DenseNet-style: BatchNorm over concatenations of features, each run sliced with its space."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv1 = nn.Conv2d(6, 4, 3, padding=1)
        self.bn1 = _random_affine(nn.BatchNorm2d(10))
        self.conv2 = nn.Conv2d(10, 5, 1)
        self.bn2 = _random_affine(nn.BatchNorm2d(15))
        self.head = nn.Linear(15, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        z = torch.cat([x, self.conv1(F.relu(x))], 1)
        z = torch.cat([z, self.conv2(F.relu(self.bn1(z)))], 1)
        return self.head(F.relu(self.bn2(z)).mean((2, 3)))


class SplitChunk(nn.Module):
    """MixNet / CSP-style: a conv's output split into runs (split with sizes, chunk), each through its
    own depthwise conv or conv, concatenated back and normalised, a squeeze-excite scale tied run by
    run, a slice ``z[:, 2:6]`` and a ``narrow``: the stem's space is cut into the pieces taken."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.bn = _random_affine(nn.BatchNorm2d(8))
        self.dw3 = nn.Conv2d(3, 3, 3, padding=1, groups=3)
        self.dw5 = nn.Conv2d(5, 5, 5, padding=2, groups=5)
        self.bn2 = _random_affine(nn.BatchNorm2d(8))
        self.se = nn.Conv2d(8, 8, 1)
        self.part = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(14, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        a, b = torch.split(x, [3, 5], dim=1)
        y = F.relu(self.bn2(torch.cat([self.dw3(a), self.dw5(b)], 1)))
        y = y * torch.sigmoid(self.se(y.mean((2, 3), keepdim=True)))
        c, d = y.chunk(2, 1)
        z = torch.cat([c, F.relu(self.part(d))], 1)
        s = z[:, 2:6]
        n = torch.narrow(z, 1, 0, 2)
        return self.head(torch.cat([z, s, n], 1).mean((2, 3)))


class GroupNorms(nn.Module):
    """GroupNorm over the channels: one group (PoolFormer's GroupNorm1, statistics over C x H x W, as a
    functional call) and two groups (the space split over them: each keeps as many channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.gn1 = _random_affine(nn.GroupNorm(1, 8))
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.gn2 = _random_affine(nn.GroupNorm(2, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + F.relu(self.conv(F.group_norm(x, 1, self.gn1.weight, self.gn1.bias, self.gn1.eps)))
        x = F.relu(self.gn2(x))
        return self.head(x.mean((2, 3)))


class ViewedLayerScale(nn.Module):
    """PoolFormer's layer scale: a per-channel parameter viewed to (C, 1, 1) with the width written out,
    so the fold must rewrite the view's sizes along with the parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(8) + 0.5)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.scale.view(8, 1, 1) * F.relu(self.conv(x))
        return self.head(x.mean((2, 3)))


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * windows, ws * ws, C); a leaf function of the trace (as timm's)."""
    b, h, w, c = x.shape
    return x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)


def window_reverse(x: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """(B * windows, ws, ws, C) -> (B, H, W, C); a leaf function of the trace."""
    c = x.shape[-1]
    return x.view(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


torch.fx.wrap("window_partition")
torch.fx.wrap("window_reverse")


class ShiftedWindows(nn.Module):
    """A Swin block's attention: padding to whole windows, a cyclic shift (roll), window partition and
    reverse as leaf functions outside the op table, a relative position bias gathered from a table
    per head, nn.Softmax; the embedding width runs through LayerNorm and a residual."""

    def __init__(self, dim: int = 8, heads: int = 2, ws: int = 2) -> None:
        super().__init__()
        self.ws, self.heads, self.scale = ws, heads, (dim // heads) ** -0.5
        self.embed = nn.Conv2d(3, dim, 1)
        self.norm = _random_affine(nn.LayerNorm(dim))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.randn((2 * ws - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
        self.register_buffer("bias_index", rel[..., 0] * (2 * ws - 1) + rel[..., 1], persistent=False)
        self.softmax = nn.Softmax(dim=-1)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).permute(0, 2, 3, 1)
        _, h, w, c = x.shape
        pad_h, pad_w = (self.ws - h % self.ws) % self.ws, (self.ws - w % self.ws) % self.ws
        y = torch.roll(F.pad(self.norm(x), (0, 0, 0, pad_w, 0, pad_h)), (-1, -1), (1, 2))
        hp, wp = y.shape[1], y.shape[2]
        win = window_partition(y, self.ws)
        bw, n = win.shape[0], win.shape[1]
        q, k, v = self.qkv(win).reshape(bw, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.bias_table[self.bias_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        attn = self.softmax((q * self.scale) @ k.transpose(-2, -1) + bias.unsqueeze(0))
        out = self.proj((attn @ v).transpose(1, 2).reshape(bw, n, -1))
        y = torch.roll(window_reverse(out.view(-1, self.ws, self.ws, c), self.ws, hp, wp), (1, 1), (1, 2))
        x = x + y[:, :h, :w, :]
        return self.head(x.mean((1, 2)))


class ResponseNorm(nn.Module):
    """ConvNeXt-V2's global response norm on an MLP's hidden units (channels last): each channel's
    spatial L2 norm divided by its mean over the channels (made mask-aware), then
    bias + weight * x * n (addcmul) added back."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.gamma = nn.Parameter(torch.rand(16) + 0.5)
        self.beta = nn.Parameter(torch.randn(16))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        t = F.gelu(self.fc1(x.permute(0, 2, 3, 1)))
        g = t.norm(p=2, dim=(1, 2), keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        t = t + torch.addcmul(self.beta.view(1, 1, 1, 16), self.gamma.view(1, 1, 1, 16), t * n)
        x = x + self.fc2(t).permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


class GluHalves(nn.Module):
    """Gated linear units over the channels: ``F.glu`` on a conv's output (its two halves tied unit by
    unit) and an ``nn.GLU`` module on an MLP's hidden units, beside a GLU over a spatial dim (the label
    passes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.mix = nn.Conv2d(8, 12, 1)
        self.fc1 = nn.Linear(6, 20)
        self.glu = nn.GLU(dim=-1)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.glu(self.conv(x), dim=1)
        y = F.glu(self.mix(y), dim=2)  # over the rows: the channels pass
        return self.fc2(self.glu(self.fc1(y.mean(2).mean(2)[:, :6])))


class SplitAttention(nn.Module):
    """ResNeSt's split attention (radix 2): a conv grouped by radix, its halves summed for a squeeze, and
    a radix softmax (a softmax across the two halves of each channel) weighting the halves before they
    are summed again. The channel count is read at run time and divided by the radix."""

    def __init__(self, radix: int = 2) -> None:
        super().__init__()
        self.radix = radix
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 6 * radix, 3, padding=1, groups=radix)
        self.bn0 = nn.BatchNorm2d(6 * radix)
        self.fc1 = nn.Conv2d(6, 4, 1)
        self.fc2 = nn.Conv2d(4, 6 * radix, 1)
        self.head = nn.Conv2d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.conv(F.relu(self.stem(x)))))
        b, rc, h, w = x.shape
        x = x.reshape((b, self.radix, rc // self.radix, h, w))
        gap = F.relu(self.fc1(x.sum(dim=1).mean((2, 3), keepdim=True)))
        attn = self.fc2(gap)
        attn = F.softmax(attn.view(b, 1, self.radix, -1).transpose(1, 2), dim=1).reshape(b, -1)
        attn = attn.view(b, -1, 1, 1).reshape((b, self.radix, rc // self.radix, 1, 1))
        return self.head((x * attn).sum(dim=1)).mean((2, 3))


class NarrowKeys(nn.Module):
    """LeViT's attention: one fused projection with a BatchNorm (over the tokens flattened into the
    batch, put back with ``reshape_as``), viewed as heads whose rows are cut into q and k narrower than
    v; attention with a learned bias, then the values' heads projected."""

    def __init__(self, heads: int = 2, key_dim: int = 2, val_dim: int = 4) -> None:
        super().__init__()
        self.heads, self.key_dim, self.val_dim = heads, key_dim, val_dim
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.qkv = nn.Linear(8, heads * (2 * key_dim + val_dim), bias=False)
        self.bn = nn.BatchNorm1d(heads * (2 * key_dim + val_dim))
        self.bias = nn.Parameter(torch.randn(heads, 36, 36) * 0.1)
        self.proj = nn.Linear(heads * val_dim, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2)
        b, n, _ = t.shape
        qkv = self.qkv(t)
        qkv = self.bn(qkv.flatten(0, 1)).reshape_as(qkv)
        q, k, v = qkv.view(b, n, self.heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        attn = (q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1)) * self.key_dim ** -0.5 + self.bias
        out = (attn.softmax(dim=-1) @ v.permute(0, 2, 1, 3)).transpose(1, 2).reshape(b, n, -1)
        return self.head((t + self.proj(F.relu(out))).mean(1))


class MultiplierResidual(nn.Module):
    """FastViT's downsampling: a depthwise conv with a channel multiplier of 2 (each input channel owns
    two outputs), then a block adding a 1x1 conv's output to a BatchNorm of its input: the 1x1 conv's
    rows are tied two by two to the multiplier's channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.dw = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=4)
        self.pw = nn.Conv2d(8, 8, 1)
        self.identity = nn.BatchNorm2d(8)
        self.dw2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(F.relu(self.stem(x)))
        y = F.relu(self.identity(y) + self.pw(y))
        return self.head(y + self.dw2(y)).mean((2, 3))


class UnequalQKV(nn.Module):
    """One fused projection cut into unequal pieces, q and k narrower than v, each viewed as two heads;
    attention over the pieces: the heads of the three pieces are one group."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.qkv = nn.Linear(8, 4 + 4 + 8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2)
        b, n, _ = t.shape
        q, k, v = self.qkv(t).split([4, 4, 8], dim=-1)
        q, k, v = (z.view(b, n, 2, -1).transpose(1, 2) for z in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, 8)
        return self.head((t + self.proj(o)).mean(1))


class TrainingBranch(nn.Module):
    """``if self.training:`` code that is neither a dropout nor a drop path."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        if self.training:
            x = x + 0.1 * torch.randn_like(x)
        return self.fc(x.mean((2, 3)))


class ViewAs(nn.Module):
    """A branch computed in flattened form and put back with ``view_as`` before a residual add: the
    branch's channels and the stem's are one group."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Conv1d(8, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.stem(x))
        z = F.relu(self.mix(y.flatten(2))).view_as(y)
        return self.head(z + y).mean((2, 3))


def _random_affine(norm: nn.Module) -> nn.Module:
    """A norm with its affine parameters drawn away from 1 / 0 (so a wrong slice shows)."""
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        if getattr(norm, "bias", None) is not None:
            norm.bias.normal_(0.0, 0.1)
    return norm


class TinyViT(nn.Module):
    """The residual stream of a ViT: patch embedding, a class token and a position embedding (sliced
    with the channels), pre-norm blocks (LayerNorm over the channels: mask-aware), attention that reads
    its width at run time only to size the reshape back (``b, n, c = x.shape``), a final norm."""

    def __init__(self, dim: int = 8, heads: int = 2, depth: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.patch = nn.Conv2d(3, dim, 2, stride=2)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 10, dim) * 0.1)
        self.norms = nn.ModuleList(_random_affine(nn.LayerNorm(dim)) for _ in range(2 * depth + 1))
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(depth))
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.fc1 = nn.ModuleList(nn.Linear(dim, 2 * dim) for _ in range(depth))
        self.fc2 = nn.ModuleList(nn.Linear(2 * dim, dim) for _ in range(depth))
        self.head = nn.Linear(dim, 3)

    def attention(self, i: int, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv[i](x).reshape(b, n, 3, self.heads, 4).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj[i](F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for i in range(len(self.qkv)):
            x = x + self.attention(i, self.norms[2 * i](x))
            x = x + self.fc2[i](F.gelu(self.fc1[i](self.norms[2 * i + 1](x))))
        return self.head(self.norms[-1](x)[:, 0])


class NormVariety(nn.Module):
    """Norms over the channels in other forms: a post-norm block with nn.RMSNorm, a functional
    layer_norm, a ConvNeXt-style LayerNorm2d (permute, norm, permute back) with a layer scale."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 3, padding=1)
        self.ln2d = _random_affine(nn.LayerNorm(dim))
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.rms = _random_affine(nn.RMSNorm(dim))
        self.w = nn.Parameter(torch.rand(dim) + 0.5)
        self.b = nn.Parameter(torch.randn(dim) * 0.1)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.ln2d(self.dw(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = x + y * self.gamma.reshape(1, -1, 1, 1)
        t = x.flatten(2).transpose(1, 2)
        t = self.rms(t + self.fc2(F.relu(self.fc1(t))))
        t = F.layer_norm(t, (t.shape[-1],), self.w, self.b)
        return self.head(t.mean(1))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's shuffle, as torchvision writes it: the channels viewed as (groups, C / groups),
    transposed, merged back (read at run time from the tensor's sizes)."""
    b, c, h, w = x.size()
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


class ChannelShuffle(nn.Module):
    """ShuffleNetV2's blocks: two branches concatenated and shuffled, then blocks that chunk the shuffled
    channels in halves, pass one half through and concatenate it with the other's branch, shuffled
    again (in groups of 2 and of 3); a depthwise conv and a BatchNorm over shuffled channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.left = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.BatchNorm2d(6), nn.Conv2d(6, 6, 1))
        self.right = nn.Sequential(nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6), nn.ReLU())
        self.branch = nn.ModuleList(nn.Sequential(nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6), nn.ReLU()) for _ in range(2))
        self.mix = nn.Sequential(nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.BatchNorm2d(12))
        self.head = nn.Conv2d(12, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = channel_shuffle(torch.cat((self.left(x), self.right(x)), dim=1), 2)
        for branch, groups in zip(self.branch, (2, 3), strict=True):
            x1, x2 = x.chunk(2, dim=1)
            x = channel_shuffle(torch.cat((x1, branch(x2)), dim=1), groups)
        return self.head(F.relu(self.mix(x))).mean((2, 3))


#: models the channel fold must handle exactly (channel granularity)
FOLD_ZOO = dict(ZOO)
FOLD_ZOO.update({
    "no_bias_chain": (_seeded(NoBiasChain), _inputs(2, 3, 6, 6)),
    "squeeze_excite": (_seeded(SqueezeExcite), _inputs(2, 3, 6, 6)),
    "roll_branch": (_seeded(RollBranch), _inputs(2, 3, 6, 6)),
    "dropout_drop_path": (_seeded(DropoutDropPath), _inputs(2, 3, 6, 6)),
    "stochastic_depth": (_seeded(StochasticDepthBlock), _inputs(2, 3, 6, 6)),
    "grouped_bottleneck": (_seeded(GroupedBottleneck), _inputs(2, 3, 6, 6)),
    "depthwise_multiplier": (_seeded(DepthwiseMultiplier), _inputs(2, 3, 6, 6)),
    "concat_batchnorm": (_seeded(ConcatBatchNorm), _inputs(2, 3, 6, 6)),
    "split_chunk": (_seeded(SplitChunk), _inputs(2, 3, 6, 6)),
    "group_norms": (_seeded(GroupNorms), _inputs(2, 3, 6, 6)),
    "viewed_layer_scale": (_seeded(ViewedLayerScale), _inputs(2, 3, 6, 6)),
    "shifted_windows": (_seeded(ShiftedWindows), _inputs(2, 3, 5, 5)),
    "response_norm": (_seeded(ResponseNorm), _inputs(2, 3, 6, 6)),
    "view_as": (_seeded(ViewAs), _inputs(2, 3, 6, 6)),
    "glu_halves": (_seeded(GluHalves), _inputs(2, 3, 6, 6)),
    "split_attention": (_seeded(SplitAttention), _inputs(2, 3, 6, 6)),
    "narrow_keys": (_seeded(NarrowKeys), _inputs(2, 3, 6, 6)),
    "multiplier_residual": (_seeded(MultiplierResidual), _inputs(2, 3, 6, 6)),
    "unequal_qkv": (_seeded(UnequalQKV), _inputs(2, 3, 6, 6)),
    "tiny_vit": (_seeded(TinyViT), _inputs(2, 3, 6, 6)),
    "norm_variety": (_seeded(NormVariety), _inputs(2, 3, 6, 6)),
    "channel_shuffle": (_seeded(ChannelShuffle), _inputs(2, 3, 6, 6)),
})


def build_real(lib: str, name: str, size: int) -> nn.Module:
    """A timm / torchvision model, random init, made sensitive for equivalence tests (STYLE.md): norm
    affine parameters drawn away from their init (timm zero-initialises each residual branch's last
    BN, which would hide whole branches) and BatchNorm statistics re-estimated on random data."""
    torch.manual_seed(0)
    if lib == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
    else:
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
    norms = [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm))
             or "Norm" in type(m).__name__]
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in norms:
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the batches below
        model.train()
        for _ in range(2):
            model(torch.randn(4, 3, size, size, generator=gen))
    return model.eval()


#: the real zoo of the acceptance criteria: (library, name, input size)
REAL_ZOO = [
    ("torchvision", "resnet18", 32),
    ("torchvision", "resnet50", 32),
    ("torchvision", "vgg19_bn", 32),
    ("torchvision", "mobilenet_v2", 32),
    ("timm", "resnet18", 32),
    ("timm", "mobilenetv3_small_100", 32),
    ("timm", "efficientnet_b0", 32),
    ("timm", "convnext_atto", 32),
    ("timm", "deit_tiny_patch16_224", 224),
    ("timm", "vit_tiny_patch16_224", 224),
]


# -- models captured with torch.export (frontend="export"): the patterns of LLM blocks, in plain torch ---

def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm written out, as Llama's and T5's (export keeps pow -> mean -> rsqrt -> mul)."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class TinyDecoder(nn.Module):
    """A Llama-style decoder layer: embedding, RMSNorm, grouped-query attention (4 query heads over 2
    KV heads, repeated as Hugging Face's repeat_kv), RoPE, SwiGLU MLP, LM head tied to the embedding."""

    def __init__(self, vocab: int = 23, dim: int = 16, heads: int = 4, kv_heads: int = 2, hidden: int = 24) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.embed = nn.Embedding(vocab, dim)
        self.norm1, self.norm2, self.norm_out = (nn.Parameter(torch.rand(dim) + 0.5) for _ in range(3))
        self.q = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(heads * self.head_dim, dim, bias=False)
        self.gate, self.up = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight
        freq = 1.0 / (100.0 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
        self.register_buffer("freq", freq, persistent=False)

    def _project(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.q(h), self.k(h), self.v(h)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return _rms(x, weight)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, self._repeat_kv(k), self._repeat_kv(v), is_causal=True)

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        b, h, s, d = x.shape
        rep = self.heads // self.kv_heads
        return x[:, :, None, :, :].expand(b, h, rep, s, d).reshape(b, h * rep, s, d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        b, s, _ = x.shape
        angles = torch.arange(s, dtype=torch.float32)[:, None] * self.freq[None, :]
        cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
        q, k, v = (t.view(b, s, -1, self.head_dim).transpose(1, 2) for t in self._project(self._norm(x, self.norm1)))
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        a = self._attend(q, k, v)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, -1))
        h = self._norm(x, self.norm2)
        x = x + self.down(F.silu(self.gate(h)) * self.up(h))
        return self.lm_head(self._norm(x, self.norm_out))


class TinyDecoderFusedQKV(TinyDecoder):
    """TinyDecoder with Phi-3's fused projection: one linear for q, k and v, sliced apart (4 query heads
    and 2 KV heads of one space: each piece is split into heads on its own)."""

    def __init__(self) -> None:
        super().__init__()
        del self.q, self.k, self.v
        self.qkv = nn.Linear(16, (self.heads + 2 * self.kv_heads) * self.head_dim, bias=False)

    def _project(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        qkv = self.qkv(h)
        q_end, k_end = self.heads * self.head_dim, (self.heads + self.kv_heads) * self.head_dim
        return qkv[..., :q_end], qkv[..., q_end:k_end], qkv[..., k_end:]


class TinyDecoderOffsetNorm(TinyDecoder):
    """TinyDecoder with Gemma's norm: scaled by ``1 + weight`` and cast back with ``type_as`` (Gemma
    also computes it in float32, which would keep the fold test from running in float64)."""

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (h * (1.0 + weight)).type_as(x)


class TinyDecoderSdpaGQA(TinyDecoder):
    """TinyDecoder with the KV heads left unrepeated: ``sdpa(q, k, v, enable_gqa=True)``."""

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


class FusedQKVConv1D(nn.Module):
    """A GPT-2-style block: a fused q/k/v projection as ``addmm(b, x, W)`` with W (in, out) (Hugging
    Face's Conv1D), split into q, k, v and heads; LayerNorm; a tied LM head."""

    def __init__(self, vocab: int = 19, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.wte = nn.Embedding(vocab, dim)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.c_attn_w, self.c_attn_b = nn.Parameter(torch.randn(dim, 3 * dim) * 0.2), nn.Parameter(torch.randn(3 * dim))
        self.c_proj_w, self.c_proj_b = nn.Parameter(torch.randn(dim, dim) * 0.2), nn.Parameter(torch.randn(dim))
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def _conv1d(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.addmm(b, x.view(-1, x.size(-1)), w).view(*x.shape[:-1], w.shape[1])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids)
        b, s, d = x.shape
        q, k, v = self._conv1d(self.ln1(x), self.c_attn_w, self.c_attn_b).split(d, dim=2)
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)
        x = x + self._conv1d(a, self.c_proj_w, self.c_proj_b)
        return self.lm_head(self.ln2(x))


class SharedPositionBias(nn.Module):
    """A T5-style encoder: a per-head relative position bias (an embedding of buckets) computed once,
    masked with ``where`` and added as the attention mask of two layers; RMSNorm; a pooled head."""

    def __init__(self, vocab: int = 17, dim: int = 16, heads: int = 4, buckets: int = 8) -> None:
        super().__init__()
        self.heads, self.buckets = heads, buckets
        self.embed = nn.Embedding(vocab, dim)
        self.bias = nn.Embedding(buckets, heads)
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim, bias=False) for _ in range(2))
        self.out = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(2))
        self.norms = nn.Parameter(torch.rand(3, dim) + 0.5)
        self.head = nn.Linear(dim, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        b, s, d = x.shape
        pos = torch.arange(s)
        buckets = (pos[None, :] - pos[:, None]).abs().clamp(max=self.buckets - 1)
        bias = self.bias(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, heads, s, s)
        bias = torch.where(ids[:, None, None, :] > 0, bias, -1e4)  # token 0 is padding
        for i in range(2):
            q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2)
                       for t in self.qkv[i](_rms(x, self.norms[i])).chunk(3, dim=-1))
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            x = x + self.out[i](a.transpose(1, 2).reshape(b, s, d))
        return self.head(_rms(x, self.norms[2]).mean(1))


def _tokens(vocab: int) -> Callable[[], tuple[torch.Tensor, ...]]:
    def make() -> tuple[torch.Tensor, ...]:
        return (torch.randint(1, vocab, (2, 7), generator=torch.Generator().manual_seed(1)),)
    return make


#: models captured with torch.export (frontend="export"): name -> (build, example_inputs)
EXPORT_ZOO = {
    "tiny_decoder": (_seeded(TinyDecoder), _tokens(23)),
    "tiny_decoder_fused_qkv": (_seeded(TinyDecoderFusedQKV), _tokens(23)),
    "tiny_decoder_sdpa_gqa": (_seeded(TinyDecoderSdpaGQA), _tokens(23)),
    "tiny_decoder_offset_norm": (_seeded(TinyDecoderOffsetNorm), _tokens(23)),
    "fused_qkv_conv1d": (_seeded(FusedQKVConv1D), _tokens(19)),
    "shared_position_bias": (_seeded(SharedPositionBias), _tokens(17)),
}


def build_hf(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...], dict[str, object]]:
    """A tiny random-init Hugging Face transformers model (no download): (model, inputs, keyword inputs).

    Attention-probability dropout is 0: it runs inside scaled_dot_product_attention, which the eval-mode
    capture records with dropout_p=0 (docs/frontends.md); hidden dropouts stay and follow the train flag.
    Norm affines are drawn away from their init, as :func:`build_real` does."""
    import transformers as tr

    torch.manual_seed(0)
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    ids = torch.randint(1, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    causal = {"use_cache": False}
    if name == "bert":
        model = tr.BertForSequenceClassification(tr.BertConfig(**base, num_labels=3, attention_probs_dropout_prob=0.0))
        inputs, kwargs = (ids,), {}
    elif name == "gpt2":
        model = tr.GPT2LMHeadModel(tr.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, attn_pdrop=0.0,
                                                 bos_token_id=1, eos_token_id=1))
        inputs, kwargs = (ids,), causal
    elif name == "llama":  # grouped-query attention: 4 query heads over 2 KV heads
        model = tr.LlamaForCausalLM(tr.LlamaConfig(**base, num_key_value_heads=2))
        inputs, kwargs = (ids,), causal
    elif name == "qwen2":
        model = tr.Qwen2ForCausalLM(tr.Qwen2Config(**base, num_key_value_heads=2))
        inputs, kwargs = (ids,), causal
    elif name == "vit":
        model = tr.ViTForImageClassification(tr.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
            patch_size=4, num_labels=5, attention_probs_dropout_prob=0.0))
        inputs, kwargs = (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)),), {}
    elif name in ("mistral", "phi3", "gemma"):  # grouped-query attention; Phi-3 fuses q/k/v, Gemma norms by 1 + w
        cls, cfg = {"mistral": (tr.MistralForCausalLM, tr.MistralConfig), "phi3": (tr.Phi3ForCausalLM, tr.Phi3Config),
                    "gemma": (tr.GemmaForCausalLM, tr.GemmaConfig)}[name]
        extra = {"head_dim": 8} if name == "gemma" else {"pad_token_id": 0} if name == "phi3" else {}
        model = cls(cfg(**base, num_key_value_heads=2, **extra))
        inputs, kwargs = (ids,), causal
    elif name == "opt":
        model = tr.OPTForCausalLM(tr.OPTConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32))
        inputs, kwargs = (ids,), causal
    elif name == "roberta":
        model = tr.RobertaForSequenceClassification(tr.RobertaConfig(**base, num_labels=2, pad_token_id=1,
                                                                     attention_probs_dropout_prob=0.0))
        inputs, kwargs = (ids,), {}
    elif name == "distilbert":
        model = tr.DistilBertForSequenceClassification(tr.DistilBertConfig(vocab_size=97, dim=32, n_layers=2,
                                                                           n_heads=4, hidden_dim=64,
                                                                           attention_dropout=0.0))
        inputs, kwargs = (ids,), {}
    elif name == "t5_encoder":  # with a pooled classifier, so the hidden width is not the graph's output
        model = T5EncoderClassifier(tr.T5EncoderModel(tr.T5Config(
            vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0)))
        inputs, kwargs = (ids,), {}
    else:
        raise KeyError(name)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(4)
        for pname, p in model.named_parameters():
            if "norm" in pname.lower() or ".ln_" in pname:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return model.eval(), inputs, kwargs


class T5EncoderClassifier(nn.Module):
    """A T5 encoder, mean-pooled, and a linear classifier."""

    def __init__(self, encoder: nn.Module, classes: int = 3) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.d_model, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(ids).last_hidden_state.mean(1))


#: the Hugging Face acceptance set (tests skip without the [hf] extra)
HF_ZOO = ["bert", "gpt2", "llama", "qwen2", "vit", "t5_encoder"]
#: more architectures, measured by tools/bench_transformers.py --extra
HF_EXTRA = ["mistral", "phi3", "gemma", "opt", "roberta", "distilbert"]
