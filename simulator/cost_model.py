"""Step cost: seconds one engine iteration takes on one replica, TP communication included.

The simulator calls `CostModel.step_time(batch)` once per iteration (about 10^6 times per
run), so `RooflineCostModel` reduces a batch to a few sums with numpy and evaluates the
roofline on those sums; the dense layers depend only on (tokens, logits) and are memoised.

Roofline prior, per operator and layer:
    t = max(tensor_flops / (F * compute) + vector_flops / (F * vector_ratio * compute),
            bytes / (B * memory)) + kernels * launch
summed over operators and layers, plus TP all-reduces and a per-step CPU overhead.
All efficiencies are stated in roofline.RooflineEfficiency; nothing is fitted, so every
result carries source = "roofline-prior (uncalibrated)".

Notation below: L layers, h hidden, d head dim, Hq / Hkv query / KV heads per TP rank,
full = 2*d*dtype bytes (K+V of one token, one head, full precision), G group size,
f = efficiency.dequant_roundtrip, T = new tokens in the step (prefill chunk tokens + one
per decoding request).

Operators (per layer unless marked; weights / tp, read once per step):
  rmsnorm x2, qkv_proj, rope, o_proj, mlp_gate_up, mlp_act, mlp_down   over T tokens
                (MoE: the MLP over T*k expert-tokens, reading the weights of the experts touched)
  embedding, final norm (per step, T tokens); lm_head + sampling (per step, on the tokens
  that produce logits: one per decoding request and per chunk that finishes its prompt)
  attn_prefill  flops 4*n*(past_cached + n/2)*d*Hq per chunk; bytes: the past KV as stored
                (quantized: the fused share read compressed, the unfused share f read as
                fp16), q/k/v in, out, new KV written
  attn_decode   flops 4*cached*d*Hq per request; bytes: models.kv_bytes of the request
                (without H2O's scores), same fused/unfused split, q in, out, new K/V written
  kv_quantize   (KIVI, GEAR) tokens leaving the residual window: read fp16, write packed;
                decode: one token per request per step (amortised G tokens every G steps)
  kv_dequant    (KIVI, GEAR) unfused share f: read stored, write fp16 (the inefficiency term)
  gear_lowrank  2*n*r*d per head for K and V over every quantized segment, every step
  gear_outliers scatter of the sparse outliers (a DRAM sector each for the unfused share)
  gear_fit      at quantization events: error matrix materialised, power-iteration SVD,
                top-k outliers
  h2o_scores    prefill: extra QK^T pass writing + reading the Hq*n*(past+n) fp32 matrix;
                decode: probabilities written + read, scores accumulated, one eviction
  h2o_evict     at prompt end: top-k over the prompt's scores, compaction
  snapkv_vote   at prompt end (prompt > budget): window x prompt scores, pool, top-k, compaction
  allreduce     (tp > 1) 2 per layer of T*h*dtype bytes: the host's measured curve where Vidur's network
                tables cover it (calibration/steps/comm.py), else ring: 2(tp-1)/tp*bytes/link + 2(tp-1)*lat
                over the slowest hop (PCIe once the ring leaves the NVLink domain)
  step_overhead per step, plus per sequence (CPU side)
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import numpy as np

from rkvsim.models import HardwareSpec, Method, ModelSpec

from rkvsim.simulator.lookup import by_size
from rkvsim.simulator.roofline import Roofline, RooflineEfficiency, default_efficiency, ring_allreduce_s

ROOFLINE_SOURCE = "roofline-prior (uncalibrated)"


@dataclass
class StepBatch:
    """One engine iteration on one replica. All arrays int64; decode_ctx >= decode_prompt."""
    prefill_new: np.ndarray     # new tokens of each prefill chunk in this step
    prefill_past: np.ndarray    # tokens already in that request's context before the chunk
    decode_ctx: np.ndarray      # context length (tokens seen so far) of each decoding request
    decode_prompt: np.ndarray   # prompt length of each decoding request
    # Optional: True where the chunk finishes its prompt (it produces a logit; SnapKV votes and
    # H2O evicts there). None = every chunk finishes its prompt (exact without chunked prefill).
    prefill_done: np.ndarray | None = None
    # Optional: the sequence (llama.cpp server slot) of each decode and prefill entry. An engine
    # that batches per sequence (simulator/ubatch.py) costs a step by how its slots line up.
    decode_seq: np.ndarray | None = None
    prefill_seq: np.ndarray | None = None


@dataclass(frozen=True)
class StepOverheads:
    """What an engine adds to a step beyond its kernels, by policy (simulator/policies.py).
    graphs: "none" (every kernel launched, the prior's launch cost each), "decode" (decode-only
    steps replay a CUDA graph: no per-kernel launch; LMDeploy), "decode+piecewise" (vLLM V1's
    FULL_AND_PIECEWISE: decode-only steps fully graphed, mixed steps with the dense layers graphed
    and attention launched), for steps of at most `capture_tokens` tokens (larger ones run eager).
    cpu: (fixed s, s per sequence) per step, or None for the prior's constants."""
    graphs: str = "none"
    capture_tokens: int = 512
    cpu: tuple[float, float] | None = None
    cpu_source: str = "prior"
    cpu_trust: object = None    # calibration.steps.trust.Trust of the measured CPU line (None: the prior's)

    def trust(self) -> list:
        return [self.cpu_trust] if self.cpu_trust is not None else []

    def label(self) -> str:
        return f"graphs:{self.graphs} cpu:{self.cpu_source}"


@runtime_checkable
class CostModel(Protocol):
    source: str

    def step_time(self, batch: StepBatch) -> float: ...

    def breakdown(self, batch: StepBatch) -> dict[str, float]: ...


class RooflineCostModel:
    """Uncalibrated step cost from datasheet peaks. See the module docstring for the formula."""

    source = ROOFLINE_SOURCE

    def __init__(self, model: ModelSpec, hw: HardwareSpec, method: Method, tp: int = 1,
                 efficiency: RooflineEfficiency | None = None, overheads: StepOverheads | None = None,
                 comm=None):
        if tp < 1:
            raise ValueError("tp must be >= 1")
        self.model, self.hw, self.method, self.tp = model, hw, method, tp
        eff = efficiency or default_efficiency(hw)
        self.overheads = ov = overheads or StepOverheads()
        if ov.cpu is not None:
            eff = replace(eff, step_overhead_s=ov.cpu[0], per_seq_overhead_s=ov.cpu[1])
        self.eff = eff
        self.rl = Roofline(hw, eff)
        # Under CUDA graphs a graphed kernel costs no launch of its own.
        self.rl_graph = Roofline(hw, replace(eff, launch_s=0.0)) if ov.graphs != "none" else self.rl
        if overheads is not None:
            self.source = f"{ROOFLINE_SOURCE}; {ov.label()}"
        m = model
        self.L, self.h, self.d = m.num_layers, m.hidden_size, m.head_dim
        self.dt = m.weight_dtype_bytes
        self.hq = max(1, m.num_heads // tp)
        self.hkv = max(1, m.num_kv_heads // tp)     # as models.kv_bytes splits KV heads
        self.full = 2 * self.d * self.dt
        # What the method adds to a step comes from its spec (models/method_specs/), by trait.
        self.spec = spec = method.spec
        self.quantized = spec.quantized_tokens is not None
        self.gear = spec.corrections             # low-rank + outlier error correction (GEAR)
        self.f = eff.dequant_roundtrip if self.quantized and not spec.fused_dequant else 0.0
        self.dequant_flops = eff.dequant_flops if spec.dequant_flops is None else spec.dequant_flops
        self.quant_flops = eff.quant_flops if spec.quant_flops is None else spec.quant_flops
        if self.quantized:
            self.qpt = spec.quant_bytes_per_token(method, self.d, self.dt)
        if self.gear is not None:
            g = np.array([method.group_size], np.int64)
            self.seg_g = float(self.gear.segment_bytes(method, g, self.d, self.dt)[0])
            self.rank_g = int(self.gear.rank(method, g, self.d)[0])
            self.out_g = 2 * int(self.gear.outliers(method, g, self.d)[0])
        # Measured all-reduce curve for this host and TP degree (calibration.steps.comm.lookup), else
        # the ring formula over the slowest hop of the hardware's topology.
        self.comm = comm if tp > 1 else None
        self._comm_cache: dict[int, float] = {}
        ring = f"ring-formula({hw.interconnect}{'+pcie' if hw.crosses_pcie(tp) else ''})"
        self.cost_parts = {"dense": "roofline-prior", "attention": "roofline-prior",
                           "comm": "none (tp 1)" if tp == 1 else (comm[2] if comm else ring),
                           "cpu": self.overheads.cpu_source}
        from rkvsim.calibration.steps.trust import prior_trust, roofline_attention_trust
        self.cost_trust = [prior_trust(), roofline_attention_trust(), *self.overheads.trust()]
        self._dense_cache: dict[int, tuple[float, tuple[float, ...]]] = {}
        self._base_by_size = by_size(self._decode_base)
        self._head_cache: dict[int, tuple[float, float]] = {}
        self._build_tables(min(max(m.max_position, 4096), 32768) + 1)   # grows on demand

    # ---- public API -------------------------------------------------------------------
    def step_time(self, batch: StepBatch) -> float:
        nd = len(batch.decode_ctx)
        npf = len(batch.prefill_new)
        if nd == 0 and npf == 0:
            return 0.0
        if npf == 0:
            return self.decode_step(batch.decode_ctx, batch.decode_prompt)
        t_new = int(batch.prefill_new.sum()) + nd if npf else nd
        n_done = self._n_done(batch) if npf else 0
        g_dense, g_attn = self._graphed(t_new, npf)
        total = self._dense(t_new, g_dense)[0] + sum(self._head(nd + n_done))
        total += self._comm(t_new) + self._overhead(nd + npf)
        for _, t in self._method_terms(batch, nd, npf, g_attn):
            total += t
        return total

    def decode_step(self, ctx: np.ndarray, prompt: np.ndarray) -> float:
        """step_time of a decode-only step (decode contexts `ctx`, prompts `prompt`; not empty):
        the same expression decode_run evaluates over many steps at once."""
        return self._decode_only(len(ctx), *self._decode_sums(ctx, prompt))

    def decode_run(self, ctx: np.ndarray, prompt: np.ndarray, rem: np.ndarray, k: int) -> np.ndarray | None:
        """Seconds of k decode-only steps of a fixed batch, one per step: at step j (1..k) the
        requests with rem >= j decode at context ctx + j (simulator/decode_run.py). Equal bit
        for bit to step_time of each step's batch: the cache sums are exact integer sums and
        the per-step expression is _decode_only, evaluated on arrays. None where the tables
        are not integer-valued (an unusual group size): the caller then steps one by one."""
        if not self._int_ok:
            return None
        top = int(ctx.max()) + k + 1
        if top > len(self._pre):
            self._build_tables(max(2 * len(self._pre), top))
        nd, sums = _run_sums(self._dec_ci, self._dec_pi, ctx, prompt, rem, k)
        return self._decode_only(nd, *sums)

    def _decode_only(self, nd, s0, s1, s2, s3, s4, s5):
        """One decode-only step from its batch size and cache sums (module docstring): Python
        numbers for one step, or numpy arrays over steps; the operations and their order are
        the same either way, so both give the same floats."""
        arr = isinstance(s0, np.ndarray)
        op = self._op_v if arr else None
        if arr:
            g = nd <= self.overheads.capture_tokens if self.overheads.graphs != "none" else np.zeros(len(nd), bool)
            base = self._base_by_size(nd)
        else:
            g = self._graphed(nd, 0)[1]
            base = self._decode_base(nd)
        L, d, hq, hkv, full, dt = self.L, self.d, self.hq, self.hkv, self.full, self.dt
        eff, f, meth, spec = self.eff, self.f, self.method, self.spec
        dqf, qf = self.dequant_flops, self.quant_flops

        if arr and g.any() and not g.all():
            def run_op(flops, vfl, nbytes, kernels=1.0):
                return np.where(g, op(self.rl_graph, flops, vfl, nbytes, kernels), op(self.rl, flops, vfl, nbytes, kernels))
        elif arr:
            rl_a = self.rl_graph if g[0] else self.rl

            def run_op(flops, vfl, nbytes, kernels=1.0):
                return op(rl_a, flops, vfl, nbytes, kernels)
        else:
            run_op = (self.rl_graph if g else self.rl).op

        total = base
        stored = hkv * (s1 * full + (1 - f) * s3 + f * s2 * full)
        io = nd * (2 * hq * d * dt + hkv * full)
        vfl = hq * s0 * eff.softmax_flops + (1 - f) * hkv * 2 * d * s2 * dqf
        total = total + L * run_op(4 * s0 * d * hq, vfl, stored + io)
        if spec.attention_scores:
            c = s0
            total = total + L * run_op(0, hq * c + eff.topk_flops * hkv * c, 2 * 4 * hq * c + 2 * spec.score_bytes * hkv * c, 2)
        if self.quantized:
            qt = 0.0 + nd
            qk = 0.0
            if spec.quantize_launches:
                qk = 0.0 + (np.minimum(1.0, nd / meth.group_size) if arr else min(1.0, nd / meth.group_size))
            total = total + L * run_op(0, hkv * qt * 2 * d * qf, hkv * qt * (full + self.qpt), qk)
            deq = 0.0 + s2
            if f > 0:
                t = L * run_op(0, f * hkv * 2 * d * deq * dqf, f * hkv * ((0.0 + s3) + deq * full), 1)
                total = total + (np.where(deq != 0, t, 0.0) if arr else (t if deq else 0.0))
            if self.gear is not None:
                lowrank, outl = 0.0 + s4, 0.0 + s5
                t1 = L * run_op(0, 2 * 2 * d * hkv * lowrank, 0, 1)
                t2 = L * run_op(0, 2 * hkv * outl, f * hkv * outl * eff.sector_bytes, 1)
                if arr:
                    total = total + np.where(deq != 0, t1, 0.0)
                    total = total + np.where(deq != 0, t2, 0.0)
                elif deq:
                    total = total + t1
                    total = total + t2
                gw = 0.0 + nd * self.rank_g
                gb = 0.0 + nd * self.seg_g / meth.group_size
                it = eff.gear_power_iters
                total = total + L * run_op(
                    0, hkv * (2 * it * 4 * d * gw + 2 * qt * d * eff.topk_flops),
                    hkv * (qt * full * (2 + 2 * it) + gb), qk * (2 + 2 * it))
        return total

    def _decode_base(self, nd: int) -> float:
        """Dense layers, LM head, all-reduce and CPU time of a decode-only step of nd requests."""
        g_dense = self._graphed(nd, 0)[0]
        return self._dense(nd, g_dense)[0] + sum(self._head(nd)) + (self._comm(nd) + self._overhead(nd))

    @staticmethod
    def _op_v(rl: Roofline, flops, vflops, nbytes, kernels=1.0):
        c = flops * rl.inv_f + vflops * rl.inv_fv
        m = nbytes * rl.inv_b
        return np.where(c > m, c, m) + kernels * rl.launch

    def breakdown(self, batch: StepBatch) -> dict[str, float]:
        """Same total as step_time, split by operator (seconds over all layers)."""
        nd, npf = len(batch.decode_ctx), len(batch.prefill_new)
        if nd == 0 and npf == 0:
            return {}
        t_new = int(batch.prefill_new.sum()) + nd
        n_done = self._n_done(batch) if npf else 0
        g_dense, g_attn = self._graphed(t_new, npf)
        out = dict(zip(_DENSE_OPS, self._dense(t_new, g_dense)[1]))
        out.update(zip(("lm_head", "sampling"), self._head(nd + n_done)))
        out["allreduce"] = self._comm(t_new)
        for name, t in self._method_terms(batch, nd, npf, g_attn):
            out[name] = out.get(name, 0.0) + t
        out["step_overhead"] = self._overhead(nd + npf)
        return out

    # ---- dense part: depends only on the token count ----------------------------------
    def _graphed(self, t_new: int, npf: int) -> tuple[bool, bool]:
        """(dense layers graphed, attention and method kernels graphed) for a step of t_new tokens."""
        g = self.overheads.graphs
        if g == "none" or t_new > self.overheads.capture_tokens:
            return False, False
        if npf == 0:
            return True, True
        return g == "decode+piecewise", False

    def _dense(self, t: int, graphed: bool = False) -> tuple[float, tuple[float, ...]]:
        key = -t - 1 if graphed else t
        hit = self._dense_cache.get(key)
        if hit is not None:
            return hit
        if len(self._dense_cache) > 65536:   # bounded memo; T takes few distinct values anyway
            self._dense_cache.clear()
        m, op, L, h, dt = self.model, (self.rl_graph if graphed else self.rl).op, self.L, self.h, self.dt
        qs, kvs = self.hq * self.d, self.hkv * self.d
        inter = m.intermediate_size // self.tp
        up = 2 * inter if m.gated_mlp else inter
        # Weights are read once per step (bytes / tp); activations read + written per token.
        # Norms: residual add fused (read x and residual, write both), weights replicated.
        norm = op(0, 5 * t * h, 4 * t * h * dt + h * dt)          # one of the two per layer
        qkv = op(2 * t * h * (qs + 2 * kvs), 0, dt * (h * (qs + 2 * kvs) + t * h + t * (qs + 2 * kvs)))
        rope = op(0, 3 * t * (qs + kvs), dt * (2 * t * (qs + kvs) + t * self.d))  # + cos/sin rows
        oproj = op(2 * t * qs * h, 0, dt * (qs * h + t * qs + t * h))
        # MoE: each token runs k experts (FLOPs and activations x k); the weights read are those of
        # the experts the step's tokens touch (models.ModelSpec.experts_touched), plus the router.
        tk = t * max(1, m.experts_per_token)
        ex = float(m.experts_touched(t)) if m.is_moe else 1.0
        gate_up = op(2 * tk * h * up + 2 * t * h * m.num_experts, 0,
                     dt * (ex * h * up + t * h + tk * up + h * m.num_experts))
        act = op(0, 5 * tk * inter, dt * (tk * up + tk * inter))    # SiLU(gate) * up, or the plain activation
        down = op(2 * tk * inter * h, 0, dt * (ex * inter * h + tk * inter + t * h))
        # A parallel block (Phi, GPT-J) normalises once and sums attention, MLP and residual in one pass.
        norms = norm + op(0, 2 * t * h, 4 * t * h * dt) if m.parallel_block else 2 * norm
        per_layer = (norms, qkv, rope, oproj, gate_up, act, down)
        embed = op(0, 0, 2 * t * h * dt)                        # row gather + write
        final_norm = op(0, 5 * t * h, 2 * t * h * dt + h * dt)
        parts = (embed, L * per_layer[0] + final_norm) + tuple(L * x for x in per_layer[1:])
        res = (sum(parts), parts)
        self._dense_cache[key] = res
        return res

    def _head(self, n_logits: int) -> tuple[float, float]:
        """LM head (vocab split over TP) on the tokens that produce logits, and sampling."""
        hit = self._head_cache.get(n_logits)
        if hit is not None:
            return hit
        h, dt, op = self.h, self.dt, self.rl.op
        v = self.model.vocab_size // self.tp
        n = n_logits
        lm = op(2 * n * h * v, 0, dt * (h * v + n * h) + 4 * n * v)   # fp32 logits out
        sample = op(0, 5 * n * v, 4 * n * v) if n else 0.0              # softmax/top-p over the vocab
        res = (lm, sample)
        self._head_cache[n_logits] = res
        return res

    def _comm(self, t: int) -> float:
        # Megatron TP: all-reduce after attention's output projection and after the MLP.
        if self.tp == 1:
            return 0.0
        if self.comm is None:
            return 2 * self.L * ring_allreduce_s(t * self.h * self.dt, self.tp, self.hw)
        hit = self._comm_cache.get(t)
        if hit is None:
            from rkvsim.calibration.steps.comm import curve_time
            hit = self._comm_cache[t] = 2 * self.L * curve_time(self.comm, t * self.h * self.dt)
        return hit

    def _overhead(self, n_seqs: int) -> float:
        return self.eff.step_overhead_s + self.eff.per_seq_overhead_s * n_seqs

    @staticmethod
    def _n_done(batch: StepBatch) -> int:
        if batch.prefill_done is None:
            return len(batch.prefill_new)
        return int(np.count_nonzero(batch.prefill_done))

    # ---- KV caches: per-length lookup tables -----------------------------------------
    # Every per-request cache quantity the cost needs is A[ctx] + B[prompt] (GEAR's prefill
    # segment and SnapKV's prompt budget are the only prompt-dependent parts), so a batch
    # reduces to one gather and one matrix-vector product: exact, and ~3 us at batch 256.
    # Columns, per KV head and layer: tokens attended, tokens in full precision, tokens
    # quantized, quantized bytes (payload + scales + GEAR factors/outliers), GEAR low-rank
    # work (sum of tokens * rank over segments), GEAR outliers (K and V).
    _NCOL = 6

    def _build_tables(self, n: int) -> None:
        meth, spec, d, dt = self.method, self.spec, self.d, self.dt
        x = np.arange(n, dtype=np.int64)
        if self.model.sliding_window:
            # The model attends (and keeps) only its last `sliding_window` tokens (Mistral v0.1).
            x = np.minimum(x, self.model.sliding_window)
        dec_c = np.zeros((n, self._NCOL))
        dec_p = None
        pre = np.zeros((n, self._NCOL))     # a prefill chunk's past, by past length
        if self.quantized:
            nq = spec.quantized_tokens(meth, x)
            for tab in (dec_c, pre):
                tab[:, 0], tab[:, 1], tab[:, 2], tab[:, 3] = x, x - nq, nq, nq * self.qpt
            if self.gear is not None:
                g = meth.group_size
                cor = self.gear
                # Decode: a prefill segment of nq(prompt) tokens, then (nq(ctx)-nq(prompt))/G
                # segments of G tokens (models.kv_bytes.gear_segments), split into ctx and
                # prompt parts. In prefill the past is one segment.
                seg = cor.segment_bytes(meth, nq, d, dt)
                rank_work = nq * cor.rank(meth, nq, d)
                outl = 2 * cor.outliers(meth, nq, d)
                dec_c[:, 3] += nq / g * self.seg_g
                dec_c[:, 4] = nq * self.rank_g
                dec_c[:, 5] = nq / g * self.out_g
                dec_p = np.zeros((n, self._NCOL))
                dec_p[:, 3] = seg - nq / g * self.seg_g
                dec_p[:, 4] = rank_work - nq * self.rank_g
                dec_p[:, 5] = outl - nq / g * self.out_g
                pre[:, 3] += seg
                pre[:, 4] = rank_work
                pre[:, 5] = outl
        else:
            cap = meth.token_cap
            kept = np.minimum(x, cap) if cap is not None else x
            dec_c[:, 0] = dec_c[:, 1] = kept
            # In prefill H2O and SnapKV still hold the whole prompt (they evict when it ends);
            # StreamingLLM's window applies from the start.
            pre[:, 0] = pre[:, 1] = kept if spec.cap_in_prefill else x
            budget = spec.prompt_budget(meth) if spec.prompt_budget else None
            if budget is not None:
                dec_c[:, 0] = dec_c[:, 1] = x
                dec_p = np.zeros((n, self._NCOL))
                dec_p[:, 0] = dec_p[:, 1] = np.minimum(x, budget) - x
        self._dec_c, self._dec_p, self._pre = dec_c, dec_p, pre
        # decode_run sums these exactly as integers; every column is integer-valued for the
        # shipped methods (a quantized count is whole groups; bytes per token are whole).
        self._int_ok = all(t is None or bool(np.all(t == np.round(t))) for t in (dec_c, dec_p)) and \
            float(np.abs(dec_c).max(initial=0)) * 65536 < 2.0 ** 53
        if self._int_ok:
            self._dec_ci, self._dec_pi = _int_columns(dec_c), _int_columns(dec_p)
        self._nq_tab = np.ascontiguousarray(pre[:, 2])
        self._ones = np.ones(1024)

    def _rows(self, table: str, idx: np.ndarray) -> np.ndarray:
        """getattr(self, table)[idx]; grows the tables (doubling) the first time a length
        beyond them shows up (IndexError costs nothing until it happens)."""
        try:
            return getattr(self, table).take(idx, 0)
        except IndexError:
            self._build_tables(max(2 * len(self._pre), int(idx.max()) + 1))
            return getattr(self, table).take(idx, 0)

    def _colsum(self, rows: np.ndarray, weights: np.ndarray | None = None) -> list[float]:
        # A matrix-vector product is several times faster than rows.sum(axis=0) here.
        if weights is None:
            n = len(rows)
            if n > len(self._ones):
                self._ones = np.ones(2 * n)
            weights = self._ones[:n]
        return (weights @ rows).tolist()

    def _decode_sums(self, ctx: np.ndarray, prompt: np.ndarray) -> list[float]:
        rows = self._rows("_dec_c", ctx)
        if self._dec_p is not None:
            rows += self._rows("_dec_p", prompt)
        return self._colsum(rows)

    def kv_bytes_sum(self, prompt: np.ndarray, ctx: np.ndarray) -> float:
        """Sum over requests of models.kv_bytes(model, method, prompt, ctx, tp): the exposed
        check that the tables reproduce the single source of truth."""
        s = self._decode_sums(np.asarray(ctx, np.int64), np.asarray(prompt, np.int64))
        score = self.spec.score_bytes * s[0] if self.spec.score_bytes else 0.0
        return self.L * self.hkv * (s[1] * self.full + s[3] + score)

    # ---- attention and compression-side work ------------------------------------------
    def _method_terms(self, b: StepBatch, nd: int, npf: int, graphed: bool = False) -> list[tuple[str, float]]:
        """(operator, seconds over all layers) for attention and the method's extra work.
        Cache sums s: [attended, full-precision, quantized tokens, quantized bytes,
        GEAR low-rank work, GEAR outliers], per KV head and layer, summed over requests."""
        op, L, d, hq, hkv, full, dt = (self.rl_graph if graphed else self.rl).op, self.L, self.d, self.hq, self.hkv, self.full, self.dt
        eff, f, meth, spec = self.eff, self.f, self.method, self.spec
        dqf, qf = self.dequant_flops, self.quant_flops
        terms: list[tuple[str, float]] = []
        deq_tokens = deq_bytes = lowrank = outl = 0.0   # quantized KV attended this step
        quant_tokens = quant_kernels = 0.0              # tokens quantized this step
        gear_work = gear_bytes = 0.0                    # GEAR fits: sum n_s * rank, factor bytes

        if npf:
            new, past = b.prefill_new, b.prefill_past
            newf = new.astype(np.float64)
            # One weighted and one plain gather: sum(new * past_cached) and the plain sums.
            rows = self._rows("_pre", past)
            w, s = self._colsum(rows, newf), self._colsum(rows)
            s_new, nn = float(newf.sum()), float(newf @ newf)
            # Causal chunk over its cached past + itself: past + n/2 keys per query on average.
            area = w[0] + 0.5 * nn
            stored = hkv * (s[1] * full + (1 - f) * s[3] + f * s[2] * full)
            io = s_new * (2 * hq * d * dt + 2 * hkv * d * dt + hkv * full)   # q,k,v in; out; cache write
            vfl = hq * area * eff.softmax_flops + (1 - f) * hkv * 2 * d * s[2] * dqf
            terms.append(("attn_prefill", L * op(4 * area * d * hq, vfl, stored + io)))
            deq_tokens, deq_bytes, lowrank, outl = s[2], s[3], s[4], s[5]
            if self.quantized:
                # Quantize what the chunk pushes out of the residual window (a prompt: at once).
                try:
                    newly = self._nq_tab.take(past + new) - self._nq_tab.take(past)
                except IndexError:
                    self._build_tables(max(2 * len(self._pre), int((past + new).max()) + 1))
                    newly = self._nq_tab.take(past + new) - self._nq_tab.take(past)
                quant_tokens += float(newly.sum())
                quant_kernels += 1 if spec.quantize_launches else 0
                if self.gear is not None:
                    ni = newly.astype(np.int64)
                    gear_work += float((ni * self.gear.rank(meth, ni, d)).sum())
                    gear_bytes += float(self.gear.segment_bytes(meth, ni, d, dt).sum())
            if spec.attention_scores or spec.prompt_vote:
                done = past + new if b.prefill_done is None else (past + new)[b.prefill_done.astype(bool)]
                terms += self._prefill_eviction(newf, past, s_new, nn, done)

        if nd:
            s = self._decode_sums(b.decode_ctx, b.decode_prompt)
            stored = hkv * (s[1] * full + (1 - f) * s[3] + f * s[2] * full)
            io = nd * (2 * hq * d * dt + hkv * full)            # q in, out, the new token's K/V written
            vfl = hq * s[0] * eff.softmax_flops + (1 - f) * hkv * 2 * d * s[2] * dqf
            terms.append(("attn_decode", L * op(4 * s[0] * d * hq, vfl, stored + io)))
            deq_tokens += s[2]
            deq_bytes += s[3]
            lowrank += s[4]
            outl += s[5]
            if self.quantized:
                # Every G steps a request quantizes G tokens: amortised, one token per request
                # per step; across a batch some request does so nearly every step.
                quant_tokens += nd
                if spec.quantize_launches:
                    quant_kernels += min(1.0, nd / meth.group_size)
                if self.gear is not None:
                    gear_work += nd * self.rank_g
                    gear_bytes += nd * self.seg_g / meth.group_size
            if spec.attention_scores:
                # Attention must also emit its fp32 probabilities (written, read back), which
                # are added to the accumulated scores; then the lowest-score token is evicted.
                c = s[0]
                terms.append(("h2o_scores", L * op(
                    0, hq * c + eff.topk_flops * hkv * c, 2 * 4 * hq * c + 2 * spec.score_bytes * hkv * c, 2)))

        if self.quantized:
            if quant_tokens:
                # Read the fp16 tokens, write payload + scales.
                terms.append(("kv_quantize", L * op(
                    0, hkv * quant_tokens * 2 * d * qf,
                    hkv * quant_tokens * (full + self.qpt), quant_kernels)))
            if deq_tokens and f > 0:
                # Unfused share f: a dequantize kernel reads that share of the stored KV and
                # writes it as fp16, which attention reads back (counted in attn_*'s bytes).
                # The explicit inefficiency term; see RooflineEfficiency.dequant_roundtrip.
                terms.append(("kv_dequant", L * op(
                    0, f * hkv * 2 * d * deq_tokens * dqf,
                    f * hkv * (deq_bytes + deq_tokens * full), 1)))
            if self.gear is not None:
                if deq_tokens:
                    # Low-rank reconstruction 2*n*r*d per head for K and V (its factors' bytes
                    # are read with the cache). Outliers are scattered back into the dequantized
                    # KV: on chip for the fused share, into the DRAM buffer for the unfused share
                    # f, where each scattered write costs a whole sector.
                    terms.append(("gear_lowrank", L * op(0, 2 * 2 * d * hkv * lowrank, 0, 1)))
                    terms.append(("gear_outliers", L * op(
                        0, 2 * hkv * outl, f * hkv * outl * eff.sector_bytes, 1)))
                if quant_tokens:
                    # At quantization events: the error E = X - deq(quant(X)) is materialised
                    # (written, read for outlier selection, read twice per power iteration),
                    # rank-r power iterations (4*n*d*r each, K and V), top-k outliers, factors out.
                    it = eff.gear_power_iters
                    terms.append(("gear_fit", L * op(
                        0, hkv * (2 * it * 4 * d * gear_work + 2 * quant_tokens * d * eff.topk_flops),
                        hkv * (quant_tokens * full * (2 + 2 * it) + gear_bytes),
                        quant_kernels * (2 + 2 * it))))
        return terms

    def _prefill_eviction(self, newf: np.ndarray, past: np.ndarray, s_new: float, nn: float,
                          done: np.ndarray) -> list[tuple[str, float]]:
        """H2O's score pass on every chunk and eviction at prompt end; SnapKV's vote at prompt end."""
        op, L, d, hq, hkv, full, dt = self.rl.op, self.L, self.d, self.hq, self.hkv, self.full, self.dt
        eff, meth, spec = self.eff, self.method, self.spec
        terms = []
        if spec.attention_scores:
            # No fused kernel returns probabilities: an extra QK^T pass writes the whole
            # (masked) Hq x n x (past+n) fp32 matrix; softmax and a column sum read it back.
            rect = float(newf @ past) + nn
            terms.append(("h2o_scores", L * op(
                2 * d * hq * rect, hq * rect * (eff.softmax_flops + 1),
                2 * 4 * hq * rect + spec.score_bytes * hkv * (float(past.sum()) + s_new), 3)))
            if len(done):
                # Top-k over the prompt's scores, then compact the kept KV.
                s_p = float(done.sum())
                kept = float(np.minimum(done, meth.token_cap).sum())
                terms.append(("h2o_evict", L * op(
                    0, eff.topk_flops * hkv * s_p, spec.score_bytes * hkv * s_p + 2 * hkv * full * kept, 2)))
        elif spec.prompt_vote and len(done):
            # SnapKV, once per request at its last chunk: the window's queries score the prompt's
            # keys, scores are summed over the window and max-pooled, top-k kept, cache compacted.
            # Skipped when the prompt already fits the budget (as SnapKV does).
            budget = spec.prompt_budget(meth)
            p = done[done > budget]
            if len(p):
                s_p, w = float(p.sum()), meth.window
                terms.append(("snapkv_vote", L * op(
                    2 * w * s_p * d * hq,
                    hq * s_p * (w * (eff.softmax_flops + 1) + meth.kernel) + eff.topk_flops * hkv * s_p,
                    hkv * s_p * d * dt + 2 * 4 * w * hq * s_p + 2 * hkv * full * budget * len(p), 5)))
        return terms


def _int_columns(tab: np.ndarray | None) -> list[np.ndarray | None]:
    """The table's columns as contiguous int64 arrays, None for an all-zero column."""
    if tab is None:
        return [None] * RooflineCostModel._NCOL
    return [np.ascontiguousarray(tab[:, c]).astype(np.int64) if tab[:, c].any() else None for c in range(tab.shape[1])]


def _run_sums(cols_c: list, cols_p: list, ctx: np.ndarray, prompt: np.ndarray,
              rem: np.ndarray, k: int) -> tuple[np.ndarray, list]:
    """Per step j = 1..k of a decode run: requests decoding (rem >= j) and, per table column,
    the integer sum over them of tab_c[ctx + j] + tab_p[prompt] (exact in int64)."""
    steps = np.arange(1, k + 1)
    idx = ctx[None, :] + steps[:, None]                       # (k, n)
    live = rem[None, :] >= steps[:, None] if int(rem.min()) < k else None
    nd = live.sum(axis=1) if live is not None else np.full(k, len(ctx))
    out = []
    for tc, tp in zip(cols_c, cols_p):
        s = None
        if tc is not None:
            m = tc.take(idx)
            s = (m * live if live is not None else m).sum(axis=1)
        if tp is not None:
            pc = tp.take(prompt)
            sp = live @ pc if live is not None else np.full(k, int(pc.sum()))
            s = sp if s is None else s + sp
        out.append(np.zeros(k) if s is None else s.astype(np.float64))
    return nd, out


_DENSE_OPS = ("embedding", "rmsnorm", "qkv_proj", "rope", "o_proj", "mlp_gate_up", "mlp_act", "mlp_down")
