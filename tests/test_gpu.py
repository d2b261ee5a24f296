"""CUDA: the paths `peftkit train` takes work with CUDA tensors and equal their references there.
Skipped without CUDA (CI has none); `bench/gpu.sh` runs them on a GPU machine."""

import pytest
import torch

import peftkit
from peftkit.lm_loss import labelled_loss
from peftkit.nf4 import dequantize_nf4, quantize_nf4
from peftkit.protocol import adapter_parameters
from tests.conftest import completion_batch, randomize_adapter, relative

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")


def cuda_model(dtype: torch.dtype = torch.float32, **adapter):
    torch.manual_seed(0)
    model, _ = peftkit.load_model("tiny-llama", dtype="fp32", device="cpu")
    model.to(device=CUDA, dtype=dtype)
    peftkit.apply_adapter(model, "lora", **{"dropout": 0.0, "target_modules": "all-linear", **adapter})
    randomize_adapter(model)
    return model


def grads(model, batch, ours: bool) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = labelled_loss(model, batch).loss if ours else model(**batch).loss
    loss.backward()
    return loss.item(), {k: p.grad.clone() for k, p in adapter_parameters(model).items()}


@pytest.mark.parametrize("adapter", [{}, {"quantize": "nf4"}, {"dora": True}], ids=["lora", "qlora", "dora"])
def test_labelled_loss_on_cuda_equals_the_full_loss(adapter):
    model = cuda_model(**adapter)
    batch = {k: v.to(CUDA) for k, v in completion_batch(model.config.vocab_size).items()}
    full, full_grads = grads(model, batch, ours=False)
    ours, our_grads = grads(model, batch, ours=True)
    assert abs(ours - full) <= 1e-5 * abs(full)
    for key, grad in our_grads.items():
        assert grad.device.type == CUDA.type
        assert relative(grad, full_grads[key]) <= 1e-5, key


def test_labelled_loss_bf16_base_is_close_to_the_full_loss():
    """bf16 base, fp32 adapters: both paths round alike; agreement to bf16's resolution."""
    model = cuda_model(torch.bfloat16)
    batch = {k: v.to(CUDA) for k, v in completion_batch(model.config.vocab_size).items()}
    full, full_grads = grads(model, batch, ours=False)
    ours, our_grads = grads(model, batch, ours=True)
    assert abs(ours - full) <= 1e-2 * abs(full)
    for key, grad in our_grads.items():
        assert relative(grad, full_grads[key]) <= 5e-2, key


def test_nf4_on_cuda_equals_cpu_bit_for_bit():
    weight = torch.randn(256, 320, generator=torch.Generator().manual_seed(0))
    packed, state = quantize_nf4(weight)
    cpu = dequantize_nf4(packed, state)
    gpu_packed, gpu_state = quantize_nf4(weight.to(CUDA))
    assert torch.equal(gpu_packed.cpu(), packed)
    assert torch.equal(dequantize_nf4(gpu_packed, gpu_state).cpu(), cpu)


def test_lora_dropout_on_cuda_drops_as_peft_does(tmp_path):
    from peft import PeftModel

    model = cuda_model(dropout=0.3)
    base, _ = peftkit.load_model("tiny-llama", dtype="fp32", device="cpu")
    theirs = PeftModel.from_pretrained(base.to(CUDA), peftkit.save_adapter(model, tmp_path / "a"), is_trainable=True)
    batch = {k: v.to(CUDA) for k, v in completion_batch(model.config.vocab_size).items()}
    losses = []
    for m in (model, theirs):
        m.train()
        torch.manual_seed(3)
        losses.append(m(**batch).loss.item())
    assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[1])
