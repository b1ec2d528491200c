"""The command line: ``python -m retention_compile {inspect,explain,check} TARGET [options] [-- ARGS]``.

TARGET is a script (run as ``__main__`` with its folder first on ``sys.path``, as ``python SCRIPT`` does),
``module:function`` (imported, then called without arguments) or a module (run as ``python -m``). ARGS
after ``--`` become the target's ``sys.argv[1:]``. Graphs compiled with ``backend="retention"`` while it
runs are the ones reported.

    inspect  run TARGET; write report.md, report.json, kernels/ (each generated Triton / CUDA source) and
             inductor/ (Inductor's output code, forward and backward) to --out; print the report table
    explain  run TARGET; print the report only (--format table, markdown or json)
    check    ``retention_compile.testing.check_script(TARGET, ARGS)``
"""

from __future__ import annotations

import argparse
import importlib
import runpy
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

DEFAULT_OUT = "retention_inspect"


def _target_name(target: str) -> str:
    """The output folder's name: the script's stem, or ``module.function`` / the module."""
    if target.endswith(".py") or Path(target).is_file():
        return Path(target).stem
    return target.replace(":", ".")


@contextmanager
def _argv_and_path(argv: list[str], path_entry: str | None) -> Iterator[None]:
    """``sys.argv`` and (for a script) ``sys.path[0]`` as the target expects them, restored afterwards."""
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = argv
    if path_entry is not None:
        sys.path.insert(0, path_entry)
    try:
        yield
    finally:
        sys.argv[:] = saved_argv
        sys.path[:] = saved_path


def _runner(target: str) -> tuple[Callable[[], object], list[str], str | None]:
    """How to run the target: the call, its ``argv[0]`` and the ``sys.path`` entry it needs."""
    path = Path(target)
    if target.endswith(".py") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"no such script: {target}")
        script = str(path.resolve())
        return (lambda: runpy.run_path(script, run_name="__main__")), [script], str(path.resolve().parent)
    if ":" in target:
        module, _, function = target.partition(":")

        def call() -> object:
            return getattr(importlib.import_module(module), function)()

        return call, [target], str(Path.cwd())
    return (lambda: runpy.run_module(target, run_name="__main__", alter_sys=True)), [target], str(Path.cwd())


def run_target(target: str, args: Sequence[str]) -> int:
    """Run the target like ``python`` would; return its exit status (1 with the traceback if it raised)."""
    call, argv0, path_entry = _runner(target)
    with _argv_and_path([*argv0, *args], path_entry):
        try:
            call()
        except SystemExit as exit_:
            code = exit_.code
            return code if isinstance(code, int) else (0 if code is None else 1)
        except Exception:  # noqa: BLE001  (report what was compiled before the failure, then fail)
            traceback.print_exc()
            return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m retention_compile",
        description="Inspect what the retention backend did to the models a script compiles.",
        epilog="Arguments for the target go after '--': python -m retention_compile inspect train.py -- --seq 64",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="write the report, every generated kernel and Inductor's code")
    inspect.add_argument("target", help="SCRIPT.py, module:function or module")
    inspect.add_argument("--out", help=f"output folder (default: {DEFAULT_OUT}/<target name>)")
    explain = commands.add_parser("explain", help="print the report only")
    explain.add_argument("target", help="SCRIPT.py, module:function or module")
    explain.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    check = commands.add_parser("check", help="retention_compile.testing.check_script on the target")
    check.add_argument("target", help="SCRIPT.py, module:function or module")
    return parser


def _no_graph_hint(graphs: int) -> str:
    return (
        ""
        if graphs
        else "\nno graph was compiled with backend='retention' (does the target call "
        "torch.compile(..., backend='retention') and run the compiled model?)"
    )


def _inspect(target: str, args: Sequence[str], out: str | None) -> int:
    from .inspection import capture

    out_dir = Path(out or Path(DEFAULT_OUT) / _target_name(target)).resolve()
    with capture() as cap:
        status = run_target(target, args)
    written = cap.write(out_dir, title=" ".join([target, *args]))
    print(f"\n{cap.report}{_no_graph_hint(cap.report.graphs)}")
    print(f"\nwrote {out_dir}/")
    print("  report.md, report.json")
    for key, what in (("kernels", "generated kernel sources"), ("inductor", "Inductor output code")):
        names = ", ".join(p.name for p in written[key][:4]) + (", ..." if len(written[key]) > 4 else "")
        print(f"  {key}/: {len(written[key])} {what}" + (f" ({names})" if names else ""))
    return status


def _explain(target: str, args: Sequence[str], fmt: str) -> int:
    from .inspection import capture

    with capture(inductor_code=False) as cap:
        status = run_target(target, args)
    report = cap.report
    text = {"table": lambda: str(report), "markdown": report.to_markdown, "json": report.to_json}[fmt]()
    print(text + (_no_graph_hint(report.graphs) if fmt == "table" else ""))
    return status


def _check(target: str, args: Sequence[str]) -> int:
    try:
        from .testing import check_script
    except ImportError as error:
        print(
            f"python -m retention_compile check: this installation has no retention_compile.testing.check_script "
            f"({error})",
            file=sys.stderr,
        )
        return 2
    return int(check_script(target, list(args)) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, target_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    options = _parser().parse_args(ours)
    if options.command == "inspect":
        return _inspect(options.target, target_args, options.out)
    if options.command == "explain":
        return _explain(options.target, target_args, options.format)
    return _check(options.target, target_args)


if __name__ == "__main__":
    sys.exit(main())
