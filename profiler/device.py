"""What this process runs on, and whether that is the hardware the user says the profile is for."""
from __future__ import annotations

import functools
import os
import platform
import re
import subprocess
from dataclasses import dataclass, field

from rkvsim.models import hardware_for_device, resolve_hardware


class ProfilerError(Exception):
    """A refusal the CLI reports as one line and exit code 2."""


@dataclass(frozen=True)
class DeviceInfo:
    kind: str            # 'cpu' or 'cuda'
    device: str          # torch device string: 'cpu', 'cuda:0'
    device_name: str     # CPU model or GPU name as torch reports it
    details: dict = field(default_factory=dict)


def cpuinfo_field(name: str) -> str | None:
    """The first `name: value` line of /proc/cpuinfo (e.g. "model name", "flags"), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's marketing name: /proc/cpuinfo (instant), else py-cpuinfo (slow: it probes
    the CPU in a subprocess), else platform."""
    name = cpuinfo_field("model name")
    if name:
        return name
    try:
        import cpuinfo  # py-cpuinfo
        name = cpuinfo.get_cpu_info().get("brand_raw")
        if name:
            return str(name)
    except Exception:  # noqa: BLE001 - optional dependency, any failure falls through
        pass
    return platform.processor() or "unknown cpu"


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def detect(device: str | None) -> DeviceInfo:
    """The device to profile on: `device` ('cpu' | 'cuda' | 'cuda:N') or cuda when available."""
    import torch
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ProfilerError("--device cuda requested but torch sees no CUDA device "
                                f"(torch {torch.__version__})")
        dev = torch.device(device)
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return DeviceInfo("cuda", f"cuda:{index}", torch.cuda.get_device_name(index), {
            "gpu_name": torch.cuda.get_device_name(index),
            "gpu_memory_bytes": int(props.total_memory),
            "gpu_count_visible": torch.cuda.device_count(),
            "driver_version": _nvidia_driver(),
            "cuda_version": torch.version.cuda,
            "cudnn_version": torch.backends.cudnn.version(),
        })
    if device != "cpu":
        raise ProfilerError(f"unknown --device {device!r}; use cpu or cuda")
    return DeviceInfo("cpu", "cpu", cpu_model(), {
        "cpu_model": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "logical_cpus": os.cpu_count(),
        "machine": platform.machine(),
    })


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def hardware_name(info: DeviceInfo, claimed: str | None) -> str:
    """The hardware name a profile is recorded under; refuses a claim the device contradicts.

    A profile stands in for its hardware in every later simulation, so a mislabelled one
    would silently calibrate the wrong GPU: only the detected device may be named.
    """
    if info.kind == "cpu":
        if claimed is None or claimed.strip().lower() == "cpu":
            return "cpu"
        raise ProfilerError(f"--gpu {claimed} does not match this device: profiling on the CPU "
                            f"({info.device_name}); run on that GPU with --device cuda, or pass --gpu cpu")
    detected = hardware_for_device(info.device_name)
    if claimed is None:
        # An unlisted GPU still gets a stable name, derived from what the driver reports.
        return detected.name if detected else _slug(info.device_name)
    try:
        spec = resolve_hardware(claimed)
    except KeyError as e:
        raise ProfilerError(str(e.args[0])) from None
    if detected is None or detected.name != spec.name:
        raise ProfilerError(f"--gpu {claimed} does not match the detected device {info.device_name!r} "
                            f"({detected.name if detected else 'not a listed GPU'})")
    return spec.name
