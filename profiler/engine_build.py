"""llama.cpp as a managed dependency: `rkvprof engine build llamacpp`.

The engine is built from the pinned llama-cpp-python sdist on PyPI (its `vendor/llama.cpp`
holds the server and batched-bench sources); llama.cpp's source is never copied into this
project. Only the two tools rkvsim drives are built (`llama-server`, `llama-batched-bench`),
statically linked so the binaries can be moved into the cache folder after the build.

Cache: `$RKVSIM_ENGINE_CACHE` or `~/.cache/rkvsim/engines/`, one folder per version and
build key (CMake flags + compiler + CPU), holding `bin/` and `engine.json` (version,
llama.cpp commit, flags, compiler). A folder appears only when complete (built in a
temporary sibling, renamed into place), so a killed build never leaves a half engine.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rkvsim.profiler.device import ProfilerError, cpuinfo_field
from rkvsim.models.files import read_json, swap_in_dir

ENGINE = "llamacpp"
SDIST = "llama-cpp-python"
VERSION = "0.3.36"
TARGETS = ("llama-server", "llama-batched-bench")
# Static, CPU-only, no network code: the build needs nothing but cmake and a C++ compiler.
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DBUILD_SHARED_LIBS=OFF")
ENGINE_FILE = "engine.json"


def cpu_flags() -> set[str]:
    return set((cpuinfo_field("flags") or "").split())


def isa_flags(flags: set[str] | None = None) -> tuple[str, ...]:
    """Extra CMake flags for this CPU. -march=native compiles ggml's AMX kernels wherever the CPU
    reports AMX, and they crash where the kernel has not granted the process AMX tile state (seen
    in a Firecracker VM: SIGSEGV in ggml_backend_amx_mul_mat on the first batch). On such a CPU the
    build names every instruction set the CPU has except AMX instead of -march=native; elsewhere
    nothing changes (so earlier builds and profiles keep their key)."""
    flags = cpu_flags() if flags is None else flags
    if not any(f.startswith("amx") for f in flags):
        return ()
    on = lambda *names: "ON" if all(n in flags for n in names) else "OFF"  # noqa: E731
    return ("-DGGML_NATIVE=OFF", f"-DGGML_SSE42={on('sse4_2')}", f"-DGGML_AVX={on('avx')}",
            f"-DGGML_AVX2={on('avx2')}", f"-DGGML_FMA={on('fma')}", f"-DGGML_F16C={on('f16c')}",
            f"-DGGML_BMI2={on('bmi2')}", f"-DGGML_AVX_VNNI={on('avx_vnni')}", f"-DGGML_AVX512={on('avx512f')}",
            f"-DGGML_AVX512_VBMI={on('avx512vbmi')}", f"-DGGML_AVX512_VNNI={on('avx512_vnni')}",
            f"-DGGML_AVX512_BF16={on('avx512_bf16')}", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF",
            "-DGGML_AMX_BF16=OFF")


def cmake_flags() -> tuple[str, ...]:
    return CMAKE_FLAGS + isa_flags()


@dataclass(frozen=True)
class EngineBuild:
    folder: Path
    info: dict

    @property
    def server(self) -> Path:
        return self.folder / "bin" / "llama-server"

    @property
    def batched_bench(self) -> Path:
        return self.folder / "bin" / "llama-batched-bench"

    @property
    def label(self) -> str:
        return f"llama.cpp {self.info.get('llamacpp_commit', '?')[:10]} (llama-cpp-python {self.info['version']})"


def cache_root() -> Path:
    env = os.environ.get("RKVSIM_ENGINE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rkvsim" / "engines"


def _tool(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ProfilerError(f"building llama.cpp needs `{name}` on PATH ({hint})")
    return path


def _compiler() -> tuple[str, str]:
    """(C++ compiler path, its first --version line): part of the build key."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise ProfilerError("building llama.cpp needs a C++ compiler (g++ or clang++): "
                            "e.g. apt-get install build-essential")
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True)
    return cxx, (out.stdout.splitlines() or ["unknown"])[0].strip()


def build_key() -> dict:
    """What makes two builds interchangeable: version, flags, compiler and the CPU
    (ggml compiles with -march=native, so a build is only valid on this CPU family)."""
    _cxx, cxx_version = _compiler()
    return {"engine": ENGINE, "version": VERSION, "cmake_flags": list(cmake_flags()),
            "compiler": cxx_version, "machine": platform.machine(), "cpu": cpu_name()}


def cpu_name() -> str:
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def build_folder(key: dict | None = None) -> Path:
    key = key or build_key()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / f"{ENGINE}-{VERSION}-{digest}"


def find_engine() -> EngineBuild | None:
    """The cached build for this machine, or None (never builds)."""
    folder = build_folder()
    info_path = folder / ENGINE_FILE
    if not info_path.is_file():
        return None
    eng = EngineBuild(folder, read_json(info_path, "engine build record"))
    if not (eng.server.is_file() and eng.batched_bench.is_file()):
        return None
    return eng


def require_engine() -> EngineBuild:
    eng = find_engine()
    if eng is None:
        raise ProfilerError("llama.cpp is not built for this machine yet; run `rkvprof engine build llamacpp` "
                            "(about 6 minutes on 2 cores)")
    return eng


def _run(cmd: list[str], log: Path, cwd: Path | None = None, what: str = "") -> None:
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-5:]
        raise ProfilerError(f"{what} failed (exit {proc.returncode}); last lines of {log}: {' | '.join(tail)}")


def _source_commit(src_root: Path) -> str:
    """llama.cpp's commit from the sdist's git metadata (read as files: git is not needed)."""
    head = src_root / ".git" / "modules" / "vendor" / "llama.cpp" / "HEAD"
    try:
        text = head.read_text().strip()
    except OSError:
        return "unknown"
    return text if len(text) == 40 else "unknown"


def fetch_source(workdir: Path, log: Path) -> Path:
    """Download and unpack the pinned sdist; returns its root folder."""
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
          f"{SDIST}=={VERSION}", "-d", str(workdir)], log, what=f"pip download {SDIST}=={VERSION}")
    archives = sorted(workdir.glob("llama_cpp_python-*.tar.gz"))
    if not archives:
        raise ProfilerError(f"pip download left no sdist in {workdir}; see {log}")
    with tarfile.open(archives[0]) as tar:
        tar.extractall(workdir, filter="data")
    roots = [p for p in workdir.iterdir() if p.is_dir() and (p / "vendor" / "llama.cpp" / "tools" / "server").is_dir()]
    if not roots:
        raise ProfilerError(f"the {SDIST} {VERSION} sdist has no vendor/llama.cpp/tools/server")
    return roots[0]


def compile_tools(src_root: Path, build_dir: Path, log: Path, jobs: int | None = None) -> None:
    cmake = _tool("cmake", "e.g. pip install cmake, or apt-get install cmake")
    _compiler()
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run([cmake, "-S", str(src_root / "vendor" / "llama.cpp"), "-B", str(build_dir), *gen, *cmake_flags()],
         log, what="cmake configure")
    jobs = jobs or os.cpu_count() or 1
    _run([cmake, "--build", str(build_dir), "--target", *TARGETS, "-j", str(jobs)], log, what="cmake build")


def install(build_dir: Path, src_root: Path, key: dict, seconds: float, staging: Path) -> EngineBuild:
    """Copy the binaries and engine.json into `staging`, then rename it to the cache folder."""
    (staging / "bin").mkdir(parents=True, exist_ok=True)
    for t in TARGETS:
        src = build_dir / "bin" / t
        if not src.is_file():
            raise ProfilerError(f"the build produced no {src}")
        shutil.copy2(src, staging / "bin" / t)
    ver = subprocess.run([str(staging / "bin" / "llama-server"), "--version"], capture_output=True, text=True)
    version_line = next((ln.strip() for ln in (ver.stdout + ver.stderr).splitlines() if ln.startswith("version")), "")
    info = {**key, "llamacpp_commit": _source_commit(src_root), "llamacpp_version": version_line,
            "targets": list(TARGETS), "build_seconds": round(seconds, 1),
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (staging / ENGINE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    final = build_folder(key)
    final.parent.mkdir(parents=True, exist_ok=True)
    swap_in_dir(staging, final)
    return EngineBuild(final, info)


def build_engine(force: bool = False, jobs: int | None = None, say=print) -> EngineBuild:
    """Build (or reuse) llama-server and llama-batched-bench for this machine."""
    _tool("cmake", "e.g. pip install cmake, or apt-get install cmake")
    key = build_key()
    if not force:
        eng = find_engine()
        if eng is not None:
            say(f"rkvprof: reusing {eng.label} at {eng.folder}")
            return eng
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{ENGINE}-build-", dir=root))
    # The log lives outside the work folder so that it survives a failed build.
    log = root / f"{ENGINE}-{VERSION}-build.log"
    log.write_text("")
    t0 = time.perf_counter()
    try:
        say(f"rkvprof: fetching {SDIST}=={VERSION} (sdist) ...")
        src = fetch_source(work / "src", log)
        say(f"rkvprof: compiling {', '.join(TARGETS)} with -j {jobs or os.cpu_count()} (several minutes; log: {log})")
        compile_tools(src, work / "build", log, jobs)
        eng = install(work / "build", src, key, time.perf_counter() - t0, work / "engine")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"rkvprof: built {eng.label} in {eng.info['build_seconds']:.0f} s at {eng.folder}")
    return eng
