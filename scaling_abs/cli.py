"""The scaling-abs command: parse, build, run, close.

  scaling-abs train [--config FILE_OR_PRESET] [key=value ...]   (also: accelerate launch -m scaling_abs train)
  scaling-abs train --help-keys                                  every key with its default and meaning
  scaling-abs simulate [preset=imagenet_i3 | run_dir=DIR] [processes=512] [latency_us=2]
                       [bandwidth_gbps=6] [num_params=N] [--json]
  scaling-abs report RUN_DIR... [--out DIR]
  scaling-abs compare [--config fmnist_s1] [--sizes 128 ... 32768] [--strategies ...] [--out DIR] ...
  scaling-abs convex [--classes 1 9] [--iterations 1000] [--out DIR] ...
  scaling-abs --version | -V                                     this library's version and its dependencies'

scaling-abs COMMAND --help tells more. With no command (or only key=value settings) it trains:
scaling-abs alone runs the embedded default.

A mistake the user can make (config, paths, data) prints one line on stderr and exits with 2;
anything else is a bug and keeps its traceback. A training run stopped by SIGTERM or Ctrl-C writes a
checkpoint and exits with 143 or 130 (a second Ctrl-C stops at once, also with 130).
"""

from __future__ import annotations

import argparse
import signal
import sys
import warnings
from pathlib import Path

from scaling_abs import versions
from scaling_abs.errors import UserError, one_line


def _train(argv: list[str]) -> int:
    from scaling_abs.config import help_keys, list_presets, load_config

    parser = argparse.ArgumentParser(
        prog="scaling-abs train",
        description="Train with BL, FB, GG, ABS or ABSA. With no settings: ABSA on Fashion-MNIST (the embedded "
        "default), a curvature check an epoch; `--config demo` (make demo) checks four times an epoch.",
        epilog=f"presets: {', '.join(list_presets())}. Keys: scaling-abs train --help-keys",
    )
    parser.add_argument("--config", help="a YAML file or a preset name (s1, c1, ..., i3)")
    parser.add_argument("--help-keys", action="store_true", help="list every config key with its default")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if args.help_keys:
        print(help_keys())
        return 0
    cfg = load_config(args.config, args.overrides)

    from scaling_abs.trainer import train

    summary = train(cfg)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(summary, cfg.output_dir))
    return interrupted_exit_code(summary)


def interrupted_exit_code(summary: dict) -> int:
    """0 for a finished run; 128 + the signal's number for one that stopped at a signal after its
    checkpoint (143 for SIGTERM, 130 for Ctrl-C, as a shell reports a process the signal ended), so
    that a scheduler requeues it and ``train && report`` does not go on."""
    if not summary.get("interrupted"):
        return 0
    signum = signal.SIGINT if summary.get("interrupt_signal") == "SIGINT" else signal.SIGTERM
    return 128 + int(signum)


def format_summary(summary: dict, output_dir: str) -> str:
    share = summary["curvature_time_s"] / summary["wall_time_s"] if summary["wall_time_s"] else 0.0
    rows = [
        ("strategy / model / data", f"{summary['strategy']} / {summary['model']} / {summary['dataset']}"),
        (
            "test accuracy",
            percent(summary["test_accuracy"]) + ("" if summary["test_accuracy"] is None else " %"),
        ),
        ("optimizer updates", f"{summary['updates']}"),
        ("largest batch", f"{summary['max_batch_size']}"),
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
        ("curvature checks", f"{summary['curvature_checks']} ({100 * share:.1f} % of wall time)"),
        (
            "outputs",
            output_dir + ("  (interrupted: resume=auto continues)" if summary["interrupted"] else ""),
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def percent(fraction: float | None) -> str:
    """``0.9183`` -> ``"91.83"``; None (a run interrupted before any evaluation) -> ``"n/a"``."""
    return "n/a" if fraction is None else f"{100 * fraction:.2f}"


def _delegate(module: str, argv: list[str]) -> int:
    import importlib

    return importlib.import_module(f"scaling_abs.{module}").main(argv)


COMMANDS = {
    "train": _train,
    "simulate": lambda argv: _delegate("simulate", argv),
    "report": lambda argv: _delegate("report", argv),
    "compare": lambda argv: _delegate("compare", argv),
    "convex": lambda argv: _delegate("convex", argv),
}


def _one_line_warnings() -> None:
    """Our own warnings as ``scaling-abs: warning: ...`` (one line, no source line); other
    libraries' keep Python's format, with the file that raised them. All are written above the
    progress bar, not onto its line."""
    package = Path(__file__).resolve().parent
    default = warnings.formatwarning
    if getattr(default, "scaling_abs", False):  # installed already (main called again in-process)
        return

    def fmt(message, category, filename, lineno, line=None):
        if Path(filename).resolve().is_relative_to(package):
            return f"scaling-abs: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    def show(message, category, filename, lineno, file=None, line=None):
        # through tqdm: a progress bar on the terminal is cleared, the warning gets a line of its
        # own, and the bar is drawn again below it (without a bar, a plain write)
        from tqdm import tqdm

        text = warnings.formatwarning(message, category, filename, lineno, line)
        tqdm.write(text.rstrip("\n"), file=file or sys.stderr)

    fmt.scaling_abs = True
    warnings.formatwarning = fmt
    warnings.showwarning = show


def format_versions(found: dict[str, str | None]) -> str:
    """``scaling-abs 0.1.0 (python 3.11.2, torch 2.13.0, ..., deepspeed not installed)``."""
    rest = ", ".join(f"{k} {v or 'not installed'}" for k, v in found.items() if k != "scaling_abs")
    return f"scaling-abs {found['scaling_abs']} ({rest})"


def main(argv: list[str] | None = None) -> int:
    _one_line_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "-V", "--version"):
        argv = ["train", *argv]  # `scaling-abs` alone runs the embedded default
    if argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if argv[0] in ("-V", "--version"):
        # imported, torch and torchvision name their build (2.13.0+cu130), as a run's summary.json
        # records them (a run imports both; the others' versions equal their metadata)
        import torch  # noqa: F401
        import torchvision  # noqa: F401

        print(format_versions(versions()))
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        if "=" in command:
            command, rest = "train", argv
        else:
            print(
                f"scaling-abs: error: unknown command {command!r} (choose {', '.join(COMMANDS)})",
                file=sys.stderr,
            )
            return 2
    try:
        return COMMANDS[command](rest)
    except UserError as e:
        print(f"scaling-abs {command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C in training, or one outside its loop
        print(
            f"scaling-abs {command}: interrupted (no checkpoint written since the last one)", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
