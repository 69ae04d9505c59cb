"""`python -m sasq eval`: perplexity of a model on a text file (QuaRot/GPTQ protocol)."""
import json
from pathlib import Path

from sasq.atomic import atomic_write


def add_arguments(p):
    p.add_argument("--model", default=None,
                   help="HF model directory or .gguf file (default: the bundled stories260K)")
    p.add_argument("--data", required=True, help="UTF-8 text file, tokenized as one stream")
    p.add_argument("--seqlen", type=int, default=None,
                   help="window length (default: the model's max_position_embeddings, at most 2048)")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first K windows")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--json", default=None, help="also write the result (with per-window NLLs) here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _write_json_atomic(path: Path, obj) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def main(args) -> int:
    from sasq.data import read_text, tokenize_corpus
    from sasq.eval import perplexity
    from sasq.io import default_model_dir, load

    model_path = Path(args.model) if args.model else default_model_dir()
    data = Path(args.data)
    text = read_text(data)
    model = load(model_path)
    if model.tokenizer is None:
        raise ValueError(f"{model_path}: the model has no tokenizer (tokenizer.json/.model)")
    seqlen = args.seqlen or min(2048, model.config.max_position_embeddings)
    ids = tokenize_corpus(model.tokenizer, text)
    res = perplexity(model, ids, seqlen, batch_size=args.batch_size, max_windows=args.max_windows,
                     progress=not args.quiet)

    rows = [("model", str(model_path)), ("data", str(data)),
            ("tokens", f"{res.n_tokens:,}" + (" (BOS once)" if model.tokenizer.add_bos else "")),
            ("windows", f"{res.n_windows:,}" + ("" if args.max_windows is None else
                                               f" (first {args.max_windows} asked)")),
            ("seqlen", str(res.seqlen)), ("nll", f"{res.nll:.6f}"), ("ppl", f"{res.ppl:.4f}")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if args.json:
        out = {"model": str(model_path), "data": str(data), "batch_size": args.batch_size,
               **res.to_dict()}
        _write_json_atomic(Path(args.json), out)
    return 0
