"""The concepts defined once: orientation (ir.Site), edit order (kernels.apply_edits), grouping
by tensor (Adapter.edits_by_target), DoRA's channel broadcast, the SVD sign convention and the
PEFT key grammar. Each is checked against a hand-written fp64 reference, not loracc's output."""

from __future__ import annotations

import pytest
import torch

import loracc
from loracc import kernels
from loracc.io import peft_keys
from loracc.ir import Adapter, Replacement, Site, SiteKind, TargetEdits, TokenRows
from loracc.lower.onnx.slots import Member, SlotGroup
from tests.support import peft_oracle as po


def _site(kind: SiteKind, A: torch.Tensor, B: torch.Tensor, **kw: object) -> Site:
    return Site("m", "m.weight", kind, A, B, alpha=1.0, scale=kw.pop("scale", 0.5), **kw)  # type: ignore[arg-type]


def _factors(r: int, fan_in: int, fan_out: int, *k: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(r * 1000 + fan_in * 10 + fan_out)
    A = torch.randn(r, fan_in, *k, generator=g)
    B = torch.randn(fan_out, r, *[1] * len(k), generator=g)
    return A, B


# -- orientation --------------------------------------------------------------------------------

# kind, A shape, B shape, logical, stored (base tensors as transformers stores them)
SHAPES = [
    (SiteKind.LINEAR, (2, 5), (3, 2), (3, 5), (3, 5)),  # nn.Linear(5, 3).weight (3, 5)
    (SiteKind.CONV1D, (2, 5), (3, 2), (3, 5), (5, 3)),  # Conv1D(nf=3, nx=5).weight (5, 3)
    (SiteKind.EMBEDDING, (2, 7), (4, 2), (7, 4), (7, 4)),  # nn.Embedding(7, 4).weight (7, 4)
    (SiteKind.CONV, (2, 5, 3, 3), (6, 2, 1, 1), (6, 5, 3, 3), (6, 5, 3, 3)),  # Conv2d(5, 6, 3)
    (SiteKind.PARAMETER, (2, 5), (3, 2), (3, 5), (3, 5)),
]


@pytest.mark.parametrize(("kind", "a", "b", "logical", "stored"), SHAPES)
def test_shapes_per_kind(
    kind: SiteKind,
    a: tuple[int, ...],
    b: tuple[int, ...],
    logical: tuple[int, ...],
    stored: tuple[int, ...],
) -> None:
    site = _site(kind, torch.zeros(a), torch.zeros(b))
    assert site.logical_shape() == logical
    assert site.stored_shape() == stored
    assert kind.logical_shape(site.lora_A, site.lora_B) == logical
    assert kind.stored_shape(logical) == stored
    t = torch.arange(float(torch.Size(logical).numel())).reshape(logical)
    assert tuple(site.to_stored(t).shape) == stored
    assert torch.equal(site.to_logical(site.to_stored(t)), t)
    assert torch.equal(kind.to_logical(kind.to_stored(t)), t)


@pytest.mark.parametrize("transposed", [False, True])
def test_expert_parameter_orientation(transposed: bool) -> None:
    E, r, d_in, d_out = 3, 2, 5, 4
    site = _site(
        SiteKind.PARAMETER,
        torch.zeros(r * E, d_in),
        torch.zeros(d_out, r * E),
        experts=E,
        transposed=transposed,
    )
    assert site.logical_shape() == (E, d_out, d_in)
    assert site.stored_shape() == ((E, d_in, d_out) if transposed else (E, d_out, d_in))
    assert site.stored_axis(0) == 0
    assert site.stored_axis(1) == (2 if transposed else 1)


def _delta64(site: Site) -> torch.Tensor:
    """``s·B@A`` in the stored orientation, written out per kind in fp64."""
    A, B = site.lora_A.double(), site.lora_B.double()
    if site.kind is SiteKind.LINEAR:
        return site.scale * (B @ A)
    if site.kind is SiteKind.CONV1D:
        return site.scale * (B @ A).T  # stored (in, out)
    if site.kind is SiteKind.EMBEDDING:
        return site.scale * (B @ A).T  # B@A is (dim, num); stored (num, dim)
    if site.kind is SiteKind.CONV:
        out = torch.zeros(B.shape[0], *A.shape[1:], dtype=torch.float64)
        for o in range(B.shape[0]):
            for j in range(A.shape[0]):
                out[o] += B[o, j].flatten()[0] * A[j]
        return site.scale * out
    raise AssertionError(site.kind)


@pytest.mark.parametrize("case", SHAPES[:4], ids=lambda c: c[0].value)
def test_site_delta_is_stored(case: tuple) -> None:  # type: ignore[type-arg]
    kind, a, b, _, stored = case
    A, B = _factors(a[0], a[1], b[0], *a[2:])
    site = _site(kind, A, B)
    got = kernels.site_delta(site, dtype=torch.float64)
    assert tuple(got.shape) == stored
    torch.testing.assert_close(got, _delta64(site), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("transposed", [False, True])
def test_site_delta_experts(transposed: bool) -> None:
    E, r, d_in, d_out = 3, 2, 5, 4
    A, B = torch.randn(r * E, d_in), torch.randn(d_out, r * E)
    site = _site(SiteKind.PARAMETER, A, B, experts=E, transposed=transposed)
    got = kernels.site_delta(site, dtype=torch.float64)
    for e in range(E):  # peft's ParamWrapper: expert e owns A rows e*r.. and B columns e::E
        A_e = A.double()[e * r : (e + 1) * r]
        B_e = B.double()[:, torch.arange(r) * E + e]
        want = site.scale * (B_e @ A_e)
        torch.testing.assert_close(got[e], want.T if transposed else want, rtol=1e-12, atol=0)


# -- DoRA channel scale -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "shape", "axis"),
    [
        (SiteKind.LINEAR, (3, 5), 0),  # per output row
        (SiteKind.CONV1D, (5, 3), 1),  # stored (in, out): per column
        (SiteKind.EMBEDDING, (7, 4), 1),  # per embedding dim
        (SiteKind.CONV, (6, 5, 3, 3), 0),  # per output channel
    ],
)
def test_channel_scale_axis(kind: SiteKind, shape: tuple[int, ...], axis: int) -> None:
    logical = kind.stored_shape(shape)  # a swap is its own inverse
    site = _site(kind, *_factors_for(kind, logical))
    assert kernels.channel_axis(site) == axis
    weight = torch.randn(shape, dtype=torch.float64)
    scale = torch.rand(shape[axis], dtype=torch.float64) + 0.5
    want = weight.clone()
    for c in range(shape[axis]):
        want.select(axis, c).mul_(scale[c])
    got = kernels.apply_channel_scale(site, weight.clone(), scale)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    norm = kernels.channel_norm(site, weight).reshape(-1)
    want_norm = torch.stack(
        [weight.select(axis, c).pow(2).sum().sqrt() for c in range(shape[axis])]
    )
    torch.testing.assert_close(norm, want_norm, rtol=1e-12, atol=0)


def _factors_for(kind: SiteKind, logical: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    if kind is SiteKind.EMBEDDING:
        return torch.zeros(2, logical[0]), torch.zeros(logical[1], 2)
    k = logical[2:]
    return torch.zeros(2, logical[1], *k), torch.zeros(logical[0], 2, *[1] * len(k))


def test_channel_shape_and_slot_broadcast() -> None:
    assert kernels.channel_shape(2, 0) == [-1, 1]
    assert kernels.channel_shape(3, 1, 4) == [1, 4, 1]

    def group(op: str, kernel: list[int]) -> SlotGroup:
        members = [Member("m", "linear", 0, 6)]
        return SlotGroup("m", op, 5, 6, kernel, 1, "A", "B", "r", members, "w", False)

    assert group("MatMul", []).channel_shape == [6]  # (..., out): the last axis
    assert group("Conv", [3, 3]).channel_shape == [6, 1, 1]  # (N, C, H, W): C


# -- edit order and grouping --------------------------------------------------------------------


def test_apply_edits_order_fp64_reference() -> None:
    out, fan_in = 4, 3
    A, B = torch.randn(2, fan_in), torch.randn(out, 2)
    cs = torch.rand(out) + 0.5
    site = _site(
        SiteKind.LINEAR, A, B, channel_scale=cs, lora_bias=torch.randn(out), bias_target="b"
    )
    base = torch.randn(out, fan_in)
    rows = TokenRows("m.weight", (1, 3), torch.randn(2, fan_in))
    replaced = torch.randn(out, fan_in)
    rep = Replacement("m.weight", replaced, "modules_to_save")
    # replacement, then rows, then (W + ΔW) scaled per row
    want = replaced.double().clone()
    want[[1, 3]] = rows.rows.double()
    want = (want + site.scale * (B.double() @ A.double())) * cs.double()[:, None]

    calls = []

    def stored() -> torch.Tensor:
        calls.append(1)
        return base

    got = kernels.apply_edits(stored, TargetEdits((rep,), (rows,), (site,)))
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert not calls  # a replacement supplies the tensor: the base is not read
    before = kernels.apply_edits(stored, TargetEdits((), (rows,), (site,)).before_deltas())
    want_before = base.double().clone()
    want_before[[1, 3]] = rows.rows.double()
    torch.testing.assert_close(before.double(), want_before, rtol=0, atol=0)
    bias = kernels.apply_edits(lambda: torch.zeros(out), TargetEdits(bias_sites=(site,)))
    torch.testing.assert_close(bias.double(), site.scale * site.lora_bias.double())  # type: ignore[union-attr]


def test_put_rows_through_transposed_view() -> None:
    w = torch.zeros(3, 5)
    kernels.put_rows(w.T, TokenRows("k", (0, 4), torch.ones(2, 3)))  # rows of the (5, 3) view
    want = torch.zeros(3, 5)
    want[:, 0] = 1
    want[:, 4] = 1
    assert torch.equal(w, want)


def test_edits_by_target_groups_in_first_mention_order() -> None:
    A, B = torch.zeros(2, 3), torch.zeros(4, 2)
    s1 = Site(
        "a",
        "a.weight",
        SiteKind.LINEAR,
        A,
        B,
        1.0,
        1.0,
        lora_bias=torch.zeros(4),
        bias_target="a.bias",
    )
    s2 = Site("b", "b.weight", SiteKind.LINEAR, A, B, 1.0, 1.0)
    s3 = Site("a2", "a.weight", SiteKind.LINEAR, A, B, 1.0, 1.0)
    r1, r2 = (
        Replacement("e.weight", torch.zeros(1), "x"),
        Replacement("e.weight", torch.ones(1), "y"),
    )
    t = TokenRows("b.weight", (0,), torch.zeros(1, 3))
    adapter = Adapter("x", (s1, s2, s3), (r1, r2), (t,))
    edits = adapter.edits_by_target()
    assert list(edits) == ["e.weight", "b.weight", "a.weight", "a.bias"]
    assert edits["a.weight"].sites == (s1, s3)
    assert edits["a.bias"].bias_sites == (s1,) and edits["a.bias"].whole_tensor
    assert edits["b.weight"].rows == (t,) and edits["b.weight"].sites == (s2,)
    assert edits["e.weight"].replacement is r2  # the one the merge starts from
    assert not edits["a.weight"].whole_tensor
    assert adapter.targets() == {"e.weight", "b.weight", "a.weight", "a.bias"}
    assert not TargetEdits()


# -- sign convention ----------------------------------------------------------------------------


def test_column_signs() -> None:
    cols = torch.tensor([[1.0, -3.0, 0.0], [-2.0, 1.0, 0.0]], dtype=torch.float64)
    # column 0: largest |x| is -2 -> flip; column 1: -3 -> flip; column 2: zeros -> +1
    assert kernels.column_signs(cols).tolist() == [-1.0, -1.0, 1.0]


# -- PEFT key grammar ---------------------------------------------------------------------------


def test_peft_keys_round_trip() -> None:
    a, b = peft_keys.factor_keys("model.layers.0.q_proj", embedding=False)
    assert (a, b) == (
        "base_model.model.model.layers.0.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.q_proj.lora_B.weight",
    )
    ea, _ = peft_keys.factor_keys("model.embed_tokens", embedding=True)
    assert ea == "base_model.model.model.embed_tokens.lora_embedding_A"
    for key, group in [
        (a, "ab"),
        (ea, "emb"),
        (peft_keys.lora_bias_key("m"), "bias"),
        (peft_keys.token_rows_key("m"), "tok"),
    ]:
        m = peft_keys.KEY.match(peft_keys.unprefixed(key))
        assert m is not None and m[group], key
    wrapped = peft_keys.whole_tensor_key("model.lm_head.weight", {"model.lm_head"})
    assert wrapped == "base_model.model.model.lm_head.base_layer.weight"
    assert peft_keys.unwrap(peft_keys.unprefixed(wrapped)) == "model.lm_head.weight"
    assert peft_keys.whole_tensor_key("score.weight", set()) == "base_model.model.score.weight"
    assert peft_keys.unwrap("score.modules_to_save.default.weight") == "score.weight"


# -- inspect reports the logical shape ----------------------------------------------------------


def test_inspect_embedding_shape_is_the_base_shape(tmp_path) -> None:  # type: ignore[no-untyped-def]
    case = po.build_case("llama_embed", tmp_path)
    sites = {s["module"]: s for s in loracc.inspect(case.adapter_dir, case.base_dir)["sites"]}
    emb = case.base_tensors["model.embed_tokens.weight"]
    assert sites["model.embed_tokens"]["shape"] == list(emb.shape)  # (vocab, hidden)
    q = case.base_tensors["model.layers.0.self_attn.q_proj.weight"]
    assert sites["model.layers.0.self_attn.q_proj"]["shape"] == list(q.shape)
