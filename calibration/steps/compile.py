"""Compile a StepFit into lookup tables for one (model, method, TP): the simulator then costs a
step with a few array lookups and never calls a regressor inside its event loop.

Tables (seconds, all layers of one replica rank):
- dense[t]: every per-layer dense op x layers + embedding, by new tokens t in the step;
  evaluated on a geometric grid of t and interpolated linearly to every integer.
- head[n]: LM head + sampling by logits produced (None when the profile has no such rows;
  the cost model then uses its roofline prior for them and says so).
- decode[b, c]: decode attention of b requests whose mean key is c (grid, bilinear).
- prefill[n, p]: one prefill chunk of n tokens over p cached tokens (grid, bilinear).
Choosing the attention fit for a method: the same label if profiled; else the same kind at
another setting (the physics features carry the setting: bytes, cached tokens); else FP16
attention over the tokens the method keeps (SnapKV after its vote). Each choice is noted.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rkvsim.models import HardwareSpec, Method, ModelSpec, parse_method

from rkvsim.calibration.steps.features import PER_LAYER_OPS, decode_work, dense_work, prefill_work
from rkvsim.calibration.steps.fit import OpFit, StepFit

HEAD_OPS = ("lm_head", "sample")


@dataclass
class CompiledCosts:
    origin: str
    layers: int
    dense: np.ndarray
    head: np.ndarray | None
    dec_b: np.ndarray
    dec_c: np.ndarray
    dec: np.ndarray
    pre_n: np.ndarray
    pre_p: np.ndarray
    pre: np.ndarray
    attention_from: str           # profile method whose attention fit is used
    notes: list[str] = field(default_factory=list)
    parts: dict = field(default_factory=dict)   # where each part comes from: dense, attention
    trust: list = field(default_factory=list)   # how far each part can be trusted (steps/trust.py: measured)


def _grid(hi: int, dense_upto: int, n_geo: int) -> np.ndarray:
    lo = np.arange(1, min(dense_upto, hi) + 1)
    geo = np.geomspace(max(dense_upto, 1), max(hi, 2), n_geo).round()
    return np.unique(np.concatenate([lo, geo, [hi]])).astype(np.int64)


def anchored(f: OpFit, build, use_transfer: bool = False, **inputs) -> np.ndarray:
    """Predict inside the profiled range with the chosen estimator; beyond it, scale the
    prediction at the range's edge by the physics law (trees are flat outside their data,
    FLOPs and bytes are not)."""
    est = f.transfer if (use_transfer and f.transfer is not None) else f.estimator
    clipped = {k: (np.clip(np.asarray(v, np.float64), *f.ranges[k]) if k in f.ranges else v)
               for k, v in inputs.items()}
    w_clip = build(**clipped)
    y = est.predict(w_clip)
    if f.physics is None or all(np.array_equal(np.asarray(clipped[k]), np.asarray(inputs[k], np.float64))
                                for k in inputs):
        return y
    w_raw = build(**inputs)
    return y * f.physics.predict(w_raw) / f.physics.predict(w_clip)


def pick_attention(fit: StepFit, method: Method, any_stand_in: bool = False) -> tuple[str, Method, str | None]:
    """(profile method label, method to compute features with, note). any_stand_in: FP16 attention
    stands in for every method not profiled (a GPU profile that measured FP16 attention only)."""
    have = set(fit.methods("decode")) & set(fit.methods("prefill"))
    if method.label in have:
        return method.label, method, None
    same = sorted(m for m in have if parse_method(m).kind == method.kind)
    if same:
        return same[0], method, (f"attention of {method.label} from the {same[0]} fit "
                                           f"(its bytes and cached tokens computed for {method.label})")
    if "fp16" in have and method.spec.fused_dequant and (any_stand_in or method.spec.fp16_attention_stand_in):
        # The kernel reads the stored format itself (FP8 KV): FP16's fit at the method's bytes.
        return "fp16", method, (f"{method.kind} attention not profiled: FP16 attention's fit at {method.label}'s "
                                "bytes (its kernel reads the stored format)")
    if "fp16" in have and method.spec.fp16_attention_stand_in:
        what = ("its selection/eviction work is not included" if method.token_cap is not None
                or method.spec.prompt_budget is not None else "read at FP16's bytes, an upper bound")
        return "fp16", parse_method("fp16"), (
            f"{method.kind} attention not profiled: FP16 attention over the tokens {method.label} keeps "
            f"({what})")
    if "fp16" in have and any_stand_in:
        return "fp16", parse_method("fp16"), (
            f"{method.kind} attention not measured on this GPU: FP16 attention at FP16's bytes over the tokens "
            f"{method.label} keeps (its dequantization or selection work is not included; neither bound)")
    raise LookupError(f"the profile has no attention for {method.kind} and no FP16 attention to stand in; "
                      f"profile it: rkvprof collect --methods {method.label}")


def roofline_s(work: dict, hw: HardwareSpec) -> np.ndarray:
    """Datasheet roofline of attention work: max(FLOPs / peak FLOP/s, bytes / bandwidth)."""
    return np.maximum(np.asarray(work["flops"], np.float64) / hw.dense_flops,
                      np.asarray(work["kv_bytes"], np.float64) / hw.mem_bandwidth)


def hw_scale(work: dict, src: HardwareSpec, dst: HardwareSpec, src_work: dict | None = None) -> np.ndarray:
    """Roofline of `work` on dst over that of `src_work` (default: the same work) on src: the ratio
    that carries a measured kernel time to another GPU and/or head layout."""
    t_src = roofline_s(work if src_work is None else src_work, src)
    t_dst = roofline_s(work, dst)
    return np.where(t_src > 0, t_dst / np.maximum(t_src, 1e-30), src.mem_bandwidth / dst.mem_bandwidth)


def carry_time(f: OpFit, t_src: np.ndarray, ratio: np.ndarray) -> np.ndarray:
    """A source time carried by a roofline ratio: its fixed part (the physics law's constant, what a
    launch costs there) is kept, the part that grows with the work is scaled."""
    c0 = float(getattr(f.physics, "coef_", [0.0])[0]) if f.physics is not None else 0.0
    c0 = min(c0, float(np.min(t_src)))
    return c0 + (t_src - c0) * ratio


def dense_time(f: OpFit, build, tokens, transfer: bool = False, src: HardwareSpec | None = None,
               dst: HardwareSpec | None = None) -> np.ndarray:
    """A dense operator's seconds at `tokens`: the fit, and with src/dst (a GPU nobody profiled)
    carried there by the datasheet roofline of its work (calibration/steps/gpu_carry.py)."""
    y = anchored(f, build, transfer, tokens=tokens)
    if dst is None:
        return y
    from rkvsim.calibration.steps.gpu_carry import dense_ratio
    return carry_time(f, y, dense_ratio(build(tokens), src, dst))


def _shape_carry(f: OpFit, hq: int, hkv: int, d: int, scale_hw) -> tuple | None:
    """(source q heads, kv heads, head dim) when an attention fit timed at one head layout is applied
    to another, or on another GPU: its features cannot separate per-head costs (every feature grows
    with batch x context alike), so it is evaluated at its own layout and carried by the roofline."""
    sh = getattr(f, "shape", None)
    if sh is None or (tuple(sh) == (hq, hkv, d) and scale_hw is None):
        return None
    return tuple(sh)


def _attention(f: OpFit, build, src_build, carry, transfer: bool, scale_hw, src_hw, dst_hw, **inputs) -> np.ndarray:
    """One attention table's seconds per layer: the fit at this shape (on another GPU: times the
    roofline ratio), or, with `carry`, the fit at its own head layout carried by each shape's roofline."""
    if carry is None:
        t = anchored(f, build, transfer, **inputs)
        return t * hw_scale(build(**inputs), src_hw, dst_hw) if scale_hw else t
    return carry_time(f, anchored(f, src_build, False, **inputs),
                      hw_scale(build(**inputs), src_hw, dst_hw, src_build(**inputs)))


MOE_OPS = ("mlp_up_proj", "mlp_act", "mlp_down_proj")


def dense_tables(fit: StepFit, model: ModelSpec, tp: int, t_hi: int, transfer: bool = False,
                 fit_hw: HardwareSpec | None = None, to_hw: HardwareSpec | None = None):
    """(dense seconds of a step by token count 0..t_hi: embedding + every layer's operators,
    LM head + sampling by token count or None, the operators the fit lacks). Evaluated on a geometric
    token grid and interpolated linearly to every integer."""
    dt, L = model.weight_dtype_bytes, model.num_layers
    dims = (model.hidden_size, model.intermediate_size, model.num_heads, model.num_kv_heads,
            model.head_dim, model.vocab_size)
    tg = _grid(t_hi, 64, 160)
    dense_g = np.zeros(len(tg))
    head_g = np.zeros(len(tg))
    missing = []
    for op in ("emb",) + tuple(sorted(PER_LAYER_OPS)) + HEAD_OPS:
        if op == "post_attention_layernorm" and model.parallel_block:
            continue    # one norm per layer: attention and MLP read the same normed input
        f = fit.get("dense", "all", op)
        if f is None:
            missing.append(op)
            continue
        def build(tokens, op=op):
            return dense_work(op, tokens, *dims, tp, dt, gated=model.gated_mlp, parallel=model.parallel_block)
        def timed(tokens, f=f, build=build):
            return dense_time(f, build, tokens, transfer, fit_hw, to_hw)
        if model.is_moe and op in MOE_OPS:
            ex = np.asarray(model.experts_touched(tg.astype(np.float64)))
            per_expert = np.maximum(tg * model.experts_per_token / ex, 1.0)
            y = ex * timed(per_expert)
        else:
            y = timed(tg)
        if op in HEAD_OPS:
            head_g += y
        else:
            dense_g += y * (L if op in PER_LAYER_OPS else 1)
    t_all = np.arange(t_hi + 1)
    dense = np.interp(t_all, np.concatenate([[0], tg]), np.concatenate([[0.0], dense_g]))
    head = None
    if not [op for op in HEAD_OPS if op in missing]:
        head = np.interp(t_all, np.concatenate([[0], tg]), np.concatenate([[0.0], head_g]))
    return dense, head, missing


def unprofiled_kernels(model: ModelSpec, profiled: list[str]) -> list[str]:
    """The model's element-wise kernels (ModelSpec.kernel_kinds) that no profiled model runs; a name the
    registry does not know counts as Llama-like (RMSNorm, gated MLP), as the Vidur import defaults."""
    from rkvsim.models import MODELS
    seen: dict[str, set] = {}
    for name in profiled:
        for op, kind in MODELS.get(name, MODELS["llama-2-7b"]).kernel_kinds.items():
            seen.setdefault(op, set()).add(kind)
    return [f"{op} {kind}" for op, kind in model.kernel_kinds.items() if kind not in seen.get(op, set())]


def compile_costs(fit: StepFit, model: ModelSpec, method: Method, tp: int = 1, max_tokens: int = 8192,
                  max_batch: int = 256, max_ctx: int = 4096, donor: tuple | None = None,
                  to_hw: HardwareSpec | None = None, profile_dir: str | None = None) -> CompiledCosts:
    """donor: (StepFit, source HardwareSpec, this HardwareSpec) whose attention is carried here by
    hw_scale when `fit` has none (a GPU whose profile measured dense operators only).
    to_hw: a GPU other than the fit's, which nobody profiled: every operator is carried there by the
    datasheet roofline of its work (calibration/steps/gpu_carry.py).
    profile_dir: the profile folder the fit was made on (its fit.json scores the trust figures);
    default: the folder the fit recorded."""
    dt = model.weight_dtype_bytes
    L = model.num_layers
    notes = []
    transfer = not fit.profiled(model.name)
    tag = fit.origin.removeprefix("profile:")
    fit_hw = None
    if to_hw is not None:
        from rkvsim.models import resolve_hardware
        fit_hw = resolve_hardware(fit.hardware)
        if fit_hw.name == to_hw.name:
            to_hw = None
    parts = {"dense": f"transfer({tag} {','.join(fit.model_names)})" if transfer else f"profile({tag})"}
    if to_hw is not None:
        parts["dense"] = f"carried({parts['dense']} -> {to_hw.name})"
        notes.append(f"no profile of {to_hw.name}: {fit_hw.name}'s measured operators carried by the datasheet "
                     f"roofline of each operator's work ({fit_hw.name} -> {to_hw.name}), their fixed part kept")
    if transfer:
        notes.append(f"dense operators fitted on {', '.join(fit.model_names)}, applied to "
                     f"{model.name} through its shape (FLOP/byte and GEMM-shape features)")
        unseen = unprofiled_kernels(model, fit.model_names)
        if unseen:
            parts["dense"] += f"[kernels not profiled: {', '.join(unseen)}]"
            notes.append(f"{model.name} runs kernels none of the profiled models ran ({', '.join(unseen)}): those "
                         "operators are predicted from other kernels' times (held out the same way, Phi-2's "
                         "LayerNorm and GELU miss by 20-100% per operator, its whole layer by about 5%)")
    if model.is_moe:
        notes.append(f"MoE: each expert's MLP costed at tokens x {model.experts_per_token} / experts touched, "
                     "times the experts touched (uniform routing)")
    t_hi = max(int(max_tokens) + int(max_batch), 2)
    dense, head, missing = dense_tables(fit, model, tp, t_hi, transfer, fit_hw, to_hw)
    if [op for op in missing if op not in HEAD_OPS]:
        notes.append(f"dense ops not profiled (left out): {', '.join(o for o in missing if o not in HEAD_OPS)}")

    att_fit, scale_hw = fit, None
    if to_hw is not None and fit.has_attention():
        scale_hw = (fit_hw, to_hw)
        notes.append(f"attention: {fit.origin}'s, carried by the datasheet roofline ({fit_hw.name} -> {to_hw.name})")
    elif not fit.has_attention() and donor is not None:
        att_fit, src_hw, dst_hw = donor
        scale_hw = (src_hw, dst_hw)
        notes.append(f"attention: no table measured on {fit.hardware}; {att_fit.origin}'s, carried by the datasheet "
                     f"roofline ({src_hw.name} -> {dst_hw.name}) and the shape's FLOPs/bytes")
    multi = len(fit.model_names) > 1
    label, feat_method, note = pick_attention(att_fit, method, any_stand_in=multi or scale_hw is not None)
    ratio = None
    if label == "fp16" and method.kind != "fp16" and (multi or scale_hw is not None):
        from rkvsim.calibration.steps.method_ratios import REF_KV_HEADS, ratio_at, ratio_table
        ratio = ratio_table(method.label, method.kind)   # replaces the stand-in and its caveat
    if note and ratio is None:
        notes.append(note)
    kind = "transfer" if scale_hw else ("transfer-shape" if not att_fit.attention_profiled(model.name) else "profile")
    parts["attention"] = f"{kind}({att_fit.origin.removeprefix('profile:')})"
    if ratio is not None:
        parts["attention"] += f"[fp16 x a6000-ratio({ratio[0]})]"
    elif label != method.label:
        parts["attention"] += f"[{label} for {method.label}]"
    from rkvsim.calibration.steps import trust as tr
    profile_dir = profile_dir or fit.profile
    trust = [tr.dense_trust(fit, profile_dir, model.name)]
    if to_hw is not None:
        trust.append(tr.carry_trust(fit_hw.name, to_hw.name))
    trust.append(tr.attention_trust(kind, att_fit, profile_dir, label))
    if ratio is not None:
        trust.append(tr.ratio_trust())
    hq, hkv = max(1, model.num_heads // tp), max(1, model.num_kv_heads // tp)
    d = model.head_dim
    dec_f, pre_f = att_fit.get("decode", label, "attention"), att_fit.get("prefill", label, "attention")
    att_transfer = transfer or scale_hw is not None or not att_fit.attention_profiled(model.name)

    # Decode: batch x mean tokens held per request, bilinear.
    cap = feat_method.token_cap or method.token_cap
    k_hi = max(2, min(int(max_ctx), cap) if cap else int(max_ctx))
    bg = _grid(max(int(max_batch), 2), 32, 28)
    cg = np.unique(np.concatenate([[1], _grid(k_hi, 64, 72)]))
    B, C = np.meshgrid(bg, cg, indexing="ij")

    def dec_build(batch, ctx):
        return decode_work(feat_method, batch, np.asarray(ctx).round().astype(np.int64), hq, hkv, d,
                           prompt=np.asarray(ctx).round().astype(np.int64), dtype_bytes=dt)
    bb, cc = B.ravel().astype(float), C.ravel().astype(float)
    src_hw, dst_hw = scale_hw or (None, None)
    if src_hw is None:
        from rkvsim.models import resolve_hardware
        src_hw = dst_hw = resolve_hardware(att_fit.hardware)
    carry = _shape_carry(dec_f, hq, hkv, d, scale_hw) if (multi or scale_hw) else None

    def dec_src(batch, ctx):
        c = np.asarray(ctx).round().astype(np.int64)
        return decode_work(feat_method, batch, c, *carry, prompt=c, dtype_bytes=dt)
    dec = _attention(dec_f, dec_build, dec_src, carry, att_transfer, scale_hw, src_hw, dst_hw, batch=bb, ctx=cc)
    if carry is not None:
        notes.append(f"attention timed at {carry[0]} query / {carry[1]} KV heads per rank, carried to {hq} / {hkv} "
                     "by the datasheet roofline of each shape's work")
    if ratio is not None:
        measured, tabs = ratio
        # Decode: the grid is keyed by the tokens the cache holds, the raw context only for methods that
        # keep every token (quantizers); evicting methods keep FP16 over the tokens they keep.
        if method.token_cap is None and method.spec.prompt_budget is None:
            dec = dec * ratio_at(tabs["decode"], B.ravel() * hkv / REF_KV_HEADS, C.ravel())
        notes.append(f"{method.label} attention: this GPU's FP16 attention x {measured}'s measured ratio to FP16 on "
                     f"the A6000 (LLaMA-2-7B, LMDeploy) at the same batch x KV heads and context")
    dec = L * dec.reshape(B.shape)

    # Prefill chunk: new tokens x cached past, bilinear.
    ng = _grid(max(int(max_tokens), 2), 16, 56)
    pg = np.unique(np.concatenate([[0], _grid(max(int(max_ctx), 2), 16, 48)]))
    N, P = np.meshgrid(ng, pg, indexing="ij")

    def pre_build(tokens, past):
        return prefill_work(feat_method, np.asarray(tokens).round().astype(np.int64),
                            np.asarray(past).round().astype(np.int64), hq, hkv, d, dtype_bytes=dt)
    nn, pp = N.ravel().astype(float), P.ravel().astype(float)
    carry = _shape_carry(pre_f, hq, hkv, d, scale_hw) if (multi or scale_hw) else None

    def pre_src(tokens, past):
        return prefill_work(feat_method, np.asarray(tokens).round().astype(np.int64),
                            np.asarray(past).round().astype(np.int64), *carry, dtype_bytes=dt)
    pre = _attention(pre_f, pre_build, pre_src, carry, att_transfer, scale_hw, src_hw, dst_hw, tokens=nn, past=pp)
    if ratio is not None:
        pre = pre * ratio_at(ratio[1]["prefill"], N.ravel(), P.ravel())
    pre = L * pre.reshape(N.shape)
    origin = fit.origin if to_hw is None else f"{fit.origin} carried to {to_hw.name}"
    return CompiledCosts(origin, L, dense, head, bg.astype(np.float64), cg.astype(np.float64), dec,
                         ng.astype(np.float64), pg.astype(np.float64), pre, label, notes, parts, trust)
