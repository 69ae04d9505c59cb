"""`python -m sasq plot RUN_DIR`: PNG figures of a `sasq run` folder (sasq.plots).

Needs matplotlib (pip install 'sasq[plot]'). Written into RUN_DIR/figures unless --out says
otherwise: ppl_kl_vs_bits.png and loss_curves.png from results.json; channel_ranges.png,
position_profile.png, truncation_hist.png and scales_vs_start.png from the run's model, its
calibration windows and a trained cell's checkpoint.
"""
from __future__ import annotations


def add_arguments(p):
    from sasq.plots import PLOTS
    p.add_argument("run", help="a `sasq run --out` folder (or its results.json)")
    p.add_argument("--out", default=None, help="folder for the PNGs (default RUN/figures)")
    p.add_argument("--only", default=None,
                   help=f"comma list of plots to make (default all): {','.join(PLOTS)}")
    p.add_argument("--eval", default=None, dest="eval_name",
                   help="evaluation set of the PPL/KL plot (default the run's first)")
    p.add_argument("--external", action="append", default=[],
                   help="external results file (JSON/CSV, docs/results-format.md) to add to the "
                        "PPL/KL plot; repeatable; its protocol must match the evaluation set")
    p.add_argument("--cell", default=None,
                   help="trained cell for the truncation and scale plots, as method:bits:objective "
                        "(e.g. sasq_trunc:W4A8:kl; default a finished SASQ cell, fewest A bits)")
    p.add_argument("--windows", type=int, default=8,
                   help="calibration windows for the activation plots (default 8)")


def main(args) -> int:
    import sys
    from pathlib import Path

    from sasq.plots import PLOTS, plot_run
    which = PLOTS if not args.only else tuple(w.strip() for w in args.only.split(",") if w.strip())
    if args.windows < 1:
        raise ValueError(f"--windows must be >= 1, got {args.windows}")
    run = Path(args.run)
    run_dir = run.parent if run.is_file() else run
    written = plot_run(run_dir, args.out, which, eval_name=args.eval_name, external=args.external,
                       cell=args.cell, windows=args.windows,
                       log=lambda *a: print(*a, file=sys.stderr, flush=True))
    for p in written:
        print(p)
    return 0
