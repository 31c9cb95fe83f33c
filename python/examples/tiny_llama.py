"""A small Llama-architecture model in plain PyTorch, seeded random weights,
with attention structure planted in the weights (no downloads).

Architecture: token embedding, per layer RMSNorm -> attention (RoPE, GQA,
no bias except the planted query bias) -> residual -> RMSNorm -> SwiGLU MLP
-> residual; final RMSNorm; LM head. Exactly Llama's data flow.

Why planted structure: with plain random weights every query is nearly
orthogonal to every key, attention is close to uniform, and any sparse
policy looks either perfect or hopeless for reasons that say nothing about
real models. Real long-context models show (and IceCache's synthetic KV
generator, common/synthetic.cc, models) the following; the weights plant
each of them:

* sinks: the first token (BOS) has a key that every query matches (a
  query bias along one low-frequency RoPE direction, and BOS's embedding
  mapped onto it by W_k);
* topic clusters: the prompt is made of topic segments (mean length
  ``segment`` tokens, ``topics`` topics); W_q and W_k read a shared topic
  subspace of the hidden state into the low-frequency RoPE dimensions, so a
  query attends to the context tokens of its own topic, far or near;
* peaked and flat heads: the topic coupling is strong in half of the query
  heads (peaked: a few hundred tokens carry the mass) and weak in the rest
  (flat: mass spread over the whole context, the hard case for any sparse
  policy);
* local heads: a shared constant component in the high-frequency RoPE
  dimensions of q and k makes recent tokens score higher (how RoPE models
  get positional heads).

None of this is tuned to IceCache's selectors: the same weights are used
for full attention and for every policy, and the seeds are fixed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch


@dataclass
class TinyConfig:
    vocab: int = 4096
    d_model: int = 256
    layers: int = 4
    q_heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    ffn: int = 512
    rope_theta: float = 500000.0
    topics: int = 64
    topic_rank: int = 16  # topic subspace dimensions (hidden and head)
    segment: int = 256  # mean topic segment length of the prompt
    peaked_scale: float = 5.5  # topic coupling of peaked heads (logit gap of a same-topic key)
    flat_scale: float = 2.0  # ... and of flat heads
    sink_strength: float = 5.0
    local_strength: float = 1.2
    seed: int = 1234


def mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a @ w.T for 2-D float32 tensors. Debian's torch links the reference
    BLAS (about 1 GFLOP/s here); oneDNN's linear kernel, which it also
    ships, is 10-25x faster, so the example uses it when present."""
    if _MKLDNN and a.dim() == 2 and a.dtype == torch.float32 and a.shape[0] > 1:
        return torch._C._nn.mkldnn_linear(a.contiguous().to_mkldnn(), w.contiguous()).to_dense()
    return a @ w.T


_MKLDNN = torch.backends.mkldnn.is_available() and hasattr(torch._C._nn, "mkldnn_linear")


def rope_tables(cfg: TinyConfig, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    d = cfg.head_dim
    inv = cfg.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions.to(torch.float64)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, d]; cos/sin [T, d] (Hugging Face rotate_half convention)."""
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    return x * cos + rot * sin


def rms_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


class TinyLlama:
    """Weights and forward passes. Keys are kept after RoPE (as engines do)."""

    def __init__(self, cfg: TinyConfig) -> None:
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        d, hd, r = cfg.d_model, cfg.head_dim, cfg.topic_rank

        def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
            return torch.randn(*shape, generator=g) * std

        # Hidden space: [0, r) topic subspace, r = sink direction, rest noise.
        self.topic_centers = randn(cfg.topics, r)
        self.topic_centers *= math.sqrt(r) / self.topic_centers.norm(dim=1, keepdim=True)
        emb = randn(cfg.vocab, d, std=0.5)
        emb[:, r] = 0.0
        per_topic = cfg.vocab // cfg.topics
        for t in range(cfg.topics):
            emb[t * per_topic : (t + 1) * per_topic, :r] += self.topic_centers[t] * 1.5
        emb[0] = 0.0  # BOS: the sink
        emb[0, r] = math.sqrt(d)
        self.embed = emb
        # RoPE pair i is dims (i, i + hd/2), frequency theta^(-2i/hd): the
        # last pairs turn slowest (semantic), the first fastest (positional).
        half = hd // 2
        sink_dim_q = half - 1  # the slowest pair: the sink's score barely moves with distance
        low = [p for i in range(half - 1 - r // 2, half - 1) for p in (i, i + half)]  # r dims
        high = [p for i in range(0, 4) for p in (i, i + half)]
        groups = cfg.q_heads // cfg.kv_heads
        self.layers: List[dict] = []
        for layer in range(cfg.layers):
            wq = randn(cfg.q_heads, hd, d, std=0.3 / math.sqrt(d))
            wk = randn(cfg.kv_heads, hd, d, std=0.3 / math.sqrt(d))
            q_bias = torch.zeros(cfg.q_heads, hd)
            k_bias = torch.zeros(cfg.kv_heads, hd)
            for kh in range(cfg.kv_heads):
                rot = torch.linalg.qr(randn(r, r))[0]
                wk[kh][low, :r] = rot * (1.0 / math.sqrt(r))
                wk[kh][sink_dim_q, r] = 2.0 * cfg.sink_strength / math.sqrt(d)
                k_bias[kh][high] = cfg.local_strength
                for j in range(groups):
                    h = kh * groups + j
                    peaked = (h + layer) % 2 == 0
                    scale = cfg.peaked_scale if peaked else cfg.flat_scale
                    wq[h][low, :r] = rot * (scale * math.sqrt(hd) / r)
                    q_bias[h][sink_dim_q] = cfg.sink_strength
                    q_bias[h][high] = cfg.local_strength * (1.5 if not peaked else 0.5)
            self.layers.append(
                dict(
                    attn_norm=torch.ones(d),
                    mlp_norm=torch.ones(d),
                    wq=wq.reshape(cfg.q_heads * hd, d),
                    wk=wk.reshape(cfg.kv_heads * hd, d),
                    wv=randn(cfg.kv_heads * hd, d, std=1.0 / math.sqrt(d)),
                    wo=randn(d, cfg.q_heads * hd, std=0.7 / math.sqrt(cfg.q_heads * hd)),
                    q_bias=q_bias,
                    k_bias=k_bias,
                    w_gate=randn(cfg.ffn, d, std=1.0 / math.sqrt(d)),
                    w_up=randn(cfg.ffn, d, std=1.0 / math.sqrt(d)),
                    w_down=randn(d, cfg.ffn, std=0.5 / math.sqrt(cfg.ffn)),
                )
            )
        self.final_norm = torch.ones(d)
        self.lm_head = randn(cfg.vocab, d, std=1.0 / math.sqrt(d))

    # -- prompt ------------------------------------------------------------------

    def make_prompt(self, tokens: int, seed: int) -> torch.Tensor:
        """BOS, then topic segments (geometric lengths, uniform topics)."""
        cfg = self.cfg
        g = torch.Generator().manual_seed(seed)
        per_topic = cfg.vocab // cfg.topics
        out = [0]
        while len(out) < tokens:
            topic = int(torch.randint(cfg.topics, (1,), generator=g))
            n = 1 + int(torch.empty(1).exponential_(1.0 / cfg.segment, generator=g))
            ids = topic * per_topic + torch.randint(per_topic, (n,), generator=g)
            ids[ids == 0] = 1
            out.extend(ids.tolist())
        return torch.tensor(out[:tokens])

    # -- forward pieces ----------------------------------------------------------

    def qkv(self, layer: int, x: torch.Tensor, positions: torch.Tensor):
        """x [T, d_model] -> q [q_heads, T, hd], k/v [kv_heads, T, hd] (RoPE'd)."""
        cfg, w = self.cfg, self.layers[layer]
        h = rms_norm(x, w["attn_norm"])
        t = x.shape[0]
        q = mm(h, w["wq"]).reshape(t, cfg.q_heads, cfg.head_dim).transpose(0, 1) + w["q_bias"][:, None]
        k = mm(h, w["wk"]).reshape(t, cfg.kv_heads, cfg.head_dim).transpose(0, 1) + w["k_bias"][:, None]
        v = mm(h, w["wv"]).reshape(t, cfg.kv_heads, cfg.head_dim).transpose(0, 1)
        cos, sin = rope_tables(cfg, positions)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def finish_layer(self, layer: int, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual + output projection + MLP; attn [T, q_heads * hd]."""
        w = self.layers[layer]
        x = x + mm(attn, w["wo"])
        h = rms_norm(x, w["mlp_norm"])
        return x + mm(torch.nn.functional.silu(mm(h, w["w_gate"])) * mm(h, w["w_up"]), w["w_down"])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.final_norm) @ self.lm_head.T

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor, kv_dtype: torch.dtype, chunk: int = 1024):
        """Full causal attention over the prompt, in query chunks. Returns
        (keys, values) [layers, kv_heads, T, hd] in kv_dtype, and the last
        position's hidden state after the final layer."""
        cfg = self.cfg
        t = prompt.shape[0]
        x = self.embed[prompt]
        pos = torch.arange(t)
        keys, values = [], []
        g = cfg.q_heads // cfg.kv_heads
        for layer in range(cfg.layers):
            q, k, v = self.qkv(layer, x, pos)
            k = k.to(kv_dtype).float()
            v = v.to(kv_dtype).float()
            keys.append(k.to(kv_dtype))
            values.append(v.to(kv_dtype))
            out = torch.empty(cfg.q_heads, t, cfg.head_dim)
            vt = v.transpose(1, 2).contiguous()  # [kv_heads, hd, T]
            for s in range(0, t, chunk):
                e = min(t, s + chunk)
                causal = torch.arange(e)[None, :] > torch.arange(s, e)[:, None]
                for h in range(cfg.q_heads):
                    sc = mm(q[h, s:e], k[h // g, :e]) / math.sqrt(cfg.head_dim)
                    sc.masked_fill_(causal, float("-inf"))
                    out[h, s:e] = mm(torch.softmax(sc, -1), vt[h // g, :, :e])
            x = self.finish_layer(layer, x, out.transpose(0, 1).reshape(t, -1))
        return torch.stack(keys), torch.stack(values), x[-1]
