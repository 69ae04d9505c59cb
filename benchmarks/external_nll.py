"""Per-window NLL of a transformers model in sasq's external-results format (docs/results-format.md),
computed exactly like QuaRot's `fake_quant/eval_utils.evaluator`, so a QuaRot run (or any
PyTorch evaluation) can sit in a sasq table next to our rows with its protocol checked.

Two ways to use it:

1. Inside QuaRot. Copy `write_external` (standard library + numpy only) next to QuaRot's
   fake_quant/eval_utils.py and, at the end of `evaluator`, after `nlls_tensor = torch.cat(nlls)`:

       write_external(f"quarot_{args.eval_dataset}_w{args.w_bits}a{args.a_bits}.json",
                      method="QuaRot", bits=f"W{args.w_bits}A{args.a_bits}",
                      window_nlls=nlls_tensor.float().cpu().tolist(),
                      input_ids=testenc.input_ids[0].tolist(), seqlen=model.seqlen,
                      bos="once", corpus="wikitext2:test", model=args.model,
                      weights=f"{'RTN' if args.w_rtn else 'GPTQ'} per-channel W{args.w_bits}",
                      mode=f"dynamic per-token A{args.a_bits}, rotated")

   QuaRot's evaluator cuts `input_ids` into numel // seqlen windows with no BOS per window (the
   tokenizer added one BOS to the whole text): our protocol, bos "once". The tokens hash is over
   the whole stream, so it matches ours exactly when the tokenizer agrees.

2. Stand-alone, on an HF checkpoint (a float reference from PyTorch, or a model a QuaRot-style
   script saved with its fake quantizers folded in):

       python benchmarks/external_nll.py --model DIR --corpus wikitext2:test --seqlen 2048 \
           --method "transformers FP32" --out transformers_fp32.json
       python -m sasq table RUN_DIR --external transformers_fp32.json

   Needs torch and transformers (pip install -e ".[test]"). --max-windows caps the windows
   (the file then records that count; sasq compares on the same first windows).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

FORMAT = "sasq.external/1"


def write_external(path, *, method, bits, window_nlls, input_ids, seqlen, bos, corpus=None,
                   text=None, model=None, weights=None, mode=None, fp32_ppl=None, logits=None):
    """Write one external result (docs/results-format.md) atomically. input_ids: the whole token
    stream the windows were cut from (hashed as little-endian int64); text: the exact string
    tokenized (optional, hashed as UTF-8)."""
    ids = np.asarray(input_ids, dtype="<i8").reshape(-1)
    nlls = [float(x) for x in window_nlls]
    if not nlls or not all(math.isfinite(x) for x in nlls):
        raise ValueError("window_nlls must be a non-empty list of finite numbers")
    doc = {
        "format": FORMAT, "method": method, "bits": bits,
        "protocol": {"corpus": corpus,
                     "tokens_sha256": hashlib.sha256(ids.tobytes()).hexdigest(),
                     "text_sha256": None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest(),
                     "seqlen": int(seqlen), "n_windows": len(nlls), "bos": bos},
        "window_nlls": nlls, "ppl": math.exp(sum(nlls) / len(nlls)),
    }
    for k, v in (("model", model), ("weights", weights), ("mode", mode), ("fp32_ppl", fp32_ppl),
                 ("logits", logits)):
        if v is not None:
            doc[k] = v
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def window_nlls(model, input_ids, seqlen, max_windows=None, batch_size=1):
    """QuaRot's evaluator in plain transformers: n = numel // seqlen windows (tail dropped), each
    window's mean next-token CE over its seqlen - 1 predictions."""
    import torch
    ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64)).reshape(1, -1)
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    wins = ids[:, : n * seqlen].view(n, seqlen)
    loss_fct = torch.nn.CrossEntropyLoss(reduction="none")
    out = []
    with torch.no_grad():
        for b0 in range(0, n, batch_size):
            batch = wins[b0:b0 + batch_size]
            logits = model(batch).logits.float()
            loss = loss_fct(logits[:, :-1, :].permute(0, 2, 1), batch[:, 1:])
            out += loss.mean(dim=1).tolist()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF checkpoint directory")
    ap.add_argument("--corpus", required=True, help="corpus name (wikitext2:test) or text file")
    ap.add_argument("--seqlen", type=int, default=2048, help="window length (default 2048)")
    ap.add_argument("--max-windows", type=int, default=None, help="only the first K windows")
    ap.add_argument("--method", default="transformers FP32", help="the row's method name")
    ap.add_argument("--bits", default="-", help="the row's bit config (W4A4, or - for none)")
    ap.add_argument("--out", required=True, help="output .json")
    args = ap.parse_args(argv)
    import torch
    import transformers
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sasq import corpora  # names resolve exactly as in `sasq run`

    c = corpora.resolve(args.corpus)
    tok = transformers.AutoTokenizer.from_pretrained(args.model, use_fast=False)
    ids = tok(c.text, return_tensors="pt").input_ids[0].tolist()
    bos = "once" if tok.bos_token_id is not None and ids and ids[0] == tok.bos_token_id else "none"
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    nlls = window_nlls(model, ids, args.seqlen, args.max_windows)
    write_external(args.out, method=args.method, bits=args.bits, window_nlls=nlls, input_ids=ids,
                   seqlen=args.seqlen, bos=bos, corpus=c.name or c.key, text=c.text,
                   model=args.model, mode="float (PyTorch)")
    print(f"{args.out}: {len(nlls)} windows x {args.seqlen}, ppl {math.exp(sum(nlls) / len(nlls)):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
