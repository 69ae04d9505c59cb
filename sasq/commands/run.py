"""`python -m sasq run`: calibrate, train scales and compare baselines in one table.

With no arguments: the bundled stories260K in data-free mode (training and own-domain evaluation
text sampled from the FP32 model, separate seeds), a small fast configuration. With
`--model DIR --train FILE --eval FILE`: real data. Writes results.json + results.md under --out
(default ./results/<timestamp>/); rerunning with the same --out skips finished cells.
"""
from __future__ import annotations

import sys
from pathlib import Path

from sasq.experiment import ExperimentConfig, default_out_dir
from sasq.methods import DEFAULT_BITS, METHODS


def add_arguments(p):
    p.add_argument("--model", help="HF checkpoint dir or .gguf (default: bundled stories260K)")
    p.add_argument("--train", help="training/calibration text: a corpus name (wikitext2:valid, "
                   "ptb:train, c4:train; see docs/corpora.md) or a UTF-8 file (default: data-free samples)")
    p.add_argument("--eval", help="evaluation text: a corpus name (wikitext2:test, ptb:test, "
                   "c4:validation) or a UTF-8 file")
    p.add_argument("--bits", default=None,
                   help=f"comma list of W<b>A<b> (default {','.join(DEFAULT_BITS)}; --quick: W8A8,W4A8)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {','.join(METHODS)}")
    p.add_argument("--objective", choices=("ce", "kl", "both"), default="both",
                   help="training objective of the trained rows: next-token CE, KL to FP32, or both")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 100; data-free 40; --quick 20)")
    p.add_argument("--lr", type=float, default=3e-2, help="Adam lr on log-scales (default 3e-2)")
    p.add_argument("--seqlen", type=int, default=None, help="window length (default 512; data-free 128; --quick 64)")
    p.add_argument("--eval-seqlen", type=int, default=None,
                   help="evaluation window length (default: --seqlen; e.g. 2048 with training at 512)")
    p.add_argument("--batch", type=int, default=4, help="windows per training step (default 4)")
    p.add_argument("--calib-windows", type=int, default=None,
                   help="PTQ calibration windows (default 16; data-free 8; --quick 4)")
    p.add_argument("--eval-windows", type=int, default=None,
                   help="cap on evaluation-text windows (default all; --quick 16)")
    p.add_argument("--own-windows", type=int, default=None,
                   help="own-domain evaluation windows sampled from FP32 (default 32; data-free 16; --quick 8)")
    p.add_argument("--datafree-windows", type=int, default=None,
                   help="data-free training windows (default 128; data-free default run 96, a quarter "
                        "of them held out; --quick 48)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of calibration-window choice and training batches (default 0)")
    p.add_argument("--out", help="results directory (default ./results/<timestamp>)")
    p.add_argument("--quick", action="store_true", help="a smaller, faster configuration")
    p.add_argument("--threads", type=int, default=None,
                   help="threads of the C kernels and of NumPy's BLAS (sasq.set_num_threads; "
                        "default SASQ_NUM_THREADS or all cores)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars (one line per cell still)")


def _pick(value, default, quick_default, quick):
    if value is not None:
        return value
    return quick_default if quick else default


def config_from_args(args) -> ExperimentConfig:
    quick = args.quick
    data_free = not args.train
    bits = args.bits.split(",") if args.bits else (["W8A8", "W4A8"] if quick else list(DEFAULT_BITS))
    # The default run (no corpus) must finish in a few minutes on 2 cores with stories260K.
    cfg = ExperimentConfig(
        model=args.model, train=args.train, eval=args.eval,
        bits=tuple(b.strip() for b in bits if b.strip()),
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        objectives=("ce", "kl") if args.objective == "both" else (args.objective,),
        steps=_pick(args.steps, 100 if not data_free else 40, 20, quick),
        lr=args.lr,
        seqlen=_pick(args.seqlen, 512 if not data_free else 128, 64, quick),
        eval_seqlen=args.eval_seqlen,
        batch=args.batch,
        calib_windows=_pick(args.calib_windows, 16 if not data_free else 8, 4, quick),
        eval_windows=_pick(args.eval_windows, None, 16, quick),
        own_windows=_pick(args.own_windows, 32 if not data_free else 16, 8, quick),
        datafree_windows=_pick(args.datafree_windows, 128 if not data_free else 96, 48, quick),
        # data-free: a quarter of the samples is held out (24 windows by default): the SASQ start
        # and the kept training step are chosen on it, and 6 short windows chose noisily
        val_fraction=0.25 if data_free else 0.1,
        val_windows=_pick(None, 8 if not data_free else 24, 12, quick),
        seed=args.seed,
        out=args.out or str(default_out_dir()),
        progress=not args.quiet,
    )
    for name in ("steps", "seqlen", "batch", "calib_windows", "own_windows", "datafree_windows"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.eval_windows is not None and cfg.eval_windows < 1:
        raise ValueError("--eval-windows must be >= 1")
    return cfg


def main(args) -> int:
    from sasq.experiment import run_experiment
    from sasq.results import render_markdown

    cfg = config_from_args(args)
    if args.threads is not None:
        from sasq import set_num_threads
        set_num_threads(args.threads)
    from sasq import corpora
    for spec in (cfg.train, cfg.eval):
        if spec:
            corpora.resolve(spec)  # a missing corpus or file is reported before any work
    def log(*a):
        print(*a, file=sys.stderr, flush=True)
    doc = run_experiment(cfg, log=log)
    print(render_markdown(doc))
    print(f"results: {Path(doc['dir']) / 'results.json'} and results.md")
    return 0
