"""Mixture-of-experts pieces shared by the MoE families: the routers and the sparse SwiGLU layer.

The layer never computes an expert on a token that did not choose it and never loops over tokens:
the (token, expert) pairs are sorted by expert, each active expert runs one SwiGLU on its
contiguous run of tokens, and the weighted outputs are added back per token. Where torch offers a
grouped matmul (`torch._grouped_mm`) and no gradient is needed, all experts run as three grouped
matmuls over the sorted tokens with the group offsets on the device: no host sync at all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from prophet.models.layers import SwiGLU


@dataclass(frozen=True)
class RouterSpec:
    """How tokens choose experts: LLaDA2's sigmoid with expert_bias within groups (DeepSeek-V3 style),
    or a plain softmax top-k (Qwen3-MoE / SDAR-MoE with renormalised weights, OLMoE / LLaDA-MoE without)."""

    n_experts: int
    top_k: int                    # experts per token
    n_group: int = 1              # experts split into this many equal groups ...
    topk_group: int = 1           # ... of which each token may use the best this many
    norm_topk_prob: bool = True   # renormalise the chosen experts' scores to sum 1
    scaling: float = 1.0          # routed_scaling_factor, applied after the renormalisation
    score: Literal["sigmoid", "softmax"] = "sigmoid"  # sigmoid per expert, or softmax over the experts
    expert_bias: bool = True      # a learned per-expert selection bias (buffer `expert_bias`; LLaDA2)


class Router(nn.Module):
    """Scores in float32 (sigmoid or softmax of x W^T), selection by scores (+ expert_bias) within the
    best groups, combine weights the chosen experts' own scores (renormalised, scaled as the spec says).

    `expert_bias`, where the spec has one, changes which experts are chosen (load balancing learned in
    training), never the weights they are combined with. Published names: `weight`, `expert_bias`.
    """

    def __init__(self, width: int, spec: RouterSpec) -> None:
        super().__init__()
        if spec.n_experts % spec.n_group or not 0 < spec.topk_group <= spec.n_group:
            raise ValueError(f"router: {spec.n_experts} experts cannot form {spec.n_group} equal groups "
                             f"with {spec.topk_group} kept")
        if spec.top_k > spec.topk_group * (spec.n_experts // spec.n_group):
            raise ValueError(f"router: top_k {spec.top_k} exceeds the experts of {spec.topk_group} groups")
        self.spec = spec
        self.weight = nn.Parameter(torch.empty(spec.n_experts, width))
        if spec.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(spec.n_experts))
        else:
            self.expert_bias = None
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, C) -> chosen experts (N, k) int64 and their combine weights (N, k) float32."""
        s = self.spec
        logits = F.linear(x.float(), self.weight.float())                     # (N, E)
        scores = torch.sigmoid(logits) if s.score == "sigmoid" else logits.softmax(-1)
        biased = scores if self.expert_bias is None else scores + self.expert_bias.float()
        idx = group_limited_topk(biased, s.top_k, s.n_group, s.topk_group)  # (N, k)
        w = scores.gather(1, idx)                                           # unbiased scores
        if s.norm_topk_prob and s.top_k > 1:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * s.scaling


def group_limited_topk(scores: torch.Tensor, top_k: int, n_group: int, topk_group: int) -> torch.Tensor:
    """(N, E) selection scores -> (N, top_k) expert ids, chosen only among the best `topk_group` groups.

    A group's score is the sum of its two best experts' scores (one, for groups of one expert).
    """
    N, E = scores.shape
    grouped = scores.view(N, n_group, E // n_group)                            # (N, G, E/G)
    group_score = grouped.topk(min(2, E // n_group), dim=-1).values.sum(-1)   # (N, G)
    keep = group_score.topk(topk_group, dim=-1).indices                      # (N, topk_group)
    allowed = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)  # (N, G)
    masked = grouped.masked_fill(~allowed[..., None], float("-inf")).view(N, E)
    return masked.topk(top_k, dim=-1).indices


class Expert(SwiGLU):
    """One routed expert, or the fused shared experts: a SwiGLU that its MoE layer shards, so that a
    tensor-parallel policy naming SwiGLU (dense MLPs) leaves it alone."""


class SparseMoE(nn.Module):
    """Routed SwiGLU experts plus optional always-on shared experts: (B, L, C) -> (B, L, C).

    Parameter names are the published ones: gate.weight, gate.expert_bias (LLaDA2 only),
    experts.{j}.{gate,up,down}_proj.weight, shared_experts.{gate,up,down}_proj.weight.
    """

    def __init__(self, width: int, inner: int, spec: RouterSpec, shared_inner: int = 0) -> None:
        super().__init__()
        self.gate = Router(width, spec)
        self.experts = nn.ModuleList(Expert(width, inner) for _ in range(spec.n_experts))
        self.shared_experts = Expert(width, shared_inner) if shared_inner else None
        self._packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.tp_size = 1  # ranks each expert's width is split over (prepare_tensor_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        flat = x.reshape(B * L, C)                                  # (N, C)
        idx, w = self.gate(flat)                                    # (N, k), (N, k)
        y = self.routed(flat, idx, w)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        if self.tp_size > 1:  # every expert's partial sums, reduced once for the layer
            torch.distributed.all_reduce(y)
        return y.view(B, L, C)

    @torch.no_grad()
    def prepare_tensor_parallel(self, rank: int, world: int) -> None:
        """Keep this rank's share of every expert's width (rows of gate/up, columns of down), shared
        experts too: the layer's output is then a partial sum that forward reduces once, where a
        row-parallel down projection per expert would reduce once per expert. The router stays whole,
        so every rank routes alike."""
        for expert in [*self.experts, *([self.shared_experts] if self.shared_experts is not None else [])]:
            for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                linear = getattr(expert, name)
                part = linear.weight.chunk(world, dim=dim)[rank].clone()
                linear.weight = nn.Parameter(part, requires_grad=False)
                linear.in_features, linear.out_features = part.shape[1], part.shape[0]
        self._packed = None
        self.tp_size = world

    def routed(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Sum over each token's chosen experts of weight * expert(token): (N, C) -> (N, C)."""
        N, k = idx.shape
        order = idx.view(-1).argsort(stable=True)                   # (N*k,) pairs grouped by expert
        token = order // k                                          # token of each sorted pair
        counts = torch.bincount(idx.view(-1), minlength=len(self.experts))  # (E,)
        xs = x.index_select(0, token)                               # (N*k, C) tokens in expert order
        if self._grouped_ok(x):
            out = self._grouped(xs, counts)
        else:
            out = self._looped(xs, counts)
        out = out * w.view(-1)[order, None].to(out.dtype)           # (N*k, C) weighted
        return torch.zeros_like(x).index_add_(0, token, out.to(x.dtype))

    def _looped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """One SwiGLU per active expert on its run of sorted tokens (one host sync for the counts)."""
        out = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                out[start:start + n] = self.experts[e](xs[start:start + n])
                start += n
        return out

    def _grouped_ok(self, x: torch.Tensor) -> bool:
        """torch's grouped matmul applies: inference (its CPU backward fails on empty groups), not float64
        (not among its dtypes; the decoder's oracle tests run it), bf16 on CUDA (its kernel's dtype,
        Hopper and later), and rows whose byte widths it accepts (multiples of 16)."""
        if torch.is_grad_enabled() or not hasattr(torch, "_grouped_mm") or x.dtype == torch.float64:
            return False
        if x.is_cuda and (x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device)[0] < 9):
            return False
        inner = self.experts[0].gate_proj.weight.shape[0]
        return all(d * x.element_size() % 16 == 0 for d in (x.shape[1], inner))

    def _grouped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """All experts as three grouped matmuls over the sorted tokens; offsets stay on the device."""
        gate, up, down = self.packed()                              # (E, I, C), (E, I, C), (E, C, I)
        offs = counts.cumsum(0).to(torch.int32)                     # (E,) end of each expert's run
        h = F.silu(torch._grouped_mm(xs, gate.transpose(-2, -1), offs=offs))
        h = h * torch._grouped_mm(xs, up.transpose(-2, -1), offs=offs)       # (N*k, I)
        return torch._grouped_mm(h, down.transpose(-2, -1), offs=offs)      # (N*k, C)

    @torch.no_grad()
    def packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The experts' weights stacked (E, ...), each expert's parameter then a view into them.

        Packing once rebinds the experts' parameters as views, so memory is not doubled and the
        state dict keeps its per-expert names. It is redone when something (a .to(), a load)
        replaced the parameters since.
        """
        first = self.experts[0].gate_proj.weight
        if self._packed is not None and self._packed[0].data_ptr() == first.data_ptr() \
                and self._packed[0].device == first.device and self._packed[0].dtype == first.dtype:
            return self._packed
        stacks = []
        for name in ("gate_proj", "up_proj", "down_proj"):
            stack = torch.stack([getattr(e, name).weight for e in self.experts])
            grad = getattr(self.experts[0], name).weight.requires_grad
            for j, e in enumerate(self.experts):
                getattr(e, name).weight = nn.Parameter(stack[j], requires_grad=grad)
            stacks.append(stack)
        self._packed = (stacks[0], stacks[1], stacks[2])
        return self._packed
