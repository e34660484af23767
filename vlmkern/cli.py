"""The ``vlmkern`` command line: ``info``, ``demo``, ``quantize`` and ``eval``."""
from __future__ import annotations

import argparse
import os
import platform
import sys


def cmd_info(args) -> int:
    import torch

    import vlmkern
    from vlmkern.ops.backends import disabled_kernels
    print(f"vlmkern      {vlmkern.__version__}")
    print(f"python       {platform.python_version()}")
    print(f"torch        {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    for mod in ("triton", "transformers", "safetensors"):
        try:
            version = __import__(mod).__version__
        except ImportError:
            version = "not installed"
        print(f"{mod:<12} {version}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            print(f"gpu {i}        {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    else:
        print("gpu          none visible to torch")
    print("backends (selection order cuda -> triton -> torch; VLMKERN_BACKEND forces one):")
    for name, b in vlmkern.available_backends().items():
        state = "available" if b["available"] else "unavailable"
        mode = "" if b["auto"] else ", opt-in only"
        why = "" if b["reason"] == "available" else f": {b['reason']}"
        print(f"  {name:<7} {state}{mode}{why}")
        if b["kernels"]:
            off = disabled_kernels()
            names = [k + (" (off: VLMKERN_DISABLE)" if k in off else
                          " (opt-in: VLMKERN_ENABLE)" if k in b["opt_in"] else "")
                     for k in b["kernels"]]
            print(f"          kernels: {', '.join(names)}")
    return 0


def cmd_demo(args) -> int:
    from .demo import main
    return main(args)


def cmd_quantize(args) -> int:
    from .calib.cli import run
    return run(args)


def cmd_eval(args) -> int:
    from .eval.cli import run_eval
    return run_eval(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmkern", description="Low-bit inference for VLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, backends and why any is unavailable")
    from .demo import add_arguments as add_demo_arguments
    add_demo_arguments(sub.add_parser(
        "demo", help="quantize the mini VLM with the default recipe and compare it with "
                     "full precision (accuracy, KL, bytes)"))
    from .calib.cli import add_arguments
    add_arguments(sub.add_parser("quantize", help="calibrate a model layer by layer and save it"))
    from .eval.cli import add_arguments as add_eval_arguments
    add_eval_arguments(sub.add_parser("eval", help="score quantized variants of the mini VLM"))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"info": cmd_info, "demo": cmd_demo, "quantize": cmd_quantize, "eval": cmd_eval}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        if os.environ.get("VLMKERN_TRACEBACK") == "1":
            raise
        work_dir = getattr(args, "work_dir", None)
        kept = (f"the layers finished so far are kept in {work_dir}: rerun the same command "
                f"to resume there" if work_dir is not None else
                "nothing was kept (--work-dir keeps finished layers for a rerun)")
        print(f"\nvlmkern {args.command}: interrupted; {kept}", file=sys.stderr)
        return 130
    except SystemExit as e:
        if not isinstance(e.code, str):      # argparse's exit (already printed) or a plain code
            raise
        # a command's own usage error: the same form and exit status as the others
        print(f"vlmkern {args.command}: error: {e.code}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        # What a user got wrong (arguments, files, devices) reads best as one
        # line; VLMKERN_TRACEBACK=1 shows where it was raised.
        if os.environ.get("VLMKERN_TRACEBACK") == "1":
            raise
        print(f"vlmkern {args.command}: error: {type(e).__name__}: {e}\n"
              f"(VLMKERN_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
