"""NF4 against bitsandbytes (its CPU path) as the reference: bytes, scales and values identical."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftkit.errors import AdapterError
from peftkit.nf4 import (
    NF4_CODE, Linear4bit, NF4State, _quantize_dynamic, dequantize_nf4, dynamic_map, quantize_nf4,
)

bnb = pytest.importorskip("bitsandbytes.functional")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def bnb_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' dequantisation, via its pure-torch kernel where its AVX-512 one is wrong.

    bitsandbytes 0.50's AVX-512 CPU kernel (taken when cols % 16 == 0) indexes absmax as
    row * (cols // blocksize) + col // blocksize, so it misreads tensors whose rows are not whole
    blocks (its own quantiser counts blocks over the flat tensor). Its default-backend kernel is
    the reference there.
    """
    if state.shape[-1] % state.blocksize == 0:
        return bnb.dequantize_4bit(packed, state)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = state.absmax
    if state.nested:
        absmax = bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset
    kernel = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # skip torch.compile
    code = bnb.get_4bit_type("nf4", device="cpu")
    return kernel(packed.reshape(-1), absmax, code, state.blocksize, state.shape, state.dtype)


def tie_matrix() -> torch.Tensor:
    """Blocks of 64 whose absmax is 1, holding every NF4 code, midpoint and their fp32 neighbours."""
    code = torch.tensor(NF4_CODE)
    mids = (code[:-1] + code[1:]) / 2
    up, down = torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))
    values = torch.cat([code, mids, up, down, -mids, torch.tensor([0.0, -0.0])])
    values = torch.cat([values, torch.zeros(-values.numel() % 63)]).view(-1, 63)
    return torch.cat([values, torch.ones(values.shape[0], 1)], dim=1).reshape(-1, 128)


def special_matrix() -> torch.Tensor:
    """Random values with exact zeros, a block of zeros, and tiny, huge and subnormal blocks."""
    w = torch.randn(32, 128, generator=gen(1))
    w[w.abs() < 0.3] = 0.0
    w[3, :64] = 0.0
    w[5, 64:] *= 1e-30
    w[7, :64] *= 1e30
    w[9, 64:] *= 1e-40  # subnormal: bitsandbytes clamps the absmax to 1e-38 before dividing
    return w


CASES = {
    "square": lambda: torch.randn(64, 64, generator=gen(0)),
    "small-scale": lambda: torch.randn(128, 576, generator=gen(2)) * 0.02,
    "large-scale": lambda: torch.randn(96, 128, generator=gen(3)) * 30,
    "3d": lambda: torch.randn(2, 6, 64, generator=gen(4)),
    "ties": tie_matrix,
    "special": special_matrix,
    "rows-not-blocks": lambda: torch.randn(33, 96, generator=gen(5)),
    "partial-block": lambda: torch.randn(3, 50, generator=gen(6)),
    "odd-numel": lambda: torch.randn(5, 7, generator=gen(7)),
}


@pytest.mark.parametrize("name", CASES)
def test_quantize_matches_bitsandbytes(name):
    w = CASES[name]()
    ref_packed, ref = bnb.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=False)
    packed, state = quantize_nf4(w, blocksize=64, double_quant=False)
    assert packed.dtype == ref_packed.dtype and torch.equal(packed, ref_packed)
    assert torch.equal(state.absmax, ref.absmax)
    out = dequantize_nf4(packed, state)
    assert out.shape == w.shape and out.dtype == w.dtype
    torch.testing.assert_close(out, bnb_dequantize(ref_packed, ref), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", CASES)
def test_double_quant_matches_bitsandbytes(name):
    w = CASES[name]()
    ref_packed, ref = bnb.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
    packed, state = quantize_nf4(w, blocksize=64, double_quant=True)
    assert torch.equal(packed, ref_packed)
    assert state.absmax.dtype == torch.uint8 and torch.equal(state.absmax, ref.absmax)
    assert torch.equal(state.offset, ref.offset)
    assert torch.equal(state.nested_absmax, ref.state2.absmax)
    assert torch.equal(state.nested_code, ref.state2.code)
    assert state.nested_blocksize == ref.state2.blocksize == 256
    torch.testing.assert_close(dequantize_nf4(packed, state), bnb_dequantize(ref_packed, ref), rtol=0, atol=1e-6)


def test_non_finite_values_match_bitsandbytes():
    """A NaN block (all codes 15) and an inf block (finite values 0.0, the inf NaN -> 15)."""
    w = torch.randn(4, 64, generator=gen(18))
    w[1, 3], w[2, 5] = float("nan"), float("inf")
    ref_packed, ref = bnb.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=False)
    packed, state = quantize_nf4(w, double_quant=False)
    assert torch.equal(packed, ref_packed)
    torch.testing.assert_close(state.absmax, ref.absmax, rtol=0, atol=0, equal_nan=True)


def test_double_quant_over_many_nested_blocks():
    """300 * 128 / 64 = 600 scales: two full nested blocks of 256 and a partial one."""
    w = torch.randn(300, 128, generator=gen(8)) * torch.rand(300, 1, generator=gen(9))
    ref_packed, ref = bnb.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
    packed, state = quantize_nf4(w)
    assert torch.equal(state.absmax, ref.absmax) and torch.equal(state.nested_absmax, ref.state2.absmax)
    torch.testing.assert_close(dequantize_nf4(packed, state), bnb.dequantize_4bit(ref_packed, ref), rtol=0, atol=1e-6)


def test_equal_scales_give_zero_nested_absmax():
    """Every block's absmax is 1, so absmax - mean is 0: bitsandbytes writes code 0 and scale 0."""
    w = torch.rand(16, 64, generator=gen(10)) * 0.5
    w[:, 0] = 1.0
    _, ref = bnb.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
    _, state = quantize_nf4(w)
    assert torch.equal(state.absmax, ref.absmax) and torch.equal(state.nested_absmax, ref.state2.absmax)
    assert not state.absmax.any() and not state.nested_absmax.any()


def test_dynamic_map_matches_bitsandbytes():
    assert torch.equal(dynamic_map(), bnb.create_dynamic_map())


def test_8bit_ties_match_bitsandbytes():
    """Dynamic-map codes, midpoints and their neighbours, in blocks of 256 with absmax 1."""
    code = dynamic_map()
    mids = (code[:-1] + code[1:]) / 2
    values = torch.cat([code, mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0)),
                        torch.rand(4000, generator=gen(11)) * 2 - 1])
    values = torch.cat([values, torch.zeros(-values.numel() % 255)]).view(-1, 255)
    values = torch.cat([values, torch.ones(values.shape[0], 1)], dim=1).view(-1)
    values = torch.cat([values, torch.randn(100, generator=gen(12)), torch.zeros(256)])  # a partial and a zero block
    ref_codes, ref = bnb.quantize_blockwise(values, blocksize=256)
    codes, absmax = _quantize_dynamic(values, 256)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref.absmax)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights(dtype):
    w = (torch.randn(64, 128, generator=gen(13)) * 0.05).to(dtype)
    ref_packed, ref = bnb.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
    packed, state = quantize_nf4(w)
    assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref.absmax)
    out = dequantize_nf4(packed, state)
    assert out.dtype == dtype and torch.equal(out, bnb.dequantize_4bit(ref_packed, ref))


@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_other_blocksizes(blocksize):
    w = torch.randn(64, 192, generator=gen(14))
    ref_packed, ref = bnb.quantize_4bit(w, quant_type="nf4", blocksize=blocksize, compress_statistics=True)
    packed, state = quantize_nf4(w, blocksize=blocksize)
    assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref.absmax)
    torch.testing.assert_close(dequantize_nf4(packed, state), bnb_dequantize(ref_packed, ref), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_real_weights_match_bitsandbytes(smol):
    model, _ = smol
    layers = model.model.layers
    for linear in (layers[0].self_attn.q_proj, layers[-1].mlp.down_proj):
        w = linear.weight.detach()
        for double_quant in (False, True):
            ref_packed, ref = bnb.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=double_quant)
            packed, state = quantize_nf4(w, double_quant=double_quant)
            assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref.absmax)
            out = dequantize_nf4(packed, state)
            torch.testing.assert_close(out, bnb.dequantize_4bit(ref_packed, ref), rtol=0, atol=1e-6)


def seeded_linear(in_features: int, out_features: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        for param in linear.parameters():
            param.copy_(torch.randn(param.shape, generator=gen(seed)) * in_features**-0.5)
    return linear


def linear_and_reference(bias: bool = True) -> tuple[nn.Linear, torch.Tensor]:
    linear = seeded_linear(576, 1536, bias=bias)
    packed, ref = bnb.quantize_4bit(linear.weight.detach(), quant_type="nf4", blocksize=64, compress_statistics=True)
    return linear, bnb.dequantize_4bit(packed, ref)


def test_linear4bit_matches_reference_forward_and_backward():
    linear, ref_weight = linear_and_reference()
    layer = Linear4bit.from_linear(linear)
    assert (layer.in_features, layer.out_features) == (576, 1536)
    x = torch.randn(2, 5, 576, generator=gen(15), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, ref = layer(x), F.linear(x_ref, ref_weight, linear.bias.detach())
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    grad = torch.randn(out.shape, generator=gen(16))
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in layer.parameters())
    assert all(b.grad is None for b in layer.buffers())
    torch.testing.assert_close(layer.dequantized_weight(), ref_weight, rtol=0, atol=1e-6)


def test_linear4bit_saves_no_full_weight_for_backward():
    linear, _ = linear_and_reference(bias=False)
    layer = Linear4bit.from_linear(linear)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(torch.randn(3, 576, generator=gen(19), requires_grad=True)).sum().backward()
    assert saved and not any(t.is_floating_point() and t.numel() >= 576 * 1536 for t in saved)


def test_linear4bit_compute_dtype():
    linear, ref_weight = linear_and_reference()
    layer = Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16)
    x = torch.randn(4, 576, generator=gen(17))
    out = layer(x)
    ref = F.linear(x.bfloat16(), ref_weight.bfloat16(), linear.bias.detach().bfloat16()).float()
    assert out.dtype == torch.float32 and torch.equal(out, ref)


def test_linear4bit_buffers_follow_the_module():
    layer = Linear4bit.from_linear(seeded_linear(128, 64))
    names = {"weight_packed", "weight_absmax", "weight_offset", "weight_nested_absmax", "weight_nested_code", "bias"}
    assert set(layer.state_dict()) == names
    moved = layer.to("meta")
    assert all(t.device.type == "meta" for t in moved.state_dict().values())


def test_linear4bit_dtype_cast_keeps_the_state():
    layer = Linear4bit.from_linear(seeded_linear(128, 64))
    weight = layer.dequantized_weight()
    layer.to(torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16 and layer.weight_nested_absmax.dtype == torch.float32
    assert torch.equal(layer.dequantized_weight(), weight)
    assert layer(torch.randn(3, 128, generator=gen(20)).bfloat16()).dtype == torch.bfloat16


def test_bits_per_parameter():
    linear, _ = linear_and_reference()
    bits = Linear4bit.from_linear(linear).bits_per_parameter()
    n = 1536 * 576
    blocks = n // 64
    # packed codes, uint8 absmax codes, fp32 nested absmax, fp32 offset, 256 x fp32 code table
    expected = 8 * (n / 2 + blocks + 4 * math.ceil(blocks / 256) + 4 + 256 * 4) / n
    print(f"NF4 bits per parameter, 1536x576 with double quantisation: {bits:.5f}")
    assert bits == pytest.approx(expected, rel=1e-12)
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 8 * 1028 / n, rel=1e-12)
    assert bits == pytest.approx(4.127, abs=0.01)
    plain = Linear4bit.from_linear(linear, double_quant=False).bits_per_parameter()
    assert plain == pytest.approx(4 + 32 / 64, rel=1e-12)


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def test_state_for_another_shape_is_an_error():
    packed, _ = quantize_nf4(torch.randn(64, 64, generator=gen(21)))
    _, other = quantize_nf4(torch.randn(64, 128, generator=gen(22)))
    with pytest.raises(AdapterError) as excinfo:
        dequantize_nf4(packed, other)
    message = one_line_error(excinfo)
    assert "(64, 128)" in message and "(2048, 1)" in message


def test_state_with_wrong_block_count_is_an_error():
    packed, state = quantize_nf4(torch.randn(64, 64, generator=gen(23)), double_quant=False)
    state = NF4State(shape=state.shape, dtype=state.dtype, blocksize=128, absmax=state.absmax)
    with pytest.raises(AdapterError) as excinfo:
        dequantize_nf4(packed, state)
    assert "(64, 64)" in one_line_error(excinfo)


@pytest.mark.parametrize("weight, blocksize", [
    (torch.ones(8, 8), 48),
    (torch.randint(0, 3, (8, 8)), 64),
    (torch.empty(0, 64), 64),
])
def test_bad_input_is_an_error(weight, blocksize):
    with pytest.raises(AdapterError) as excinfo:
        quantize_nf4(weight, blocksize=blocksize)
    one_line_error(excinfo)
