"""The one place that defines every table rkvprof writes (and calibration reads).

Tables are tidy CSV files, one row per measured configuration, each row carrying
`schema_version`. Times are seconds. Bump SCHEMA_VERSION whenever a column is added,
removed or changes meaning, so that readers can refuse tables they do not understand.
"""
from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = 1

# Timing statistics every table carries, in this order. Rows imported from Vidur have no
# percentiles (Vidur keeps min/max/mean/median/std), so p10/p90 are empty there.
TIME_COLUMNS = ("time_s_median", "time_s_p10", "time_s_p90", "time_s_mean", "time_s_std",
                "time_s_min", "time_s_max", "repeats")


@dataclass(frozen=True)
class TableSchema:
    name: str                 # file stem: <name>.csv
    key: tuple[str, ...]      # columns that identify a row: unique within a profile
    columns: tuple[str, ...]  # full column order, key included

    @property
    def filename(self) -> str:
        return f"{self.name}.csv"


# Attention per method. `stage` prefill: `new_tokens` prompt tokens attended causally and
# cached (kv_len = context already cached before the step: 0 for a whole-prompt prefill,
# > 0 for a chunk ending a prompt whose first kv_len tokens are cached; see attention_ops);
# decode: one new token per sequence attending a cache built from `kv_len` tokens.
# Heads are the heads actually timed (see meta.json `reductions` for any cut).
# cache_tokens / cache_nbytes: the cache the method holds after the step (tokens per
# sequence, bytes of the whole batch).
# overhead_s_median: work an engine does around the kernel that Vidur times apart
# (attn_input_reshape + attn_output_reshape + attn_kv_cache_save); empty for collected
# rows, whose kernels include their cache writes.
ATTENTION = TableSchema(
    name="attention",
    key=("method", "stage", "batch_size", "kv_len", "new_tokens", "tp"),
    columns=("schema_version", "method", "kind", "stage", "batch_size", "kv_len", "new_tokens", "tp",
             "num_q_heads", "num_kv_heads", "head_dim", "dtype") + TIME_COLUMNS
    + ("overhead_s_median", "cache_tokens", "cache_nbytes", "source"),
)

# Dense (method independent) operators of ONE decoder layer, plus embedding / LM head /
# sampling, at `num_tokens` tokens in the step (all sequences together). Names follow
# Vidur's mlp.csv so imported and collected profiles share one vocabulary:
#   emb, input_layernorm, attn_pre_proj (fused QKV), attn_rope, attn_post_proj (O),
#   post_attention_layernorm, mlp_up_proj (fused gate+up: 2 x intermediate outputs when the
#   MLP is gated), mlp_act (SiLU * up), mlp_down_proj, add (residual), lm_head, sample.
# `method` is 'all' for method-independent rows; Vidur folders ship per-method mlp.csv
# copies, imported under their method label. Dims are the model's; with tp > 1 the op ran
# sharded (heads and intermediate divided by tp), as in Vidur.
OPERATORS = TableSchema(
    name="operators",
    # The shape is part of the key: an imported GPU profile holds several models' rows.
    key=("method", "op", "num_tokens", "tp", "hidden", "intermediate", "num_q_heads", "num_kv_heads", "vocab"),
    columns=("schema_version", "method", "op", "num_tokens", "tp", "hidden", "intermediate",
             "num_q_heads", "num_kv_heads", "head_dim", "vocab", "dtype") + TIME_COLUMNS + ("source",),
)

# Compression-side work timed alone (quantize on append, GEAR low rank/outliers, H2O score
# update and eviction, SnapKV selection, ...): `num_tokens` tokens the step processes,
# `kv_len` tokens in the cache it works on (0 where irrelevant).
COMPRESSION = TableSchema(
    name="compression",
    key=("method", "op", "batch_size", "kv_len", "num_tokens", "tp"),
    columns=("schema_version", "method", "kind", "op", "batch_size", "kv_len", "num_tokens", "tp",
             "num_kv_heads", "num_q_heads", "head_dim", "dtype") + TIME_COLUMNS + ("source",),
)

TABLES = {t.name: t for t in (ATTENTION, OPERATORS, COMPRESSION)}

# Whole engine iterations of a real serving engine (llama.cpp's batched-bench), per KV type
# (`method`: f16, q8_0, q4_0). One row per (stage, batch_size, prompt_tokens, gen_tokens):
#   prefill: `batch_size` prompts of `prompt_tokens` tokens each, processed in `steps`
#            llama_decode calls of at most `n_batch` tokens; times = the whole prefill.
#   decode:  `gen_tokens` steps of `batch_size` sequences (one token each) whose contexts grow
#            from prompt_tokens + 1; times = seconds per step (mean context
#            prompt_tokens + (gen_tokens + 1) / 2).
# Kept apart from TABLES: engine profiles live in their own folders (see profiler.engine_collect).
ENGINE_STEPS = TableSchema(
    name="engine_steps",
    key=("engine", "method", "stage", "batch_size", "prompt_tokens", "gen_tokens"),
    columns=("schema_version", "engine", "method", "stage", "batch_size", "prompt_tokens", "gen_tokens",
             "steps", "n_batch", "n_ubatch", "threads") + TIME_COLUMNS + ("source",),
)
ENGINE_TABLES = {ENGINE_STEPS.name: ENGINE_STEPS}

META_FILE = "meta.json"


def row_key(table: TableSchema, row: dict) -> tuple:
    """The identity of a row, normalised to strings so keys read back from CSV compare equal."""
    return tuple(str(row[c]) for c in table.key)
