"""AdaLoRA (Zhang et al., 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"), from scratch.

    y = base(x) + (dropout(x) @ (A * E)^T @ B^T) * alpha / (init_r + 1e-5)

The update is in SVD form: P = B (out, r) and Q = A (r, in) are the singular vectors, E (r, 1)
the singular values. E starts at zero (a fresh adapter changes nothing), A and B at N(0, 0.02).
During training the rank allocator (`RankAllocator`, run by `peftkit train` after every
optimizer step) scores each triplet (E_i, A_i, B_:i) by the smoothed sensitivity |p * grad|
times its uncertainty (paper, eqs. 8-11), and zeroes the E of the lowest-scoring ones until
the total rank follows a cubic schedule from init_r per layer down to target_r on average
(eq. 12). The loss carries the orthogonality penalty on A and B (eq. 4). The schedule's
warm-up (`tinit`) and final stretch (`tfinal`) are whole steps or fractions of the run's steps
(the preset's 0.1 and 0.3, as the paper spreads its schedule over the whole run), fixed once
the run's length is known, so a short run reaches its final ranks too.

Saved adapters hold each layer's surviving triplets only, with `rank_pattern` (one flag per
initial rank) in adapter_config.json, as peft saves them, so they load in peft with the
final ranks. The scale stays alpha / init_r after pruning, as in peft.

Where peft differs from the paper, peft is followed (so adapters and curves are equal): the
penalty is the mean of the Frobenius norms of A A^T - I and B^T B - I, not the sum of their
squares; the scale is alpha / init_r rather than alpha / r. Where peft fails, ours does
not: a budget step that prunes nothing (k = 0 in peft's `kthvalue`, a crash there) is a no-op.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from peftkit.errors import ConfigError
from peftkit.methods.layer import (AdapterLayer, LayerMethod, adapter_factory, check_number, check_positive_int,
                                   check_targets, reject_unsupported)

PARTS = ("lora_A", "lora_B", "lora_E")


@dataclass
class AdaLoRAConfig:
    """An AdaLoRA adapter and its rank schedule, as written in an `adapters/*.yaml` preset."""

    method: ClassVar[str] = "adalora"
    init_r: int = 12  # every layer's starting rank
    target_r: int = 8  # the average rank the budget ends at
    alpha: float = 8.0  # the update is scaled by alpha / init_r
    dropout: float = 0.0  # dropout on the adapter's input during training
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])  # names, a regex, or all-linear
    tinit: int | float = 0  # warm-up before any rank is pruned: steps, or a fraction of the run's (0.1)
    tfinal: int | float = 0  # the final stretch at the final ranks: steps, or a fraction of the run's (0.3)
    delta_t: int = 1  # prune every delta_t steps in between
    beta1: float = 0.85  # smoothing of the sensitivity
    beta2: float = 0.85  # smoothing of its uncertainty
    orth_reg_weight: float = 0.5  # weight of the orthogonality penalty in the loss
    total_step: int | None = None  # steps of the schedule; None: the run's optimizer steps
    rank_pattern: dict[str, list[bool]] | None = None  # the surviving ranks per layer, as loaded from a saved adapter

    def __post_init__(self) -> None:
        check_positive_int("init_r", self.init_r, ": set init_r to 12")
        check_positive_int("target_r", self.target_r, ": set target_r below init_r, 8 for example")
        if self.target_r > self.init_r:
            raise ConfigError(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r}): ranks are only "
                              f"pruned")
        check_number("alpha", self.alpha, 0.0, float("inf"))
        check_number("dropout", self.dropout, 0.0, 1.0)
        self.target_modules = check_targets(self.target_modules)
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            steps = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            if not (steps or isinstance(value, float) and 0 <= value < 1):
                raise ConfigError(f"{name} must be whole steps >= 0 or a fraction of the run's steps in [0, 1) "
                                  f"(0.1 for the warm-up, 0.3 for the final stretch), got {value!r}")
        if isinstance(self.tinit, float) and isinstance(self.tfinal, float) and self.tinit + self.tfinal >= 1:
            raise ConfigError(f"tinit ({self.tinit}) and tfinal ({self.tfinal}) leave no pruning phase: together "
                              f"they must stay below 1, 0.1 and 0.3 for example")
        check_positive_int("delta_t", self.delta_t, ": prune every delta_t steps, 1 or more")
        check_number("beta1", self.beta1, 1e-12, 1.0, ": a smoothing factor in (0, 1), 0.85 by default")
        check_number("beta2", self.beta2, 1e-12, 1.0, ": a smoothing factor in (0, 1), 0.85 by default")
        check_number("orth_reg_weight", self.orth_reg_weight, 0.0, float("inf"))
        if self.total_step is not None:
            check_positive_int("total_step", self.total_step, ": or leave it out to use the run's steps")
            self.resolve(self.total_step)

    def resolve(self, total_step: int) -> None:
        """Fix the schedule to `total_step` steps: fractions become whole steps, then it is checked."""
        self.total_step = total_step
        self.tinit, self.tfinal = (steps_of(v, total_step) for v in (self.tinit, self.tfinal))
        self.check_schedule(total_step)

    def placeholder_steps(self) -> int:
        """Before training knows its length: the shortest schedule with a pruning phase (for peft's
        config, which needs one up front)."""
        total = 1
        while steps_of(self.tinit, total) >= total - steps_of(self.tfinal, total):
            total += 1
        return total

    def check_schedule(self, total_step: int) -> None:
        if self.tinit >= total_step - self.tfinal:
            raise ConfigError(f"AdaLoRA's schedule has no pruning phase: tinit ({self.tinit}) must be below the steps "
                              f"({total_step}) minus tfinal ({self.tfinal}): lower tinit or tfinal, or train longer")


def steps_of(value: int | float, total_step: int) -> int:
    """Whole steps, or a fraction of `total_step` rounded half up (Python's round() rounds half to even)."""
    return value if isinstance(value, int) else math.floor(value * total_step + 0.5)


class AdaLoRALinear(AdapterLayer):
    """A linear layer with AdaLoRA's SVD-form update (see the module docstring).

    `rank_mask` holds the allocator's last verdict, one flag per initial rank (None: all kept);
    a layer loaded from a saved adapter holds only its surviving ranks.
    """

    adapter_parameter_names = PARTS

    def __init__(self, base: nn.Module, r: int, init_r: int, alpha: float, dropout: float = 0.0,
                 rank_mask: list[bool] | None = None) -> None:
        super().__init__(base)
        # peft's draws, in its order (A, E, B, ranknum), before E = 0 and A, B ~ N(0, 0.02)
        a, e, b = torch.randn(r, self.in_features), torch.randn(r, 1), torch.randn(self.out_features, r)
        torch.randn(1)
        nn.init.zeros_(e)
        nn.init.normal_(a, mean=0.0, std=0.02)
        nn.init.normal_(b, mean=0.0, std=0.02)
        self.lora_A = nn.Parameter(adapter_factory(base, a))  # Q: right singular vectors (r, in)
        self.lora_E = nn.Parameter(adapter_factory(base, e))  # singular values (r, 1)
        self.lora_B = nn.Parameter(adapter_factory(base, b))  # P: left singular vectors (out, r)
        self.scaling = alpha if alpha > 0 else float(init_r)
        self.register_buffer("ranknum", adapter_factory(base, torch.full((1,), float(init_r))) + 1e-5,
                             persistent=False)  # peft's divisor, init_r + 1e-5, kept after pruning
        self.init_r = init_r
        self.rank_mask = rank_mask
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        """B (A * E) * alpha / init_r, shape (out, in)."""
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / self.ranknum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_forward(x)
        if self.merged:
            return result
        x = x.to(self.lora_A.dtype)
        update = (self.dropout(x) @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.scaling / self.ranknum
        return (result + update).to(result.dtype)

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """The surviving triplets only (all of them before any pruning), as peft saves them."""
        tensors = {name: getattr(self, name) for name in PARTS}
        keep = self.rank_mask
        if keep is None or sum(keep) == self.lora_A.shape[0]:  # nothing pruned, or pruned on load already
            return tensors
        index = torch.tensor(keep, device=self.lora_A.device)
        return {"lora_A": tensors["lora_A"][index], "lora_B": tensors["lora_B"][:, index],
                "lora_E": tensors["lora_E"][index]}

    def extra_repr(self) -> str:
        rank = self.lora_A.shape[0] if self.rank_mask is None else sum(self.rank_mask)
        return f"rank={rank}/{self.init_r}, merged={self.merged}"


class AdaLoRAMethod(LayerMethod):
    """AdaLoRA answering the adapter protocol; `peftkit train` runs its rank schedule."""

    name = "adalora"
    peft_type = "ADALORA"
    config_class = AdaLoRAConfig
    module_class = AdaLoRALinear

    def build(self, base: nn.Module, cfg: AdaLoRAConfig, name: str, model: nn.Module) -> AdaLoRALinear:
        mask = (cfg.rank_pattern or {}).get(f"{name}.lora_E")
        if mask is not None and len(mask) != cfg.init_r:
            raise ConfigError(f"rank_pattern for {name} has {len(mask)} flags but init_r is {cfg.init_r}: the "
                              f"adapter_config.json is inconsistent")
        rank = cfg.init_r if mask is None else sum(mask)
        return AdaLoRALinear(base, rank, cfg.init_r, cfg.alpha, cfg.dropout, mask)

    def rank_pattern(self, model: nn.Module) -> dict[str, list[bool]] | None:
        """{layer.lora_E: flags} of every layer the allocator (or a loaded adapter) pruned; None before any."""
        pattern = {f"{name}.lora_E": list(m.rank_mask) for name, m in model.named_modules()
                   if isinstance(m, AdaLoRALinear) and m.rank_mask is not None}
        return pattern or None

    def peft_fields(self, cfg: AdaLoRAConfig, model: nn.Module) -> dict:
        schedule = cfg
        if cfg.total_step is None:  # before training: a placeholder schedule, fixed by `begin`
            schedule = dataclasses.replace(cfg, total_step=cfg.placeholder_steps())
        return {"init_r": cfg.init_r, "target_r": cfg.target_r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
                "tinit": schedule.tinit, "tfinal": schedule.tfinal, "deltaT": cfg.delta_t, "beta1": cfg.beta1, "beta2": cfg.beta2,
                "orth_reg_weight": cfg.orth_reg_weight, "total_step": schedule.total_step, "rank_pattern": self.rank_pattern(model),
                "r": 8, "bias": "none", "init_lora_weights": True, "use_rslora": False, "use_dora": False,
                "layers_to_transform": None, "layers_pattern": None}

    def from_peft_config(self, peft: dict) -> AdaLoRAConfig:
        reject_unsupported(peft, {"bias": ("none", None), "use_dora": (False, None), "layers_to_transform": (None, []),
                                  "loftq_config": ({}, None)})
        return AdaLoRAConfig(init_r=peft.get("init_r", 12), target_r=peft.get("target_r", 8),
                             alpha=peft.get("lora_alpha", 8), dropout=peft.get("lora_dropout", 0.0),
                             target_modules=peft["target_modules"], tinit=peft.get("tinit", 0),
                             tfinal=peft.get("tfinal", 0), delta_t=peft.get("deltaT", 1),
                             beta1=peft.get("beta1", 0.85), beta2=peft.get("beta2", 0.85),
                             orth_reg_weight=peft.get("orth_reg_weight", 0.5), total_step=peft.get("total_step"),
                             rank_pattern=peft.get("rank_pattern"))

    def regularization(self, model: nn.Module) -> torch.Tensor | None:
        """orth_reg_weight times the mean Frobenius norm of A A^T - I and B^T B - I over the layers (peft's form)."""
        pairs = ((m.lora_A, m.lora_B) for m in self.modules(model))
        return orthogonal_penalty(pairs, model.peftkit_config.orth_reg_weight)

    def allocator(self, model: nn.Module) -> "RankAllocator":
        return RankAllocator(model, model.peftkit_config)


def orthogonal_penalty(pairs, weight: float) -> torch.Tensor | None:
    """weight times the mean Frobenius norm of A A^T - I and B^T B - I over the (A, B) pairs, summed
    in peft's order (A, then B, layer by layer); None for weight 0 or no pairs."""
    if weight == 0:
        return None
    total, count = 0, 0
    for weight_a, weight_b in pairs:
        for cov in (weight_a @ weight_a.T, weight_b.T @ weight_b):  # both (r, r)
            eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
            total = total + torch.norm(cov - eye, p="fro")
            count += 1
    return weight * (total / count) if count else None


SCORES = ("ipt", "avg_ipt", "avg_unc")  # checkpoint labels of the three score dicts


def scores_state(*scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The allocator's score dicts (sensitivity, its average, the uncertainty) as one flat tensor dict."""
    return {f"{label}.{k}": v for label, found in zip(SCORES, scores) for k, v in found.items()}


def load_scores(tensors: dict[str, torch.Tensor], *scores: dict[str, torch.Tensor]) -> None:
    """Fill the (emptied) score dicts back from `scores_state`'s tensors."""
    for label, found in zip(SCORES, scores):
        found.update({k[len(label) + 1:]: v.clone() for k, v in tensors.items() if k.startswith(label + ".")})


class RankAllocator:
    """AdaLoRA's budget: importance scores of every triplet and the cubic schedule (paper, section 3.3).

    `update_and_allocate(step)` runs after each optimizer step, before the gradients are cleared
    (peft's placement). Scores are kept per parameter under the model's own names.
    """

    def __init__(self, model: nn.Module, cfg: AdaLoRAConfig) -> None:
        self.cfg = cfg
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, AdaLoRALinear)}
        if any(m.rank_mask is not None and len(m.rank_mask) != m.lora_A.shape[0] for m in self.layers.values()):
            raise ConfigError("this AdaLoRA adapter was saved with its final ranks: train a fresh adapter, or load "
                              "it for inference only")
        self.init_budget = sum(m.lora_A.shape[0] for m in self.layers.values())
        self.target_budget = cfg.target_r * len(self.layers)
        self.reset_scores()

    def reset_scores(self) -> None:
        self.ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def parameters(self) -> dict[str, nn.Parameter]:
        return {f"{name}.{part}": getattr(m, part) for name, m in self.layers.items() for part in PARTS}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(total rank allowed at `step`, whether to prune now): eq. 12, truncated to an integer as peft does."""
        cfg, total = self.cfg, self.cfg.total_step
        if step <= cfg.tinit:
            return self.init_budget, False
        if step > total - cfg.tfinal:
            return self.target_budget, True
        progress = 1 - (step - cfg.tinit) / (total - cfg.tfinal - cfg.tinit)
        budget = int((self.init_budget - self.target_budget) * progress**3 + self.target_budget)
        return budget, step % cfg.delta_t == 0

    @torch.no_grad()
    def update_scores(self) -> None:
        """I = |p * grad| smoothed (beta1), and its uncertainty |I - smoothed I| smoothed (beta2): eqs. 8-9."""
        beta1, beta2 = self.cfg.beta1, self.cfg.beta2
        for name, p in self.parameters().items():
            if p.grad is None:
                continue
            if name not in self.ipt:
                for scores in (self.ipt, self.exp_avg_ipt, self.exp_avg_unc):
                    scores[name] = torch.zeros_like(p)
            self.ipt[name] = (p * p.grad).abs().detach()
            self.exp_avg_ipt[name] = beta1 * self.exp_avg_ipt[name] + (1 - beta1) * self.ipt[name]
            self.exp_avg_unc[name] = beta2 * self.exp_avg_unc[name] + (1 - beta2) * (
                self.ipt[name] - self.exp_avg_ipt[name]).abs()

    def _score(self, name: str) -> torch.Tensor:
        return self.exp_avg_ipt[name] * self.exp_avg_unc[name]

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> None:
        """Zero E of the lowest-scoring triplets so that `budget` ranks remain (eq. 11's S_i = s(E_i) +
        mean s(A_i) + mean s(B_:i)); ties at the threshold are pruned too, as peft does."""
        scores = {}
        for name in self.layers:
            rows = self._score(f"{name}.lora_A").mean(dim=1, keepdim=True)  # (r, 1)
            cols = self._score(f"{name}.lora_B").mean(dim=0).view(-1, 1)  # (r, 1)
            scores[name] = self._score(f"{name}.lora_E").view(-1) + torch.cat([rows, cols], dim=1).sum(dim=1).view(-1)
        prune = self.init_budget - budget
        if prune <= 0:
            return
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=prune)[0].item()
        for name, module in self.layers.items():
            drop = scores[name] <= threshold
            module.lora_E.masked_fill_(drop.view(-1, 1), 0.0)
            module.rank_mask = (~drop).tolist()

    @torch.no_grad()
    def mask_using_rank_pattern(self) -> None:
        """Re-zero the pruned E (their gradients would regrow them) during the final phase."""
        for module in self.layers.values():
            if module.rank_mask is not None:
                keep = torch.tensor(module.rank_mask, device=module.lora_E.device).view(-1, 1)
                module.lora_E.masked_fill_(~keep, 0.0)

    def begin(self, steps: int) -> None:
        """Training starts with `steps` optimizer steps: the schedule's length unless the config sets one."""
        if self.cfg.total_step is None:
            self.cfg.resolve(steps)

    def update_and_allocate(self, step: int) -> None:
        """After the optimizer step of `step` (0-based), before its gradients are cleared."""
        final = self.cfg.total_step - self.cfg.tfinal
        if step < final:
            self.update_scores()
            budget, prune = self.budget_schedule(step)
            if prune:
                self.mask_to_budget(budget)
        elif step == final:  # the final allocation, from the scores so far
            self.mask_to_budget(self.budget_schedule(step)[0])
            self.reset_scores()
        else:
            self.mask_using_rank_pattern()

    def finish(self) -> None:
        """At the end of training: the model holds exactly what is saved (pruned ranks at zero)."""
        self.mask_using_rank_pattern()

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON) to resume from: the scores and the masks."""
        return scores_state(self.ipt, self.exp_avg_ipt, self.exp_avg_unc), {"rank_mask": {name: m.rank_mask for name, m in self.layers.items()}}

    @torch.no_grad()
    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.reset_scores()
        load_scores(tensors, self.ipt, self.exp_avg_ipt, self.exp_avg_unc)
        for name, mask in meta["rank_mask"].items():
            self.layers[name].rank_mask = mask
