"""Command line: `python -m sasq COMMAND ...` and the `sasq` console script.

Each command lives in its own module under sasq/commands/ and exposes
`add_arguments(parser)` and `main(args) -> int`; modules are imported only when their
command runs, so one command's heavy imports never slow down another.
"""
import argparse
import importlib
import sys

COMMANDS = {
    "run": ("sasq.commands.run", "SASQ end to end: calibrate, train scales, compare baselines"),
    "eval": ("sasq.commands.eval", "perplexity of a model on a corpus or text file"),
    "generate": ("sasq.commands.generate", "continue a prompt with an FP32, fake-quant or exported "
                                           "integer model"),
    "plot": ("sasq.commands.plot", "PNG figures of a run: PPL/KL vs bits, loss curves, "
                                   "activation ranges, sink profile, truncation, learned scales"),
    "table": ("sasq.commands.table", "a run's results table, with external results merged in"),
    "export": ("sasq.commands.export", "a quantized model -> an integer-model directory "
                                       "(compressed-tensors + sasq extensions)"),
    "convert-gguf": ("sasq.commands.convert_gguf", "GGUF file -> HF-style directory"),
}
RESUMABLE = ("run",)  # commands whose work survives an interruption (checkpoints, results.json)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="sasq", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (mod, help_) in COMMANDS.items():
        # Parsers are built lazily only for the chosen command (keeps --help fast and robust).
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")
        parser.print_help()
        return 0 if argv else 2
    name = argv[0]
    mod = importlib.import_module(COMMANDS[name][0])
    cmd_parser = argparse.ArgumentParser(prog=f"sasq {name}", description=COMMANDS[name][1])
    mod.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    try:
        return int(mod.main(args) or 0)
    except KeyboardInterrupt:
        # Ctrl-C: checkpoints and results are written atomically, so nothing is half-written.
        hint = "; rerun the same command to resume" if name in RESUMABLE else ""
        print(f"\nsasq {name}: interrupted{hint}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, OSError, ImportError, NotImplementedError) as e:
        # One-line errors for bad input (and a missing optional extra); tracebacks are for bugs.
        print(f"sasq {name}: error: {e}", file=sys.stderr)
        return 1
