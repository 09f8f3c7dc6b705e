"""scaling_abs: large-batch training with ABS / ABSA (Yao, Gholami, Keutzer, Mahoney).

The core library (curvature, adversarial, schedules) is importable without Accelerate or DeepSpeed;
the trainer and CLI build on it.
"""

from __future__ import annotations

__version__ = "0.1.0"

# What a run's results depend on besides our code, by distribution name (not imported here).
_DEPENDENCIES = ("torch", "torchvision", "accelerate", "deepspeed", "transformers", "datasets", "safetensors")


def versions() -> dict[str, str | None]:
    """This library's version, Python's and those of the installed dependencies (None: not
    installed), as ``scaling-abs --version`` prints them and ``summary.json`` records them. A module
    already imported gives its own ``__version__``, which names the build (``2.13.0+cu130``; the
    distribution's metadata says ``2.13.0``); the others their metadata, without importing them.
    Never raises: a version that cannot be read is ``"unknown"``."""
    import platform
    import sys
    from importlib import metadata

    found: dict[str, str | None] = {"scaling_abs": __version__, "python": platform.python_version()}
    for name in _DEPENDENCIES:
        module = sys.modules.get(name)
        try:
            found[name] = getattr(module, "__version__", None) or metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
        except Exception:  # damaged metadata: informational only, never worth failing a run over
            found[name] = "unknown"
    return found
