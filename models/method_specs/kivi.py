"""KIVI (Liu et al., 2024): 2/4/8-bit group quantization, keys per channel and values per token,
with the newest `residual` tokens kept in full precision."""
import numpy as np

from rkvsim.models.method_specs import _quantizer as q
from rkvsim.models.methods import QUANTIZING, MethodSpec

SPEC = MethodSpec(
    kind="kivi", family=QUANTIZING, doc=__doc__,
    settings=dict(q.SETTINGS), check=q.check,
    number=lambda m: m.bits, from_number=q.engine_bits,
    engine_names=("KIVI",),
    kernel="kivi",
    paper_scores=lambda m: rf"^kivi_.*_{m.bits}bits_group{m.group_size}_residual{m.residual}$",
    bytes_per_head=q.group_bytes_per_head, bytes_parts=(q.group_bytes_of_total, None),
    token_bytes=q.marginal_token_bytes, fixed_bytes=q.window_overhead,
    quantized_tokens=q.quantized_tokens, quant_bytes_per_token=q.quant_bytes_per_token,
    prefix_sharing=lambda m, length, n: np.minimum(n, q.quantized_tokens(m, length)),
    prefix_why="a group of G tokens is quantized from those tokens alone (keys per channel within the group, "
               "values per token), so quantized groups of equal prefixes are equal and immutable; the newest "
               "`residual` tokens are full precision and still change, so they stay private",
)
