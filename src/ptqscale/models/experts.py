"""Mixture-of-experts layers as per-expert linears (mixtral, qwen2_moe, qwen3_moe).

transformers (>= 5) stores the experts of a sparse MoE block fused: one 3-D parameter
``gate_up_proj`` [experts, 2 * intermediate, hidden] and one ``down_proj`` [experts, hidden,
intermediate]. A quantizer sees matrices, and an expert is three of them, so
:func:`split_experts` (called by ``load_model``, like ``replace_conv1d``) replaces each fused
module by :class:`PerExpertLinears`: a ``ModuleList`` of :class:`ExpertMLP` with plain
``nn.Linear`` ``gate_proj``, ``up_proj``, ``down_proj`` (names ``mlp.experts.<k>.gate_proj``,
as transformers 4 named them). Every method then treats an expert's matrices as it treats any
linear: RTN rounds them, GPTQ gets each expert's Hessian from the tokens routed to it (an
expert that no calibration token reaches falls back to RTN, recorded per layer), and the bytes
accounting counts them at the format's bits.

The forward is transformers' eager expert loop (experts in index order, each on the tokens the
router chose for it, weighted and summed), with the fused matmul split in two: the same
numbers up to float summation order. The router (``mlp.gate``, and qwen2_moe's
``shared_expert_gate``) is not a target: it stays in full precision (anatomy.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ptqscale.models.errors import UnsupportedArchitectureError

# model_type values whose sparse blocks hold fused experts that split_experts converts
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe")


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act_fn):
        super().__init__()
        self.gate_proj = _linear(gate)
        self.up_proj = _linear(up)
        self.down_proj = _linear(down)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # gate and up read the same tensor x: the calibration plumbing groups them (one Hessian)
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PerExpertLinears(nn.ModuleList):
    """Drop-in for a fused experts module: same call ``(hidden, top_k_index, top_k_weights)``."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        n = len(self)
        if hidden_states.is_meta:  # a skeleton (models/skeleton.py) has no routing to follow:
            for expert in self:    # every expert on every token, for the shapes and call order
                out = out + expert(hidden_states)
            return out
        with torch.no_grad():  # [experts(+1), top_k, tokens]: which token chose which expert
            mask = nn.functional.one_hot(top_k_index, num_classes=n + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for k in hit[:, 0].tolist():
            if k == n:
                continue
            top_k_pos, token_idx = torch.where(mask[k])
            y = self[k](hidden_states[token_idx]) * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _linear(weight: torch.Tensor) -> nn.Linear:
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=False, device=weight.device,
                       dtype=weight.dtype)
    linear.weight.data.copy_(weight)
    linear.requires_grad_(weight.requires_grad)
    return linear


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` holds experts as 3-D parameters (a 2-D ``gate_up_proj`` is phi3's MLP)."""
    gate_up = getattr(module, "gate_up_proj", None)
    return isinstance(gate_up, nn.Parameter) and gate_up.ndim == 3


def _check_layout(name: str, module: nn.Module) -> None:
    """Only the layout the split reproduces: concatenated [gate; up], not transposed, no bias."""
    layout = {"has_gate": True, "has_bias": False, "is_transposed": False,
              "is_concatenated": True, "has_post_expert_norm": False}
    odd = {k: getattr(module, k) for k, v in layout.items() if getattr(module, k, v) != v}
    down = getattr(module, "down_proj", None)
    if odd or not isinstance(down, nn.Parameter) or down.ndim != 3:
        raise UnsupportedArchitectureError(
            f"fused experts {name!r} ({type(module).__name__}) have a layout the per-expert "
            f"split does not handle ({odd or 'no 3-D down_proj'}); supported: "
            f"{list(MOE_ARCHITECTURES)} (models/experts.py)")


@torch.no_grad()
def split_experts(model: nn.Module) -> int:
    """Replace every fused experts module by :class:`PerExpertLinears`; returns how many.

    Example::

        >>> split_experts(mixtral)        # doctest: +SKIP
        2
        >>> mixtral.model.layers[0].mlp.experts[3].down_proj   # doctest: +SKIP
        Linear(in_features=64, out_features=32, bias=False)
    """
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not is_fused_experts(child):
                continue
            _check_layout(child_name, child)
            inter = child.gate_up_proj.shape[1] // 2
            experts = PerExpertLinears(
                ExpertMLP(gu[:inter], gu[inter:], down, child.act_fn)
                for gu, down in zip(child.gate_up_proj, child.down_proj, strict=True))
            setattr(parent, child_name, experts)
            replaced += 1
    return replaced


def expert_prefixes(model: nn.Module) -> list[str]:
    """Full names of the experts (``model.layers.0.mlp.experts.3``), in model order."""
    return [f"{name}.{k}" for name, m in model.named_modules()
            if isinstance(m, PerExpertLinears) for k in range(len(m))]
