"""`python -m sasq export`: write an integer-model directory (sasq.export) that
sasq.StaticInt8Model (python -m sasq generate --model DIR) and, for plans compressed-tensors can
express, transformers + compressed-tensors load.

    python -m sasq export --checkpoint RUN/checkpoints/sasq_W8A8_kl.npz --out smol-w8a8
    python -m sasq export --method static_tensor_sink --bits W8A8 --calib wikitext2:valid --out DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

from sasq.commands.generate import add_quantizer_arguments


def add_arguments(p):
    p.add_argument("--out", required=True, help="directory to write (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--model", default=None,
                   help="HF directory or .gguf (default: the bundled stories260K; with --checkpoint: "
                        "the run's model)")
    add_quantizer_arguments(p, "export")


def main(args) -> int:
    import sasq
    from sasq.commands.generate import _quantized
    from sasq.io import default_model_dir

    def log(*a):
        print(*a, file=sys.stderr, flush=True)

    if not (args.checkpoint or args.method):
        raise ValueError("give --checkpoint (trained scales) or --method (a PTQ plan) to export")
    if args.checkpoint and args.method:
        raise ValueError("give --checkpoint or --method, not both")
    if args.calib_windows < 1 or args.seqlen < 2:
        raise ValueError("--calib-windows must be >= 1 and --seqlen >= 2")
    if args.checkpoint and args.model is None:
        from sasq.runs import load_run
        args.model = load_run(Path(args.checkpoint).resolve().parent.parent)["meta"]["model"]
    model = sasq.load(Path(args.model) if args.model else default_model_dir())
    qm, what = _quantized(args, model, log)
    out = sasq.export(qm, args.out, overwrite=args.overwrite)
    print(f"exported {what} to {out}")
    return 0
