"""`python -m sasq table RUN_DIR [--with RUN_DIR ...] [--external FILE ...]`: a run's Markdown
table, with the cells of other runs of the same settings (--with: cells run in parallel into
separate folders) and results of other tools (docs/results-format.md) merged in after their
protocol is checked."""
from __future__ import annotations


def add_arguments(p):
    p.add_argument("run", help="a `sasq run --out` folder or its results.json")
    p.add_argument("--with", action="append", default=[], dest="also",
                   help="another `sasq run` folder of the same settings whose cells join the "
                        "table; repeatable")
    p.add_argument("--external", action="append", default=[],
                   help="external results file (JSON or CSV); repeatable")
    p.add_argument("--eval", default=None, dest="eval_name",
                   help="put external rows on this evaluation set (default: the one whose protocol matches)")
    p.add_argument("--out", default=None, help="also write the Markdown here")
    p.add_argument("--json", default=None, help="also write the merged results document here")


def main(args) -> int:
    import json
    from pathlib import Path

    from sasq.atomic import atomic_write
    from sasq.results import load, merge, merge_runs, render_markdown
    from sasq.runs import results_path

    doc = load(results_path(args.run))
    if doc.get("external"):
        raise ValueError(f"{args.run}: an external results file; give a `sasq run` folder first")
    for other in args.also:
        o = load(results_path(other))
        if o.get("external"):
            raise ValueError(f"{other}: an external results file; pass it with --external")
        doc = merge_runs(doc, o, name=str(other))
    for ext in args.external:
        doc = merge(doc, load(ext), eval_name=args.eval_name)
    md = render_markdown(doc)
    print(md)
    if args.out:
        with atomic_write(Path(args.out), "w") as f:
            f.write(md)
    if args.json:
        with atomic_write(Path(args.json), "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
    return 0
