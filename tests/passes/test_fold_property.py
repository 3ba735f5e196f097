"""Property test: on generated small networks mixing conv / BN / activations / depthwise (with a channel
multiplier) / grouped convs / strided convs with upsampling / add / cat / split / chunk / narrow /
channel slices / permute + LayerNorm / GroupNorm / per-channel scale and shift parameters / response
norm / squeeze-excite / gated linear units over the channels / split attention / channel shuffles / pooling /
view_as / dropout / flatten /
linear chains, fold is exact for random masks and deletes every closed unit of a deletable group,
every time (500 gated networks per run, derandomised so CI sees the same ones; a network with
nothing gated is replaced by another). Every construct must be drawn into a fold that deleted."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from equivalence import assert_fold_exact
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from torch import nn

import hyperflux_fx as hf

#: the constructs of the networks whose fold deleted units (filled by the property test, read after it:
#: `make test` runs --dist loadfile, so one worker runs both, in order)
DELETED_WITH: set[str] = set()

_ACTS = {"relu": F.relu, "silu": F.silu, "gelu": F.gelu, "sigmoid": torch.sigmoid, "none": lambda t: t}

step = st.one_of(
    st.tuples(st.just("conv"), st.integers(0, 99), st.integers(2, 8), st.sampled_from([1, 3]), st.booleans(),
              st.booleans(), st.sampled_from(sorted(_ACTS))),
    st.tuples(st.just("dw"), st.integers(0, 99), st.booleans(), st.sampled_from(sorted(_ACTS))),
    st.tuples(st.just("add"), st.integers(0, 99), st.integers(0, 99)),
    st.tuples(st.just("cat"), st.integers(0, 99), st.integers(0, 99)),
    st.tuples(st.just("se"), st.integers(0, 99)),
    st.tuples(st.just("pool"), st.integers(0, 99), st.sampled_from(["max", "avg", "view_as", "dropout"])),
    st.tuples(st.just("grouped"), st.integers(0, 99), st.sampled_from([2, 4, 6, 8]), st.booleans()),
    st.tuples(st.just("dwmult"), st.integers(0, 99)),
    st.tuples(st.just("stride"), st.integers(0, 99), st.integers(2, 8)),
    st.tuples(st.just("cut"), st.integers(0, 99), st.sampled_from(["split", "chunk", "narrow", "slice"]),
              st.integers(1, 7)),
    st.tuples(st.just("ln"), st.integers(0, 99)),
    st.tuples(st.just("gn"), st.integers(0, 99), st.sampled_from([1, 2])),
    st.tuples(st.just("scale"), st.integers(0, 99)),
    st.tuples(st.just("grn"), st.integers(0, 99)),
    st.tuples(st.just("glu"), st.integers(0, 99)),
    st.tuples(st.just("radix"), st.integers(0, 99), st.integers(2, 6)),
    st.tuples(st.just("shuffle"), st.integers(0, 99), st.sampled_from([2, 3]), st.booleans()),
)


def _split_attention(x: torch.Tensor, conv: nn.Module, fc1: nn.Module, fc2: nn.Module) -> torch.Tensor:
    """Radix-2 split attention (as timm's SplitAttn): the conv's halves summed for a squeeze, weighted
    by a softmax across the halves of each channel, summed again."""
    x = F.relu(conv(x))
    b, rc, h, w = x.shape
    x = x.reshape((b, 2, rc // 2, h, w))
    attn = fc2(F.relu(fc1(x.sum(dim=1).mean((2, 3), keepdim=True))))
    attn = F.softmax(attn.view(b, 1, 2, -1).transpose(1, 2), dim=1).reshape(b, -1)
    return (x * attn.view(b, -1, 1, 1).reshape((b, 2, rc // 2, 1, 1))).sum(dim=1)


class RandomNet(nn.Module):
    """Interprets a list of steps over a growing list of (B, C, 6, 6) tensors; ends in a classifier."""

    def __init__(self, steps: list[tuple], head: str) -> None:
        super().__init__()
        self.plan: list[tuple] = []
        self.layers = nn.ModuleList()
        chans = [3]
        for s in steps:
            kind = s[0]
            if kind == "conv":
                _, src, out, k, bias, bn, act = s
                src %= len(chans)
                self.layers.append(nn.Sequential(nn.Conv2d(chans[src], out, k, padding=k // 2, bias=bias),
                                                 nn.BatchNorm2d(out) if bn else nn.Identity()))
                self.plan.append(("conv", src, len(self.layers) - 1, act))
                chans.append(out)
            elif kind == "dw":
                _, src, bn, act = s
                src %= len(chans)
                c = chans[src]
                self.layers.append(nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=not bn),
                                                 nn.BatchNorm2d(c) if bn else nn.Identity()))
                self.plan.append(("conv", src, len(self.layers) - 1, act))
                chans.append(c)
            elif kind == "add":  # with a tensor of the same width, if there is one
                a = s[1] % len(chans)
                same = [i for i, c in enumerate(chans) if c == chans[a] and i != a]
                if same:
                    self.plan.append(("add", a, same[s[2] % len(same)]))
                    chans.append(chans[a])
            elif kind == "cat":
                a, b = s[1] % len(chans), s[2] % len(chans)
                self.plan.append(("cat", a, b))
                chans.append(chans[a] + chans[b])
            elif kind == "pool":  # shape-keeping ops the channels pass through
                src = s[1] % len(chans)
                self.plan.append(("pool", src, s[2]))
                chans.append(chans[src])
            elif kind == "grouped":  # groups=2 when both widths allow it
                _, src, out, bn = s
                src %= len(chans)
                if chans[src] % 2 == 0:
                    self.layers.append(nn.Sequential(nn.Conv2d(chans[src], out, 3, padding=1, groups=2),
                                                     nn.BatchNorm2d(out) if bn else nn.Identity()))
                    self.plan.append(("conv", src, len(self.layers) - 1, "relu", "grouped"))
                    chans.append(out)
            elif kind == "dwmult":  # depthwise, each channel owning two outputs
                src = s[1] % len(chans)
                c = chans[src]
                self.layers.append(nn.Conv2d(c, 2 * c, 3, padding=1, groups=c))
                self.plan.append(("conv", src, len(self.layers) - 1, "relu", "dwmult"))
                chans.append(2 * c)
            elif kind == "stride":  # stride 2 down to 3x3, nearest upsampling back to 6x6
                _, src, out = s
                src %= len(chans)
                self.layers.append(nn.Conv2d(chans[src], out, 3, stride=2, padding=1))
                self.plan.append(("stride", src, len(self.layers) - 1))
                chans.append(out)
            elif kind == "cut":  # a piece of the channels: [0, k) (split keeps both pieces)
                _, src, how, k = s
                src %= len(chans)
                c = chans[src]
                k = 1 + k % (c - 1) if c > 1 else 0
                if k and (how != "chunk" or c % 2 == 0):
                    self.plan.append(("cut", src, how, k, c))
                    chans.append(c // 2 if how == "chunk" else k)
                    if how in ("split", "chunk"):
                        chans.append(c - chans[-1])
            elif kind == "ln":  # LayerNorm over the channels, channels-last
                src = s[1] % len(chans)
                self.layers.append(nn.LayerNorm(chans[src]))
                self.plan.append(("ln", src, len(self.layers) - 1))
                chans.append(chans[src])
            elif kind == "gn":  # GroupNorm over the channels, 1 or 2 groups
                _, src, groups = s
                src %= len(chans)
                if chans[src] % groups == 0:
                    self.layers.append(nn.GroupNorm(groups, chans[src]))
                    self.plan.append(("gn", src, len(self.layers) - 1))
                    chans.append(chans[src])
            elif kind == "scale":  # a per-channel scale and shift (layer scale)
                src = s[1] % len(chans)
                # gamma viewed with its width written out (PoolFormer), beta already (C, 1, 1)
                self.register_parameter(f"gamma{len(self.plan)}", nn.Parameter(torch.rand(chans[src]) + 0.5))
                self.register_parameter(f"beta{len(self.plan)}", nn.Parameter(torch.randn(chans[src], 1, 1)))
                self.plan.append(("scale", src, len(self.plan), chans[src]))
                chans.append(chans[src])
            elif kind == "grn":  # ConvNeXt-V2's response norm: a mean over the channels (mask-aware)
                src = s[1] % len(chans)
                self.plan.append(("grn", src))
                chans.append(chans[src])
            elif kind == "glu":  # a gated linear unit over the channels (even widths): two halves tied
                src = s[1] % len(chans)
                if chans[src] % 2 == 0:
                    self.plan.append(("glu", src))
                    chans.append(chans[src] // 2)
            elif kind == "radix":  # ResNeSt's split attention, radix 2 (even input widths: a conv grouped by 2)
                _, src, out = s
                src %= len(chans)
                if chans[src] % 2 == 0:
                    self.layers.append(nn.ModuleList([nn.Conv2d(chans[src], 2 * out, 3, padding=1, groups=2),
                                                      nn.Conv2d(out, 2, 1), nn.Conv2d(2, 2 * out, 1)]))
                    self.plan.append(("radix", src, len(self.layers) - 1))
                    chans.append(out)
            elif kind == "shuffle":  # ShuffleNet's channel shuffle in 2 or 3 groups (widths they divide),
                _, src, groups, halves = s  # then, as ShuffleNetV2's next block, maybe chunked in two halves
                src %= len(chans)
                c = chans[src]
                if c % groups == 0 and c >= 2 * groups:
                    self.plan.append(("shuffle", src, groups))
                    chans.append(c)
                    if halves and c % 2 == 0:
                        self.plan.append(("cut", len(chans) - 1, "chunk", c // 2, c))
                        chans += [c // 2, c // 2]
            elif kind == "se":
                src = s[1] % len(chans)
                c = chans[src]
                self.layers.append(nn.Sequential(nn.Conv2d(c, 2, 1), nn.ReLU(), nn.Conv2d(2, c, 1)))
                self.plan.append(("se", src, len(self.layers) - 1))
                chans.append(c)
        self.head_kind = head
        c = chans[-1]
        self.head = nn.Linear(c * 36 if head == "flatten" else c, 5 if head == "mlp" else 3)
        self.mlp = nn.Sequential(nn.ReLU(), nn.Linear(5, 4), nn.GELU(), nn.Linear(4, 3))  # a linear chain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ts = [x]
        for p in self.plan:
            if p[0] == "conv":
                ts.append(_ACTS[p[3]](self.layers[p[2]](ts[p[1]])))
            elif p[0] == "stride":
                ts.append(F.interpolate(F.relu(self.layers[p[2]](ts[p[1]])), scale_factor=2.0))
            elif p[0] == "cut":
                t, how, k = ts[p[1]], p[2], p[3]
                if how in ("split", "chunk"):
                    parts = torch.split(t, [k, p[4] - k], 1) if how == "split" else t.chunk(2, 1)
                    ts += [parts[0], parts[1]]
                else:
                    ts.append(torch.narrow(t, 1, 0, k) if how == "narrow" else t[:, :k])
            elif p[0] == "ln":
                ts.append(self.layers[p[2]](ts[p[1]].permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
            elif p[0] == "gn":
                ts.append(self.layers[p[2]](ts[p[1]]))
            elif p[0] == "scale":
                ts.append(ts[p[1]] * getattr(self, f"gamma{p[2]}").view(p[3], 1, 1) + getattr(self, f"beta{p[2]}"))
            elif p[0] == "grn":
                g = ts[p[1]].norm(p=2, dim=(2, 3), keepdim=True)
                ts.append(ts[p[1]] + ts[p[1]] * (g / (g.mean(1, keepdim=True) + 1e-6)))
            elif p[0] == "glu":
                ts.append(F.glu(ts[p[1]], dim=1))
            elif p[0] == "radix":
                ts.append(_split_attention(ts[p[1]], *self.layers[p[2]]))
            elif p[0] == "shuffle":
                b, c, h, w = ts[p[1]].size()
                ts.append(ts[p[1]].view(b, p[2], c // p[2], h, w).transpose(1, 2).contiguous().view(b, c, h, w))
            elif p[0] == "add":
                ts.append(ts[p[1]] + ts[p[2]])
            elif p[0] == "cat":
                ts.append(torch.cat([ts[p[1]], ts[p[2]]], dim=1))
            elif p[0] == "pool":
                t = ts[p[1]]
                ts.append(F.max_pool2d(t, 3, 1, 1) if p[2] == "max" else F.avg_pool2d(t, 3, 1, 1) if p[2] == "avg"
                          else F.relu(t.flatten(2)).view_as(t) if p[2] == "view_as"
                          else F.dropout(t, 0.5, training=self.training))
            else:
                t = ts[p[1]]
                ts.append(t * torch.sigmoid(self.layers[p[2]](t.mean((2, 3), keepdim=True))))
        y = ts[-1]
        y = self.head(torch.flatten(y, 1) if self.head_kind == "flatten" else y.mean((2, 3)))
        return self.mlp(y) if self.head_kind == "mlp" else y


@settings(max_examples=500, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(steps=st.lists(step, min_size=3, max_size=8), head=st.sampled_from(["pool", "flatten", "mlp"]),
       granularity=st.sampled_from(["channel", "hybrid"]), closed=st.floats(0.1, 0.95), seed=st.integers(0, 10**6))
def test_fold_is_exact_on_generated_networks(steps, head, granularity, closed, seed):
    torch.manual_seed(seed)
    model = RandomNet(steps, head)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # sensitive BN: non-trivial statistics and affines
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.2, generator=gen)
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.2, generator=gen)
    model.eval()
    x = torch.randn(2, 3, 6, 6, generator=gen)
    res = hf.insert_gates(model, hf.GateConfig(granularity=granularity, seed=seed), example_inputs=x)
    gated = res.graph_module.eval()
    assume(res.modified)  # a network with nothing gated is replaced by another: 500 folds are checked
    with torch.no_grad():
        for g in hf.gates(gated):
            g.flow.copy_(torch.rand(g.flow.shape, generator=gen) - closed)
    folded = hf.fold_masks(gated, hf.FoldConfig(round_to=1))  # widths of 2-8: a block of 16 would keep all
    assert_fold_exact(gated, folded.graph_module, (x,))
    report = folded.report
    assert report.deleted_units <= report.closed_units
    for g in report.groups:  # round_to=1, min_channels=1: every closed unit of a deletable group goes
        if g.deletable:       # but the last one of a group closed whole
            assert g.deleted == min(g.closed, g.before - 1), g
        else:
            assert g.deleted == 0 and g.reason, g
    event("deleted all closed units" if report.deleted_units == report.closed_units else "kept some closed units")
    if report.deleted_units:  # which constructs the exact, deleting folds covered
        for kind in sorted({p[2] if p[0] == "cut" else p[4] if len(p) > 4 else p[0] for p in model.plan}):
            event(f"deleted, with {kind}")
            DELETED_WITH.add(kind)


def test_every_construct_is_drawn_into_a_deleting_fold():
    if not DELETED_WITH:
        pytest.skip("reads what the property test above saw: run the module whole")
    drawn = {"conv", "add", "cat", "se", "pool", "grouped", "dwmult", "stride", "split", "chunk", "narrow", "slice",
             "ln", "gn", "scale", "grn", "glu", "radix", "shuffle"}
    assert drawn <= DELETED_WITH, f"never in a fold that deleted: {sorted(drawn - DELETED_WITH)}"
