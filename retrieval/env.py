"""Where a number came from: device choice, seeding, and the environment record stored next to results."""
from __future__ import annotations

import os
import platform
import random
import re
import socket
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.errors import UserError

if TYPE_CHECKING:  # torch is imported only where a device is needed: env must import without it
    import torch

# macOS ships torch and faiss with two OpenMP runtimes; loading both aborts the process unless this
# is set. Harmless elsewhere, so every script that imports the package gets it.
os.environ.setdefault("KMP_DUPLICATE_LIB_OK", "TRUE")
# Ops missing on Apple MPS fall back to the CPU instead of raising.
os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")

_announced: set[str] = set()
_TRUE = ("1", "true", "yes")


def hub_offline() -> bool:
    """True when the user said the Hugging Face hub is off limits (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(name, "0").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """True if a TCP connection to host:port opens quickly: an offline machine fails in seconds
    instead of letting a library retry for minutes."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """The one "can we download from the Hugging Face hub?" check: not marked offline, and the hub's
    host (HF_ENDPOINT, default huggingface.co) answers."""
    if hub_offline():
        return False
    host = re.sub(r"^https?://", "", os.environ.get("HF_ENDPOINT", "https://huggingface.co")).split("/")[0]
    return reachable(host.split(":")[0], timeout=timeout)


def in_hub_cache(repo_id: str) -> bool:
    """True when the Hugging Face cache already holds `repo_id` (its config.json), so no network is needed."""
    try:
        from huggingface_hub import try_to_load_from_cache   # optional here: env must import without torch/HF
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # malformed repo id, no huggingface_hub: treat as not cached
        return False


def pick_device(requested: str | None = "") -> torch.device:
    """'' or 'auto' → cuda, then mps, then cpu; anything else is passed to torch.device. Printed once."""
    import torch
    if requested in ("", "auto", None):
        if torch.cuda.is_available():
            requested = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            requested = "mps"
        else:
            requested = "cpu"
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {requested}: CUDA is not available on this machine")
    if str(device) not in _announced:
        _announced.add(str(device))
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        print(f"device: {device} ({name})", flush=True)
    return device


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (if installed) from one --seed."""
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what platform reports)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module_name: str) -> str | None:
    try:
        module = __import__(module_name)
        return getattr(module, "__version__", "unknown")
    except Exception:
        return None


def environment(threads: int | None = None) -> dict[str, Any]:
    """Versions, hardware and code commit, for storing next to every number we produce."""
    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "git_commit": code_version(),
        "numpy": np.__version__,
    }
    for name in ("faiss", "torch", "transformers"):
        if name in sys.modules or name == "faiss":
            env[name] = _version(name)
    if "torch" in sys.modules:
        import torch
        env["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
        env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return env


def code_version() -> str:
    """Short git commit of this checkout (with '+dirty'), or 'unknown' outside git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("+dirty" if dirty else "")) if commit else "unknown"
