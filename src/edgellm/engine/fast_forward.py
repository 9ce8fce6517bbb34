"""A lean forward pass for the Llama family (Llama, Mistral, Qwen2, SmolLM...).

transformers' module forward spends about a quarter of a CPU decode step outside the matrix
products (module calls, hooks, wrappers, one product per projection). For the architectures
listed in :data:`ARCHITECTURES` this module runs the same arithmetic on the same weights
with fewer, larger operations: the q/k/v projections as one product and gate/up as one (the
original weights become views into the fused ones: no extra memory), RMSNorm and the rotary
embedding written as transformers writes them, the model's own rotary module for cos/sin
(any RoPE scaling it supports), q and k rotated in one pass, and the paged attention of :mod:`edgellm.engine.kv_cache`.

Any other architecture runs through transformers' own forward with the paged attention
plugged into its attention interface. Tests hold both paths to transformers' logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgellm.engine.kv_cache import StepLayout, attend

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def supports(model: torch.nn.Module) -> bool:
    """True when :class:`FastForward` computes exactly what ``model`` computes."""
    if type(model).__name__ not in ARCHITECTURES:
        return False
    config = model.config
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False  # windowed attention: leave it to transformers
    if getattr(config, "hidden_act", "silu") != "silu":
        return False
    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    return all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) and all(
        hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")
    ) and getattr(attn.o_proj, "bias", None) is None and getattr(mlp.down_proj, "bias", None) is None


def _fuse(*linears: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linears; theirs become views into it."""
    weight = torch.cat([lin.weight.data for lin in linears], dim=0)
    biases = [lin.bias for lin in linears]
    bias = torch.cat([b.data for b in biases], dim=0) if all(b is not None for b in biases) else None
    row = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight.data = weight[row : row + n]
        if bias is not None:
            lin.bias.data = bias[row : row + n]
        row += n
    return weight, bias


class _Layer:
    __slots__ = ("index", "norm_in", "norm_post", "eps_in", "eps_post", "qkv_w", "qkv_b",
                 "o_w", "gate_up_w", "down_w", "q_size", "kv_size", "inter")  # fmt: skip


class FastForward:
    """Callable ``(input_ids [T], positions [T], layout, keep [n]) -> logits [n, vocab]``."""

    def __init__(self, model: torch.nn.Module):
        config = model.config
        self.model = model
        self.heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.scale = self.head_dim ** -0.5
        self.layers: list[_Layer] = []
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            fl = _Layer()
            fl.index = i
            fl.norm_in = layer.input_layernorm.weight
            fl.eps_in = layer.input_layernorm.variance_epsilon
            fl.norm_post = layer.post_attention_layernorm.weight
            fl.eps_post = layer.post_attention_layernorm.variance_epsilon
            fl.qkv_w, fl.qkv_b = _fuse(attn.q_proj, attn.k_proj, attn.v_proj)
            fl.o_w = attn.o_proj.weight
            fl.gate_up_w, _ = _fuse(mlp.gate_proj, mlp.up_proj)
            fl.down_w = mlp.down_proj.weight
            fl.q_size = self.heads * self.head_dim
            fl.kv_size = self.kv_heads * self.head_dim
            fl.inter = mlp.gate_proj.weight.shape[0]
            self.layers.append(fl)
        self.embed = model.model.embed_tokens
        self.norm = model.model.norm
        self.rotary = model.model.rotary_emb
        self.lm_head = model.lm_head

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """transformers' LlamaRMSNorm: in float32 ``F.rms_norm`` is the same arithmetic, bit
        for bit, in one call; other dtypes are normalised in float32, as transformers does."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, eps)
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, layout: StepLayout,
                 keep: torch.Tensor) -> torch.Tensor:  # fmt: skip
        x = self.embed(input_ids)  # [T, hidden]
        cos, sin = self.rotary(x, positions.unsqueeze(0))
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [T, 1, d]: broadcast over heads
        t = x.shape[0]
        heads, kv_heads, d = self.heads, self.kv_heads, self.head_dim
        rms_norm, linear, silu = self._rms_norm, F.linear, F.silu
        for fl in self.layers:
            h = rms_norm(x, fl.norm_in, fl.eps_in)
            qkv = linear(h, fl.qkv_w, fl.qkv_b)
            # q and k rotated together: they are adjacent columns of qkv.
            qk = self._rope(qkv[:, : fl.q_size + fl.kv_size].view(t, heads + kv_heads, d), cos, sin)
            v = qkv[:, fl.q_size + fl.kv_size :].view(t, kv_heads, d)
            o = attend(layout, fl.index, qk[:, :heads].transpose(0, 1),
                       qk[:, heads:].transpose(0, 1), v.transpose(0, 1), self.scale)  # fmt: skip
            layout.layers_seen += 1
            x = x + linear(o.transpose(0, 1).reshape(t, heads * d), fl.o_w)
            h = rms_norm(x, fl.norm_post, fl.eps_post)
            gu = linear(h, fl.gate_up_w)
            x = x + linear(silu(gu[:, : fl.inter]) * gu[:, fl.inter :], fl.down_w)
        x = self.norm(x[keep])
        return self.lm_head(x).float()
