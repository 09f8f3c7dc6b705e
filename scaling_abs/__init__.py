"""scaling_abs: large-batch training with ABS / ABSA (Yao, Gholami, Keutzer, Mahoney).

The core library (curvature, adversarial, schedules) is importable without Accelerate or DeepSpeed;
the trainer and CLI build on it.
"""

from __future__ import annotations

__version__ = "0.1.0"

# What a run's results depend on besides our code, by distribution name (not imported here).
_DEPENDENCIES = ("torch", "torchvision", "accelerate", "deepspeed", "transformers", "datasets", "safetensors")
# Required ones whose ``__version__`` names the build (``2.13.0+cu130``) where their metadata does
# not (``2.13.0``): :func:`versions` imports them, so it says the same before and after a run.
_BUILD_NAMED = ("torch", "torchvision")


def versions() -> dict[str, str | None]:
    """This library's version, Python's and those of the installed dependencies (None: not
    installed), as ``scaling-abs --version`` prints them and ``summary.json`` records them. torch
    and torchvision (imported here: this library needs both) and any module already imported give
    their own ``__version__``, which names the build (``2.13.0+cu130``; the distribution's metadata
    says ``2.13.0``); the others their metadata, without importing them. Never raises: a version
    that cannot be read is ``"unknown"``."""
    import importlib
    import platform
    import sys
    from importlib import metadata

    found: dict[str, str | None] = {"scaling_abs": __version__, "python": platform.python_version()}
    for name in _DEPENDENCIES:
        module = sys.modules.get(name)
        if module is None and name in _BUILD_NAMED:
            try:
                module = importlib.import_module(name)
            except Exception:  # not installed, or broken: its metadata below
                module = None
        try:
            found[name] = getattr(module, "__version__", None) or metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
        except Exception:  # damaged metadata: informational only, never worth failing a run over
            found[name] = "unknown"
    return found
