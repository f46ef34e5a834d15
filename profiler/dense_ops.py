"""One decoder layer's dense operators (plus embedding, LM head, sampling) at a model's shapes.

Each op is a zero-argument callable over preallocated weights and inputs, so the timed
region holds the op and nothing else. Names follow Vidur's mlp.csv (see schema.OPERATORS).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from rkvsim.models import ModelSpec

OPS = ("emb", "input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj",
       "post_attention_layernorm", "mlp_up_proj", "mlp_act", "mlp_down_proj", "add",
       "lm_head", "sample")

RMS_EPS = 1e-5
ROPE_THETA = 10000.0


@dataclass
class OpSetup:
    """Tensors an op needs; weights are shared by every token count of the op."""
    model: ModelSpec
    dtype: torch.dtype
    device: str

    def randn(self, *shape: int) -> torch.Tensor:
        # Scaled so activations stay O(1) and no op runs into inf/NaN slow paths.
        return torch.randn(*shape, dtype=self.dtype, device=self.device) * 0.02


def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embedding (rotate-half form, as LLaMA) on q (T,Hq,d) and k (T,Hkv,d)."""
    def rot(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def _rope_tables(n: int, d: int, setup: OpSetup):
    inv = 1.0 / (ROPE_THETA ** (torch.arange(0, d, 2, device=setup.device, dtype=torch.float32) / d))
    ang = torch.outer(torch.arange(n, device=setup.device, dtype=torch.float32), inv)
    emb = torch.cat((ang, ang), dim=-1)
    return emb.cos().to(setup.dtype)[:, None, :], emb.sin().to(setup.dtype)[:, None, :]


def make_op(op: str, num_tokens: int, setup: OpSetup, weights: dict) -> Callable[[], object]:
    """The callable timing `op` at `num_tokens` tokens; `weights` caches the op's weights."""
    m, t = setup.model, num_tokens
    h, inter = m.hidden_size, m.intermediate_size

    def weight(name: str, *shape: int) -> torch.Tensor:
        if name not in weights:
            weights[name] = setup.randn(*shape)
        return weights[name]

    if op == "emb":
        table = weight("emb", m.vocab_size, h)
        ids = torch.randint(0, m.vocab_size, (t,), device=setup.device)
        return lambda: F.embedding(ids, table)
    if op in ("input_layernorm", "post_attention_layernorm"):
        w = torch.ones(h, dtype=setup.dtype, device=setup.device)
        x = setup.randn(t, h)
        return lambda: F.rms_norm(x, (h,), w, RMS_EPS)
    if op == "attn_pre_proj":
        w = weight("qkv", m.q_size + 2 * m.kv_size, h)
        x = setup.randn(t, h)
        return lambda: F.linear(x, w)
    if op == "attn_rope":
        q, k = setup.randn(t, m.num_heads, m.head_dim), setup.randn(t, m.num_kv_heads, m.head_dim)
        cos, sin = _rope_tables(t, m.head_dim, setup)
        return lambda: _rope(q, k, cos, sin)
    if op == "attn_post_proj":
        w = weight("o", h, m.q_size)
        x = setup.randn(t, m.q_size)
        return lambda: F.linear(x, w)
    if op == "mlp_up_proj":
        # Gate and up fused into one GEMM, as Vidur times it (and engines run it).
        w = weight("gate_up", (2 if m.gated_mlp else 1) * inter, h)
        x = setup.randn(t, h)
        return lambda: F.linear(x, w)
    if op == "mlp_act":
        if m.gated_mlp:
            gu = setup.randn(t, 2 * inter)
            return lambda: F.silu(gu[:, :inter]) * gu[:, inter:]
        x = setup.randn(t, inter)
        return lambda: F.silu(x)
    if op == "mlp_down_proj":
        w = weight("down", h, inter)
        x = setup.randn(t, inter)
        return lambda: F.linear(x, w)
    if op == "add":
        a, b = setup.randn(t, h), setup.randn(t, h)
        return lambda: a + b
    if op == "lm_head":
        w = weight("lm_head", m.vocab_size, h)
        x = setup.randn(t, h)
        return lambda: F.linear(x, w)
    if op == "sample":
        # Temperature sampling from full-vocabulary logits: softmax then one draw per row.
        logits = setup.randn(t, m.vocab_size) * 50
        return lambda: torch.multinomial(torch.softmax(logits.float(), dim=-1), 1)
    raise ValueError(f"unknown dense op {op!r}; known: {', '.join(OPS)}")


class WeightSlot:
    """Weights of the op being timed only: switching op frees the previous op's (LLaMA-7B's
    embedding and LM head are 0.5 GB each in fp32)."""

    def __init__(self):
        self.op: str | None = None
        self.weights: dict = {}

    def for_op(self, op: str) -> dict:
        if op != self.op:
            self.op, self.weights = op, {}
        return self.weights


def dense_tasks(model: ModelSpec, grid, ctx) -> list:
    from rkvsim.profiler.schema import OPERATORS
    from rkvsim.profiler.tasks import Task, timed

    setup = OpSetup(model, ctx.dtype, ctx.device)
    slot = WeightSlot()
    base = {"method": "all", "tp": 1, "hidden": model.hidden_size, "intermediate": model.intermediate_size,
            "num_q_heads": model.num_heads, "num_kv_heads": model.num_kv_heads, "head_dim": model.head_dim,
            "vocab": model.vocab_size, "dtype": ctx.dtype_name, "source": "rkvprof-collect"}
    tasks = []
    for op in OPS:
        for t in grid.dense_tokens:
            run = (lambda op=op, t=t: timed(make_op(op, t, setup, slot.for_op(op)), ctx))
            tasks.append(Task(OPERATORS, {**base, "op": op, "num_tokens": t}, run, f"{op} tokens={t}"))
    return tasks
