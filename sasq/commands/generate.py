"""`python -m sasq generate`: continue a prompt with the FP32 model or a fake-quant model.

    python -m sasq generate --prompt "Once upon a time"                      # bundled model, FP32
    python -m sasq generate --checkpoint RUN/checkpoints/sasq_W8A8_kl.npz    # a run's trained scales
    python -m sasq generate --method static_tensor_sink --bits W8A8 --calib wikitext2:valid
    python -m sasq generate ... --compare                                   # FP32 and quantized

The quantized model is the fake-quant QuantModel (the same numbers the tables report); an
exported directory (python -m sasq export) runs on the static integer engine.
"""
from __future__ import annotations

import sys
from pathlib import Path

ENGINE_MARKER = "sasq_engine.json"  # written by sasq.export next to the engine's tensors


def add_arguments(p):
    p.add_argument("--model", default=None,
                   help="HF model directory, .gguf file or exported engine directory "
                        "(default: the bundled stories260K; with --checkpoint: the run's model)")
    p.add_argument("--prompt", default="", help="text to continue (default: BOS only)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), > 0 samples")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    add_quantizer_arguments(p, "generate with")
    p.add_argument("--compare", action="store_true", help="also print the FP32 continuation")


def add_quantizer_arguments(p, what: str) -> None:
    """--checkpoint (a run's trained scales) or --method/--bits/--calib (a calibrated PTQ plan):
    shared by generate and export (see _quantized)."""
    p.add_argument("--checkpoint", default=None,
                   help="a training checkpoint of a `sasq run` (RUN/checkpoints/<method>_<bits>_<obj>.npz): "
                        f"{what} its trained scales")
    p.add_argument("--method", default=None,
                   help="quantize with this catalogue method (python -m sasq run --methods lists "
                        "them), calibrated on --calib")
    p.add_argument("--bits", default="W8A8", help="bit config for --method (default W8A8)")
    p.add_argument("--calib", default=None,
                   help="calibration text for --method: corpus name or file (default: data-free samples)")
    p.add_argument("--calib-windows", type=int, default=8, help="calibration windows (default 8)")
    p.add_argument("--seqlen", type=int, default=128, help="calibration window length (default 128)")


def _engine_model(path: Path):
    """An exported directory (sasq.export): the static integer engine."""
    from sasq.engine import StaticInt8Model
    return StaticInt8Model.from_pretrained(path)


def _quantized(args, model, log):
    import numpy as np

    import sasq
    from sasq.methods import method, parse_bits
    if args.checkpoint:
        from sasq.runs import quant_from_checkpoint
        qm, (key, bits, obj), _ = quant_from_checkpoint(model, args.checkpoint)
        return qm, f"{qm.plan.label}, trained scales from {Path(args.checkpoint).name} ({obj})"
    m = method(args.method)
    w, a = parse_bits(args.bits)
    plan = m.plan(w, a)
    if plan is None:
        return model, "FP32"
    from sasq.runs import base_model
    qm = sasq.quantize(base_model(model, plan), plan)
    if qm.needs_calibration:
        if args.calib:
            from sasq import corpora
            from sasq.data import tokenize_corpus
            ids = tokenize_corpus(model.tokenizer, corpora.resolve(args.calib).text)
            from sasq.data import cut_windows
            wins = cut_windows(ids, args.seqlen, args.calib_windows)
            src = args.calib
        else:
            from sasq import datafree
            wins = datafree.sample_windows(model, args.calib_windows, args.seqlen,
                                           seed=datafree.TRAIN_SEED, progress=False)
            src = "data-free samples"
        sasq.calibrate(qm, np.asarray(wins), method="absmax_mean" if m.calibrate in (None, "best")
                       else m.calibrate, progress=False)
        log(f"calibrated {qm.plan.label} on {wins.shape[0]} windows of {src}"
            + (" (no training: use --checkpoint for trained scales)" if m.train else ""))
    return qm, qm.plan.label


def main(args) -> int:
    import sasq
    from sasq.io import default_model_dir

    def log(*a):
        print(*a, file=sys.stderr, flush=True)

    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.calib_windows < 1 or args.seqlen < 2:
        raise ValueError("--calib-windows must be >= 1 and --seqlen >= 2")
    if args.checkpoint and args.method:
        raise ValueError("give --checkpoint or --method, not both")
    if args.checkpoint and args.model is None:
        from sasq.runs import load_run
        run = Path(args.checkpoint).resolve().parent.parent
        args.model = load_run(run)["meta"]["model"]  # the model the scales were trained for
    path = Path(args.model) if args.model else default_model_dir()
    if path.is_dir() and (path / ENGINE_MARKER).is_file():
        model = quant = _engine_model(path)
        what = "static engine"
    else:
        model = sasq.load(path)
        quant, what = (model, "FP32") if not (args.checkpoint or args.method) else _quantized(args, model, log)
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{path}: the model has no tokenizer")
    prompt = tok.encode(args.prompt)
    if not prompt:
        raise ValueError("the prompt encodes to no tokens and the tokenizer adds no BOS")
    eos = getattr(tok, "eos_id", None)
    runs = [(what, quant)] + ([("FP32", model)] if args.compare and quant is not model else [])
    for label, m in runs:
        new = m.generate(prompt, args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                         top_k=args.top_k, eos_id=eos)
        if len(runs) > 1:
            print(f"--- {label}")
        else:
            log(f"[{label}]")
        print(tok.decode(list(prompt) + new))  # decoded together: word boundaries stay right
    return 0
