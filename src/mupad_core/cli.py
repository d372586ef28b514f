"""The `mupad` command line: thin over the library.

Errors a user can fix (bad file, bad checkpoint, offline hub) end the command with one
line naming the file and the problem and a non-zero exit status, never a traceback
(set MUPAD_DEBUG=1 to see it).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__


def _cmd_demo(args) -> int:
    from .demo import DemoConfig, run_demo

    config = DemoConfig(time_budget_s=args.seconds, seed=args.seed)
    run_demo(Path(args.out), config)
    return 0


def _cmd_version(args) -> int:
    import torch

    print(f"napari-mupad {__version__} (torch {torch.__version__}, cuda {'yes' if torch.cuda.is_available() else 'no'})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mupad", description="MUPAD multimodal pathology diffusion")
    parser.add_argument("--version", action="version", version=f"napari-mupad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a tiny model on the bundled slide's tiles and write a preview")
    demo.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    demo.add_argument("--seconds", type=float, default=120.0, help="training time budget in seconds (default: 120)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)

    version = sub.add_parser("version", help="versions of napari-mupad, torch and CUDA availability")
    version.set_defaults(func=_cmd_version)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("mupad: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for the user; the traceback only on request
        if os.environ.get("MUPAD_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"mupad: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
