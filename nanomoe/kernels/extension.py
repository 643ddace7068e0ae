"""Building and loading the native extension (nanomoe/kernels/csrc) for the CPU it runs on.

One compiled module holds every C++ kernel: the fused ops and expert kernels of the native backend
(nanomoe/kernels/native.py) and the decode step (nanomoe/kernels/decode.py). It is built at install
(`python -m nanomoe.kernels.build`, run by scripts/setup.sh) with the machine's C++ compiler for the
CPU it runs on (-march=native: AVX512-BF16 dot products and AMX tiles where the CPU has them); torch
keeps the build under ~/.cache/torch_extensions (or $TORCH_EXTENSIONS_DIR). A process that finds no
build compiles it on first use; where no compiler exists, `load_extension` returns None and the
kernel choice "auto" falls back to the torch backend.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "module.cpp", CSRC / "decode_step.cpp", CSRC / "experts.cpp", CSRC / "fused_ops.cpp"]
HEADERS = [CSRC / "simd.h", CSRC / "tensor_types.h"]

# -fopenmp: at::parallel_for is a header template whose OpenMP pragmas only take effect when the
# extension itself is built with OpenMP; it then shares torch's libgomp (same soname, loaded first).
FLAGS = ["-O3", "-march=native", "-fopenmp"]

_module = None
_build_error: str | None = None  # why the build failed, once it has


def _cpu_tag() -> str:
    """Short hash of the CPU's feature flags: a -march=native build is only valid on CPUs like it,
    and a home directory may be shared by machines that are not."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return hashlib.sha1(f"{platform.machine()} {flags} {torch.__version__}".encode()).hexdigest()[:10]


def _put_ninja_on_path() -> None:
    """torch builds extensions with the `ninja` command; the pip package (a dependency) installs it
    next to this interpreter, which is not on PATH when a virtual environment is not activated."""
    if shutil.which("ninja"):
        return
    candidates = [Path(sys.executable).parent]
    try:
        import ninja

        candidates.insert(0, Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    for directory in candidates:
        if (directory / "ninja").exists():
            os.environ["PATH"] = f"{directory}{os.pathsep}{os.environ.get('PATH', '')}"
            return


@contextlib.contextmanager
def _build_lock(build_dir: Path, stale_after_s: float = 600):
    """Builds and loads take flock(2) on nanomoe.lock, which the kernel releases however the holder
    ends. torch's own `lock` file, which torch waits on without a timeout, is then waited for here
    instead, and removed once it is older than any build takes: a build killed hard left it."""
    try:
        import fcntl
    except ImportError:  # Windows: torch's lock alone
        yield
        return
    build_dir.mkdir(parents=True, exist_ok=True)
    torch_lock = build_dir / "lock"
    with open(build_dir / "nanomoe.lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            while torch_lock.exists():
                try:
                    age = time.time() - torch_lock.stat().st_mtime
                except OSError:  # released just now
                    break
                if age > stale_after_s:
                    print(f"nanomoe: removing {torch_lock} ({age / 60:.0f} min old), left by a build that was "
                          "killed", file=sys.stderr)
                    torch_lock.unlink(missing_ok=True)
                    break
                time.sleep(0.5)
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def extension_name(flags: list[str]) -> str:
    """One build per source version and place, flags and kind of CPU: two checkouts (or a CI run next
    to a dev tree) sharing ~/.cache never load or rebuild each other's extension (torch rebuilds a
    build whose sources moved)."""
    code = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    source_hash = hashlib.sha1(code + " ".join(flags).encode() + str(CSRC.resolve()).encode()).hexdigest()[:8]
    return f"nanomoe_native_{_cpu_tag()}_{source_hash}"


def build_extension(flags: list[str]):
    """Build (or load the cached build of) the extension with these compiler flags."""
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    name = extension_name(flags)
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    with _build_lock(build_dir):
        if not any(build_dir.glob("*.so")):
            print("nanomoe: building the native kernels (once per machine, ~30-60 s)...", file=sys.stderr)
        return cpp_extension.load(name=name, sources=[str(path) for path in SOURCES], extra_cflags=flags,
                                  extra_ldflags=["-fopenmp"], extra_include_paths=[str(CSRC)], verbose=False)


def is_built() -> bool:
    """Whether a build of the current sources for this CPU is on disk (loading it takes no compiler)."""
    from torch.utils import cpp_extension

    build_dir = Path(cpp_extension._get_build_directory(extension_name(FLAGS), verbose=False))
    return any(build_dir.glob("*.so"))


def build_error() -> str | None:
    """Why the extension could not be built (None: it was, or no build was tried yet)."""
    return _build_error


def load_extension():
    """The compiled module, building it on first use; None if it cannot be built (`build_error` says why)."""
    global _module, _build_error
    if _module is not None or _build_error is not None:
        return _module
    try:
        _module = build_extension(FLAGS)
    except Exception as e:  # no compiler, no headers, ...: everything still runs through torch
        _build_error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    return _module


