"""The channel support table, rule by rule: each rule matching (the label flows / spaces tie) and not
matching (the group is blocked, with the node in the reason)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from equivalence import assert_fold_exact
from torch import nn

import hyperflux_fx as hf
from hyperflux_fx.analysis.coupling import analyze_channels
from hyperflux_fx.frontend.trace import propagate_shapes


class Net(nn.Module):
    def __init__(self, fn, cin=3, width=4):
        super().__init__()
        self.a = nn.Conv2d(cin, width, 3, padding=1)
        self.b = nn.Conv2d(cin, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.ln = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 2)
        self.fc_flat = nn.Linear(width * 16, 2)
        self.cons = nn.Conv2d(width, 2, 1)
        self.cons_cat = nn.Conv2d(2 * width, 2, 1)
        self.pos = nn.Parameter(torch.randn(1, 16, width))  # tokens of a 4x4 map: a position embedding
        self.cls = nn.Parameter(torch.randn(1, 1, width))  # a class token
        self.fn = fn

    def forward(self, x):
        return self.fn(self, x)


def _groups(fn, shape=(2, 3, 4, 4)):
    gm = hf.trace(Net(fn), torch.randn(*shape))
    c = analyze_channels(gm)
    by_producer = {}
    for g in c.groups():
        for p in g.producers:
            by_producer[p] = g
    return c, by_producer


def _tokens(s, x):
    """Group a's channels as a (batch, tokens, channels) sequence."""
    return s.a(x).flatten(2).transpose(1, 2)


def _swap_hw(x):
    """A leaf function outside the op table that moves elements along other dims."""
    return x.transpose(2, 3).contiguous()


def _cumsum_channels(x):
    """A leaf function that mixes the channels."""
    return x.cumsum(1)


def _plus_one(x):
    """A leaf function per channel that makes zeros non-zero."""
    return x + 1


def _shuffle(x, groups):
    """ShuffleNet's channel shuffle: (groups, C / groups) transposed, as torchvision writes it."""
    b, c, h, w = x.size()
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


for _leaf in ("_swap_hw", "_cumsum_channels", "_plus_one"):
    torch.fx.wrap(_leaf)


def _ok(g):
    return g.deletable


# (name, forward that must let group "a" be deleted, forward that must block it, reason fragment)
CASES = [
    ("conv consumer", lambda s, x: s.cons(s.a(x)).mean((2, 3)), lambda s, x: s.a(x).mean((2, 3)), "graph output"),
    ("add ties", lambda s, x: s.cons(s.a(x) + s.b(x)).mean((2, 3)),
     lambda s, x: s.cons(s.a(x) + x[:, :1].expand(-1, 4, -1, -1)).mean((2, 3)), "varies over the channels"),
    ("batch_norm", lambda s, x: s.cons(s.bn(s.a(x))).mean((2, 3)),
     lambda s, x: s.cons(F.local_response_norm(s.a(x), 2)).mean((2, 3)), "local_response_norm"),
    ("activations", lambda s, x: s.cons(torch.sigmoid(F.relu(s.a(x)))).mean((2, 3)),
     lambda s, x: s.cons(torch.roll(s.a(x), 1, 1)).mean((2, 3)), "roll"),
    ("cat offsets", lambda s, x: s.cons_cat(torch.cat([s.a(x), s.b(x)], 1)).mean((2, 3)),
     lambda s, x: s.fc(torch.cat([s.a(x), s.b(x)], 1).mean((2, 3))[:, ::2]), "indexing into the channels"),
    ("flatten -> linear", lambda s, x: s.fc_flat(torch.flatten(s.a(x), 1)),
     lambda s, x: s.fc(s.a(x).reshape(2, 4, 16)[:, :, :4].sum(1)), "reduction over the channels"),
    ("permute / layer_norm", lambda s, x: s.fc(s.ln(F.relu(s.a(x).permute(0, 2, 3, 1)))).mean((1, 2)),
     lambda s, x: s.cons(F.layer_norm(s.a(x), (4, 4, 4))).mean((2, 3)), "together with other dims"),
    ("layer_norm over another dim", lambda s, x: s.cons(F.layer_norm(s.a(x), (4,))).mean((2, 3)),
     lambda s, x: s.cons(F.layer_norm(s.a(x).transpose(1, 3), (4,), s.ln.weight * 2).transpose(1, 3)).mean((2, 3)),
     "not a parameter"),
    ("position embedding", lambda s, x: s.fc(_tokens(s, x) + s.pos).mean(1),
     lambda s, x: s.fc(_tokens(s, x) + _tokens(s, x).detach().roll(1, 2)).mean(1), "roll"),
    ("class token", lambda s, x: s.fc(torch.cat([s.cls.expand(2, -1, -1), _tokens(s, x)], 1)).mean(1),
     lambda s, x: s.fc(torch.cat([x.flatten(2).transpose(1, 2)[:, :1, :1].expand(-1, -1, 4), _tokens(s, x)],
                                 1)).mean(1), "cat mixing"),
    ("channel count read", lambda s, x: s.fc((lambda t: t.reshape(t.shape[0], t.shape[1], t.shape[2]))(
        _tokens(s, x))).mean(1),
     lambda s, x: s.fc((lambda t: t * t.shape[2] ** -0.5)(_tokens(s, x))).mean(1), "read at run time"),
    ("spatial reduce", lambda s, x: s.fc(s.a(x).amax((2, 3))),
     lambda s, x: s.fc(s.a(x).sum(1).flatten(1)[:, :4]), "reduction over the channels"),
    ("softmax", lambda s, x: s.cons(torch.softmax(s.a(x), dim=-1)).mean((2, 3)),
     lambda s, x: s.cons(torch.softmax(s.a(x), dim=1)).mean((2, 3)), "softmax over the channels"),
    ("per-channel scale", lambda s, x: s.cons(s.a(x) * s.bn.weight.reshape(1, -1, 1, 1)).mean((2, 3)),
     lambda s, x: s.cons(s.a(x) * x.mean(1, keepdim=True).expand(-1, 4, -1, -1)).mean((2, 3)), "varies"),
    ("per-channel scale, sizes written out", lambda s, x: s.cons(s.a(x) * s.bn.weight.view(4, 1, 1)).mean((2, 3)),
     lambda s, x: s.cons(s.a(x) * s.bn.weight.view(4, 1).expand(4, 4).reshape(4, 4, 1)).mean((2, 3)), "varies"),
    ("leaf function over other dims", lambda s, x: s.cons(_swap_hw(s.a(x))).mean((2, 3)),
     lambda s, x: s.cons(_cumsum_channels(s.a(x))).mean((2, 3)), "mixes the channels"),
    ("leaf function keeping zeros", lambda s, x: s.cons(_swap_hw(F.relu(s.a(x)))).mean((2, 3)),
     lambda s, x: s.cons(_plus_one(s.a(x))).mean((2, 3)), "makes a zeroed channel non-zero"),
    ("roll / flip / pad", lambda s, x: s.cons(F.pad(torch.roll(s.a(x).flip(3), 1, 2), (1, 1, 1, 1))).mean((2, 3)),
     lambda s, x: s.cons_cat(F.pad(s.a(x), (0, 0, 0, 0, 0, 4))).mean((2, 3)), "pad over the channels"),
    ("mean over the channels", lambda s, x: (lambda t: s.cons(t / (t.mean(1, keepdim=True) + 1)).mean((2, 3)))(s.a(x)),
     lambda s, x: (lambda t: s.cons(t * t.amax(1, keepdim=True)).mean((2, 3)))(s.a(x)), "reduction over the channels"),
    ("addcmul", lambda s, x: s.cons(torch.addcmul(s.b(x), s.a(x), s.bn.weight.view(4, 1, 1))).mean((2, 3)),
     lambda s, x: s.cons(torch.addcmul(s.a(x), s.a(x), x[:, :1].expand(-1, 4, -1, -1))).mean((2, 3)), "varies"),
    ("view_as", lambda s, x: (lambda b: s.cons(s.a(x).flatten(2).view_as(b) + b).mean((2, 3)))(s.b(x)),
     lambda s, x: (lambda b: s.cons(s.a(x).flatten(2).reshape_as(b).permute(0, 3, 1, 2)).mean((2, 3)))(
         s.b(x).permute(0, 2, 3, 1)), "reshape_as of differently laid out channels"),
    ("channel shuffle", lambda s, x: s.cons_cat(_shuffle(torch.cat([s.a(x), s.b(x)], 1), 2)).mean((2, 3)),
     lambda s, x: s.cons_cat(_shuffle(torch.cat([s.a(x), s.b(x)], 1), 2) + torch.cat([s.b(x), s.a(x)], 1)).mean(
         (2, 3)), "does not follow the permutation"),
    ("view_as ties", lambda s, x: s.cons(s.a(x).view_as(s.b(x))).mean((2, 3)),
     lambda s, x: s.cons(x[:, :1].expand(-1, 4, -1, -1).contiguous().view_as(s.a(x))).mean((2, 3)),
     "view_as ties channels to ones that cannot be deleted"),
]


@pytest.mark.parametrize(("name", "good", "bad", "reason"), CASES, ids=[c[0] for c in CASES])
def test_rule_matches_and_blocks(name, good, bad, reason):
    _, groups = _groups(good)
    assert _ok(groups["a"]), groups["a"].blocked
    _, groups = _groups(bad)
    g = groups["a"]
    assert not g.deletable and any(reason in r for r in g.blocked), g.blocked


def test_add_ties_spaces_into_one_group_and_cat_offsets_consumer():
    c, groups = _groups(lambda s, x: s.cons(s.a(x) + s.b(x)).mean((2, 3)))
    assert groups["a"] is groups["b"]
    c, _ = _groups(lambda s, x: s.cons_cat(torch.cat([s.a(x), s.b(x)], 1)).mean((2, 3)))
    cons = next(k for k in c.consumers if k.weight == "cons_cat.weight")
    assert [(s.length, s.expand) for s in cons.label.segs] == [(4, 1), (4, 1)]


def test_view_as_ties_the_reshaped_tensor_to_the_one_whose_shape_it_takes():
    _, groups = _groups(lambda s, x: s.cons(s.a(x).flatten(2).view_as(s.b(x))).mean((2, 3)))
    assert groups["a"] is groups["b"] and groups["a"].deletable


def test_flatten_expands_each_channel_over_its_positions():
    c, _ = _groups(lambda s, x: s.fc_flat(torch.flatten(s.a(x), 1)))
    cons = next(k for k in c.consumers if k.weight == "fc_flat.weight")
    assert cons.label.segs[0].expand == 16


def test_zero_preservation_is_tracked():
    _, groups = _groups(lambda s, x: s.cons(F.relu(s.a(x))).mean((2, 3)))
    assert not groups["a"].zero_preserving  # conv a has a bias

    class NoBias(nn.Module):
        def __init__(self, act):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, bias=False)
            self.act = act
            self.c = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.c(self.act(self.a(x))).mean((2, 3))

    x = torch.randn(2, 3, 5, 5)
    assert analyze_channels(hf.trace(NoBias(nn.ReLU()), x)).groups()[0].zero_preserving
    assert not analyze_channels(hf.trace(NoBias(nn.Sigmoid()), x)).groups()[0].zero_preserving  # sigmoid(0)=0.5


class _Grouped(nn.Module):
    def __init__(self, groups, out=4, cat=False):
        super().__init__()
        self.cat = cat
        self.a = nn.Conv2d(3, 4 if not cat else 2, 1)
        self.b = nn.Conv2d(3, 2, 1)
        self.dw = nn.Conv2d(4, out, 3, padding=1, groups=groups)
        self.c = nn.Conv2d(out, 2, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1) if self.cat else self.a(x)
        return self.c(self.dw(y)).mean((2, 3))


def test_depthwise_passes_through_and_grouped_convs_split_their_spaces():
    x = torch.randn(2, 3, 4, 4)
    res = hf.insert_gates(_Grouped(4), hf.GateConfig(granularity="channel"), example_inputs=x)
    a = res.report.channel_groups[0]
    assert a.gated and a.size == 4 and a.replicas == 1  # a -> depthwise -> c: one group
    res = hf.insert_gates(_Grouped(4, out=8), hf.GateConfig(granularity="channel"), example_inputs=x)
    a = res.report.channel_groups[0]
    assert a.gated and a.size == 4  # a channel multiplier of 2: each of a's channels owns two outputs
    res = hf.insert_gates(_Grouped(2), hf.GateConfig(granularity="channel"), example_inputs=x)
    a, g = res.report.channel_groups[:2]
    # groups=2 over 4 channels: a unit is one position in both groups (channels p and 2 + p)
    assert a.gated and (a.size, a.replicas, a.channels) == (2, 2, 4)
    assert g.gated and (g.size, g.replicas) == (2, 2)
    propagate_shapes(res.graph_module, (x,))
    c = analyze_channels(res.graph_module)
    cons = next(cn for cn in c.consumers if cn.weight_label is not None)
    assert cons.weight_label.width == 2 and cons.label.width == 4  # the weight holds one group's positions


def test_grouped_conv_over_a_concatenation_blocks():
    x = torch.randn(2, 3, 4, 4)
    res = hf.insert_gates(_Grouped(2, cat=True), hf.GateConfig(granularity="channel"), example_inputs=x)
    blocked = [g for g in res.report.channel_groups if not g.gated]
    assert any("grouped conv (groups=2) over concatenated" in why for g in blocked for why in g.blocked)


def test_heads_rule_matches_sdpa_and_blocks_a_reused_projection():
    from models import SDPAAttention

    x = torch.randn(2, 5, 16)
    res = hf.insert_gates(SDPAAttention(), hf.GateConfig(granularity="channel"), example_inputs=x)
    heads = [g for g in res.report.channel_groups if g.unit == "head"]
    assert len(heads) == 1 and heads[0].gated and heads[0].size == 2

    class Reused(SDPAAttention):
        def forward(self, x):
            b, n, c = x.shape
            qkv = self.qkv(x)
            q, k, v = qkv.reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
            ctx = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
            return x + self.proj(ctx) + qkv[..., :c]  # the projection's output is also used directly

    res = hf.insert_gates(Reused(), hf.GateConfig(granularity="channel"), example_inputs=x)
    heads = [g for g in res.report.channel_groups if g.unit == "head"]
    assert len(heads) == 1 and not heads[0].gated and "also used elsewhere" in heads[0].blocked[0]


def test_a_per_head_attention_mask_is_sliced_with_the_heads_or_blocks_them():
    from models import SDPAAttention

    x = torch.randn(2, 5, 16)

    class PerHeadMask(SDPAAttention):
        def __init__(self, computed: bool):
            super().__init__()
            self.computed = computed
            self.register_buffer("bias", torch.randn(1, self.heads, 5, 5))

        def forward(self, x):
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
            mask = self.bias * x.mean() if self.computed else self.bias  # computed from the input: cannot slice
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, c)
            return self.proj(ctx)

    res = hf.insert_gates(PerHeadMask(True), hf.GateConfig(granularity="channel"), example_inputs=x)
    heads = [g for g in res.report.channel_groups if g.unit == "head"]
    assert heads and not heads[0].gated and "varies over the heads" in heads[0].blocked[0]
    model = PerHeadMask(False).eval()
    res = hf.insert_gates(model, hf.GateConfig(granularity="channel", seed=0), example_inputs=x)
    gated = res.graph_module.eval()
    assert any(g.gated and g.unit == "head" for g in res.report.channel_groups)
    with torch.no_grad():
        for g in hf.gates(gated):
            g.flow.copy_(torch.tensor([-1.0, 1.0]) if g.flow.numel() == 2 else torch.ones_like(g.flow))
    compact = hf.fold_masks(gated, hf.FoldConfig(round_to=1)).graph_module
    assert compact.bias.shape == (1, 1, 5, 5)  # the closed head's bias deleted with it
    assert_fold_exact(gated, compact, (x,))


def _analyze(model, x):
    c = analyze_channels(hf.trace(model, x))
    return c, {p: g for g in c.groups() for p in g.producers}


def test_batch_norm_over_a_concatenation_slices_run_by_run():
    from models import ConcatBatchNorm

    x = torch.randn(2, 3, 6, 6)
    c, groups = _analyze(ConcatBatchNorm().eval(), x)
    runs = sorted((cp.offset, cp.space) for cp in c.params if cp.target == "bn2.weight")
    assert [off for off, _ in runs] == [0, 6, 10]  # stem, conv1, conv2
    assert all(groups[p].deletable for p in ("stem", "conv1", "conv2"))

    class TokensBN(nn.Module):  # a BatchNorm1d over the tokens of (B, tokens, channels): not the channels
        def __init__(self):
            super().__init__()
            self.a, self.bn, self.fc = nn.Conv2d(3, 4, 1), nn.BatchNorm1d(36), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.bn(self.a(x).flatten(2).transpose(1, 2))).mean(1)

    _, groups = _analyze(TokensBN().eval(), x)
    assert any("batch norm over a non-channel dim" in r for r in groups["a"].blocked)


def test_split_chunk_narrow_and_slices_cut_a_space_into_pieces():
    def swap(s, x):
        p, q = s.a(x).chunk(2, 1)
        return s.cons(torch.cat([q, p], 1)).mean((2, 3))

    c, groups = _groups(swap)
    assert groups["a[0:2]"].deletable and groups["a[2:4]"].deletable
    assert [cut.kind for cut in c.cut_args] == ["split"]
    _, groups = _groups(lambda s, x: s.cons(torch.cat([torch.narrow(s.a(x), 1, 1, 3), s.b(x)[:, :1]], 1)).mean((2, 3)))
    assert groups["a[1:4]"].deletable and groups["b[0:1]"].deletable
    _, groups = _groups(lambda s, x: s.cons(torch.cat([s.a(x)[:, ::2], s.b(x)[:, ::2]], 1)).mean((2, 3)))
    assert any("indexing into the channels" in r for r in groups["a"].blocked)


def test_a_channel_shuffle_permutes_the_label_and_a_chunk_after_it_cuts_the_spaces_it_interleaves():
    c, groups = _groups(lambda s, x: s.cons(_shuffle(torch.cat([s.a(x), s.b(x)], 1), 2).chunk(2, 1)[1]).mean((2, 3)))
    assert len(c.shuffles) == 1 and c.shuffles["view_1"].groups == 2
    assert groups["a[2:4]"].deletable and groups["b[2:4]"].deletable  # a2 b2 a3 b3: the second half
    (cons,) = [cons for cons in c.consumers if cons.node == "cons"]
    assert [(sg.space, sg.length) for sg in cons.label.segs] == [(groups["a[2:4]"].spaces[0], 2),
                                                                  (groups["b[2:4]"].spaces[0], 2)]
    assert cons.label.order == (0, 2, 1, 3)
    _, groups = _groups(lambda s, x: s.cons_cat(_shuffle(torch.cat([s.a(x), s.b(x)], 1), 2)).mean((2, 3)))
    assert groups["a"].deletable and groups["b"].deletable  # taken whole: nothing cut


def test_a_space_split_over_conv_groups_cannot_be_cut():
    class SplitThenCut(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.g, self.fc = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Linear(3, 2)

        def forward(self, x):
            y = self.g(self.a(x))
            return self.fc(y[:, :3].mean((2, 3)))

    _, groups = _analyze(SplitThenCut(), torch.randn(2, 3, 4, 4))
    assert any("slicing into channels that cannot be cut" in r for r in groups["g"].blocked)
    assert groups["a"].deletable and groups["a"].replicas == 2


def test_group_norm_is_mask_aware_and_splits_its_space_over_its_groups():
    from models import GroupNorms

    c, groups = _analyze(GroupNorms().eval(), torch.randn(2, 3, 6, 6))
    assert groups["stem"].deletable and groups["stem"].normalised and groups["stem"].replicas == 2

    class Mismatch(nn.Module):  # GroupNorm(4) over a space split over 2 conv groups
        def __init__(self):
            super().__init__()
            self.a, self.g = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.gn, self.fc = nn.GroupNorm(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            a = self.a(x)
            return self.fc((self.g(a) + self.gn(a)).mean((2, 3)))

    _, groups = _analyze(Mismatch(), torch.randn(2, 3, 4, 4))
    assert any("split another way" in r for r in groups["a"].blocked), groups["a"].blocked


ARCHITECTURE_MD = Path(__file__).resolve().parents[2] / "docs" / "ARCHITECTURE.md"


def test_the_worked_example_in_architecture_md_runs():
    # docs/ARCHITECTURE.md, "Adding the channel rule for a new op": the check a contributor runs is
    # the code on that page, run here as written (its asserts are the test)
    text = ARCHITECTURE_MD.read_text()
    block = text.split("<!-- worked-example:begin -->", 1)[1].split("<!-- worked-example:end -->", 1)[0]
    code = block.split("```python\n", 1)[1].rsplit("```", 1)[0]
    assert "analyze_channels" in code and "fold_masks" in code and "assert" in code
    exec(compile(code, f"{ARCHITECTURE_MD}:worked-example", "exec"), {"__name__": "worked_example"})


@pytest.mark.parametrize(("how", "expect"), [
    ("channels", [(["conv[0:4]", "conv[4:8]"], 4)]),  # one conv's space, cut between its halves and tied
    ("cat", [(["conv", "other"], 8)]),  # two convs concatenated: the halves are the two spaces, tied
    ("rows", [(["conv"], 8)]),  # over the rows: the channel label passes
])
def test_glu_ties_the_halves_over_the_channels_and_passes_over_other_dims(how, expect):
    class Glu(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.other = nn.Conv2d(3, 8, 3, padding=1)
            self.head = nn.Conv2d(8 if how != "channels" else 4, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            if how == "cat":
                y = torch.cat([y, self.other(x)], 1)
            return self.head(F.glu(y, dim=2 if how == "rows" else 1)).mean((2, 3))

    gm = hf.trace(Glu())
    propagate_shapes(gm, (torch.randn(2, 3, 6, 6),))
    groups = [g for g in analyze_channels(gm).groups() if "consumed by the graph output" not in g.blocked]
    assert [(sorted(g.producers), g.size) for g in groups] == expect
    assert not any(g.blocked for g in groups)
