"""`python -m sasq eval`: perplexity of a model on a corpus or text file (QuaRot/GPTQ protocol).

--json writes the result in the external-results format (docs/results-format.md): per-window
NLLs with the protocol, loadable by sasq.results.load and mergeable next to a run's table."""
import json
from pathlib import Path

from sasq.atomic import atomic_write


def add_arguments(p):
    p.add_argument("--model", default=None,
                   help="HF model directory or .gguf file (default: the bundled stories260K)")
    p.add_argument("--data", required=True,
                   help="corpus name (wikitext2:test, ptb:test, c4:validation; docs/corpora.md) or a "
                        "UTF-8 text file, tokenized as one stream")
    p.add_argument("--seqlen", type=int, default=None,
                   help="window length (default: the model's max_position_embeddings, at most 2048)")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first K windows")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--json", default=None, help="also write the result (with per-window NLLs) here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=None,
                   help="threads of the C kernels and of NumPy's BLAS (sasq.set_num_threads)")


def _write_json_atomic(path: Path, obj) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def main(args) -> int:
    from sasq import corpora
    from sasq.data import check_seqlen, tokenize_corpus
    from sasq.eval import perplexity
    from sasq.external import FORMAT, make_protocol, tokens_sha256
    from sasq.io import default_model_dir, load

    if args.seqlen is not None and args.seqlen < 2:
        raise ValueError(f"--seqlen must be an integer >= 2, got {args.seqlen}")
    if args.max_windows is not None and args.max_windows < 1:
        raise ValueError(f"--max-windows must be >= 1, got {args.max_windows}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.threads is not None:
        from sasq import set_num_threads
        set_num_threads(args.threads)
    model_path = Path(args.model) if args.model else default_model_dir()
    corpus = corpora.resolve(args.data)
    model = load(model_path)
    if model.tokenizer is None:
        raise ValueError(f"{model_path}: the model has no tokenizer (tokenizer.json/.model)")
    seqlen = check_seqlen(model, args.seqlen or min(2048, model.config.max_position_embeddings),
                          "--seqlen")
    ids = tokenize_corpus(model.tokenizer, corpus.text)
    res = perplexity(model, ids, seqlen, batch_size=args.batch_size, max_windows=args.max_windows,
                     progress=not args.quiet)

    rows = [("model", str(model_path)), ("data", f"{corpus.label} ({corpus.source})"),
            ("sha256", f"{corpus.sha256} (text)"),
            ("tokens", f"{res.n_tokens:,}" + (" (BOS once)" if model.tokenizer.add_bos else "")),
            ("windows", f"{res.n_windows:,}" + ("" if args.max_windows is None else
                                               f" (first {args.max_windows} asked)")),
            ("seqlen", str(res.seqlen)), ("nll", f"{res.nll:.6f}"), ("ppl", f"{res.ppl:.4f}")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if args.json:
        bos = "once" if model.tokenizer.add_bos else "none"
        protocol = make_protocol(corpus=corpus.name or corpus.key, text_sha256=corpus.sha256,
                                 tokens_sha256=tokens_sha256(ids), seqlen=res.seqlen,
                                 n_windows=res.n_windows, bos=bos)
        out = {"format": FORMAT, "method": "FP32 (sasq eval)", "bits": "-",
               "model": str(model_path), "source": f"sasq eval --data {args.data}",
               "protocol": protocol, "data": corpus.source, "batch_size": args.batch_size,
               **res.to_dict()}
        _write_json_atomic(Path(args.json), out)
    return 0
