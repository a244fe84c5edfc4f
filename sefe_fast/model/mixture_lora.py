"""A frozen Linear plus E LoRA experts and a router: the layer of MoELoRA and SMoLoRA.

Both published codes build the same expert bank (CoIN `CoIN/peft/tuners/coinmoelora.py`
L406-473, SMoLoRA `PEFT_SMoLoRA/peft/tuners/smolora.py` L485-551): the LoRA rank r is
split evenly, expert e owning A_e [r/E, in] and B_e [out, r/E]; A_e ~ N(0, 0.01²), B_e = 0
(coinmoelora.py L289-294, smolora.py L297-302); every expert is scaled by alpha / r, the
*total* rank (coinmoelora.py L284, smolora.py L292). They differ in the router:

- `dense` (CoIN MoELoRA, coinmoelora.py L321, L385-396): a bias-free Linear(in → E) on the
  layer's own input token x; softmax over all E experts, per token (no top-k, no
  load-balancing loss): y = W x + Σ_e softmax(R x)_e · (alpha/r) · B_e A_e x.
- `separable` (SMoLoRA, smolora.py L327-335, L418-474): the experts form two halves.
  The visual-understanding half is routed per sample by a bias-free Linear(in → E/2) on the
  mean of the layer's input over the sequence; the instruction half by a bias-free
  Linear(d_ins → E/2) on an embedding of the task's instruction. Both routers pick their
  top-1 expert (a one-hot: no gradient reaches them). Per token, the two results u (vu) and
  v (ins) are mixed by a softmax over two bias-free Linear(out → 1) scores:
  y = W x + a_u · u + a_v · v, (a_u, a_v) = softmax(f_u(u), f_v(v)).

Departures (docs/reference.md has the paper's rules; these are the code's):

- One dropout mask is drawn per input and shared by the experts (the published codes call
  the dropout once per expert).
- `separable`'s sequence mean covers the prompt's real tokens when a `RoutingContext`
  holds the call's token mask (`mixture_attach` sets it: the attention mask, less the
  answer tokens of a training batch), and a forward that continues a KV cache reuses the
  per-sample choice of the full forward before it. The
  published code averages whatever the layer sees: padding and, in training, the answer
  included; during cached decoding only the one new token. Here a sample is routed alike
  in training and in evaluation.

The fast path is two matmuls over the concatenated experts (the routing weight of expert e
scales its r/E columns of A x before B); `reference_mixture_delta` is the plain per-token,
per-expert loop it is tested against (tests/test_mixture_lora.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

ROUTINGS = ("dense", "separable")
A_INIT_STD = 0.01  # both published codes initialise every A_e ~ N(0, 0.01²)


@dataclass
class RoutingContext:
    """What a `separable` layer reads besides its input, shared by all layers of a model.

    token_mask: [B, T] (1 = a prompt token) of the model call in progress, or None;
    continuing: the call continues a KV cache (its inputs are the last tokens of the mask);
    instruction: [d_ins] embedding of the current task's instruction (None: not set).
    """

    token_mask: torch.Tensor | None = None
    continuing: bool = False
    instruction: torch.Tensor | None = None
    # per layer: the [B] visual-understanding choice of its last full forward
    choices: dict[int, torch.Tensor] = field(default_factory=dict)


def router_weights(logits: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """Expert weights from router logits [..., E]: a softmax over all E (`top_k` None) or
    over the top_k largest logits only, the others 0 (ties: the lower index wins). Each row
    sums to 1; with top_k = 1 the row is a one-hot whose gradient is 0."""
    if top_k is None or top_k >= logits.shape[-1]:
        return torch.softmax(logits, dim=-1)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1 (got {top_k})")
    # a stable sort, so that of equal logits the lower index is kept on every device
    kept = torch.sort(logits, dim=-1, descending=True, stable=True).indices[..., :top_k]
    masked = torch.full_like(logits, -math.inf).scatter(-1, kept, logits.gather(-1, kept))
    return torch.softmax(masked, dim=-1)


def sequence_mean(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Per-sample mean of x [B, T, d] over T → [B, d], over real tokens when `token_mask`
    [B, T] matches x (else over all T)."""
    if token_mask is None or token_mask.shape != x.shape[:2]:
        return x.mean(dim=1)
    weights = token_mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class MixtureLoRALinear(nn.Module):
    """`base` (frozen) plus E LoRA experts of rank r/E and a `routing` router (module doc).

    Trainable parameters all have `lora_` in their names: lora_A [r, in] (rows of expert e:
    e·r/E … (e+1)·r/E), lora_B [out, r] (columns likewise), and the router's Linear layers.
    """

    def __init__(
        self,
        base: nn.Linear,
        *,
        experts: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        routing: str = "dense",
        top_k: int | None = None,
        instruction_dim: int | None = None,
        context: RoutingContext | None = None,
    ) -> None:
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"routing {routing!r}: expected one of {ROUTINGS}")
        if experts < 1 or rank % experts:
            raise ValueError(f"rank {rank} must be a positive multiple of experts {experts}")
        if routing == "separable" and (experts % 2 or instruction_dim is None):
            raise ValueError("separable routing needs an even expert count and instruction_dim")
        self.base_layer = base
        self.experts, self.rank, self.routing, self.top_k = experts, rank, routing, top_k
        self.expert_rank = rank // experts
        self.scaling = alpha / rank
        self.context = context if context is not None else RoutingContext()
        device, in_f, out_f = base.weight.device, base.in_features, base.out_features
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.randn(rank, in_f, device=device) * A_INIT_STD)
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, device=device))
        if routing == "dense":
            self.lora_router = nn.Linear(in_f, experts, bias=False, device=device)
        else:
            half = experts // 2
            self.lora_vu_gate = nn.Linear(in_f, half, bias=False, device=device)
            self.lora_ins_gate = nn.Linear(instruction_dim, half, bias=False, device=device)
            self.lora_fc_vu = nn.Linear(out_f, 1, bias=False, device=device)
            self.lora_fc_ins = nn.Linear(out_f, 1, bias=False, device=device)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def expert_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Routing weights [..., E] for input x [..., in] (separable: [B, 1, E], the two
        one-hot halves)."""
        if self.routing == "dense":
            return router_weights(self.lora_router(x), self.top_k)
        return torch.cat([self._vu_weights(x), self._ins_weights(x)], dim=-1).unsqueeze(1)

    def _vu_weights(self, x: torch.Tensor) -> torch.Tensor:
        """[B, E/2] one-hot: each sample's visual-understanding expert."""
        if x.dim() != 3:
            raise ValueError(f"separable routing needs [batch, tokens, features] (got {x.shape})")
        ctx, key = self.context, id(self)
        cached = ctx.choices.get(key)
        if ctx.continuing and cached is not None and cached.shape[0] == x.shape[0]:
            choice = cached
        else:
            logits = self.lora_vu_gate(sequence_mean(x, ctx.token_mask))
            choice = router_weights(logits, top_k=1).argmax(dim=-1)
            ctx.choices[key] = choice.detach()
        return F.one_hot(choice, self.experts // 2).to(x.dtype)

    def _ins_weights(self, x: torch.Tensor) -> torch.Tensor:
        """[B, E/2] one-hot: the instruction's expert, the same for every sample."""
        emb = self.context.instruction
        if emb is None:
            raise RuntimeError("separable routing: no instruction embedding set on the context")
        gate = self.lora_ins_gate
        logits = gate(emb.to(device=gate.weight.device, dtype=gate.weight.dtype))
        return router_weights(logits, top_k=1).to(x.dtype).expand(x.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) + the routed expert update (same shape as base(x))."""
        out = self.base_layer(x)
        xl = x.to(self.lora_A.dtype)
        h = F.linear(self.lora_dropout(xl), self.lora_A)  # [..., r]: every expert's A_e x
        weights = self.expert_weights(xl).repeat_interleave(self.expert_rank, dim=-1)
        h = h * weights
        if self.routing == "dense":
            delta = F.linear(h, self.lora_B) * self.scaling
        else:
            half = self.rank // 2
            u = F.linear(h[..., :half], self.lora_B[:, :half]) * self.scaling
            v = F.linear(h[..., half:], self.lora_B[:, half:]) * self.scaling
            mix = torch.softmax(torch.cat([self.lora_fc_vu(u), self.lora_fc_ins(v)], -1), -1)
            delta = mix[..., :1] * u + mix[..., 1:] * v
        return out + delta.to(out.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}→{self.out_features}, experts={self.experts}, "
            f"rank={self.rank}, routing={self.routing}, top_k={self.top_k}"
        )


# --------------------------------------------------------------------------- reference


def _plain_softmax(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Softmax of scalar tensors, one exp at a time (differentiable)."""
    top = max(float(v.detach()) for v in values)
    exps = [torch.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def _plain_weights(logits: torch.Tensor, top_k: int | None) -> list[torch.Tensor]:
    """One row's expert weights, expert by expert (the rule of `router_weights`)."""
    values = list(logits.unbind())
    k = len(values) if top_k is None else min(top_k, len(values))
    order = sorted(range(len(values)), key=lambda i: (-float(values[i].detach()), i))[:k]
    kept = _plain_softmax([values[i] for i in order])
    weights = [torch.zeros((), dtype=logits.dtype)] * len(values)
    for i, w in zip(order, kept, strict=True):
        weights[i] = w
    return weights


def _expert_output(layer: MixtureLoRALinear, e: int, token: torch.Tensor) -> torch.Tensor:
    """(alpha/r) · B_e A_e token for one token [in] → [out]."""
    rows = slice(e * layer.expert_rank, (e + 1) * layer.expert_rank)
    return layer.scaling * (layer.lora_B[:, rows] @ (layer.lora_A[rows] @ token))


def reference_mixture_delta(
    layer: MixtureLoRALinear, x: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The expert update of `layer` for x [B, T, in], one token and one expert at a time
    (no dropout; differentiable): the plain rule the fused `forward` must equal
    (forward(x) - base(x), and its gradients)."""
    batch, tokens, _ = x.shape
    rows = []
    half = layer.experts // 2
    for b in range(batch):
        if layer.routing == "separable":
            real = [t for t in range(tokens) if token_mask is None or bool(token_mask[b, t])]
            mean = torch.stack([x[b, t] for t in real]).sum(0) / len(real)
            vu = _plain_weights(layer.lora_vu_gate.weight @ mean, 1)
            ins = _plain_weights(layer.lora_ins_gate.weight @ layer.context.instruction, 1)
        for t in range(tokens):
            token = x[b, t]
            if layer.routing == "dense":
                w = _plain_weights(layer.lora_router.weight @ token, layer.top_k)
                rows.append(
                    sum(w[e] * _expert_output(layer, e, token) for e in range(layer.experts))
                )
                continue
            u = sum(vu[e] * _expert_output(layer, e, token) for e in range(half))
            v = sum(ins[e] * _expert_output(layer, half + e, token) for e in range(half))
            a = _plain_softmax([layer.lora_fc_vu.weight[0] @ u, layer.lora_fc_ins.weight[0] @ v])
            rows.append(a[0] * u + a[1] * v)
    return torch.stack(rows).reshape(batch, tokens, layer.out_features)
