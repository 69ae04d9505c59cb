"""Results from other tools (a QuaRot-style evaluation script, `sasq eval --json`) next to ours.

The format is documented in docs/results-format.md. An external result is one (method, bits)
measured under a *protocol*: the corpus (sha256 of the token stream and/or of the text), seqlen,
window count and BOS rule. `load(path)` reads it (JSON or CSV) into rows shaped like ours;
`merge(doc, external)` puts those rows into one of our results documents after checking that the
protocol matches one of its evaluation sets, field by field, and refuses otherwise with a message
naming the field. Per-window NLLs are the preferred payload: they let a longer external run be
compared on exactly our (capped) first n windows, and they reproduce the perplexity exactly.
An optional per-token logits file gives KL and top-1 agreement against our FP32 reference.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from pathlib import Path

import numpy as np

FORMAT = "sasq.external/1"
BOS_RULES = ("once", "none", "per_window")  # BOS once at the stream start / never / every window
PROTOCOL_KEYS = ("corpus", "tokens_sha256", "text_sha256", "seqlen", "n_windows", "bos")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_PPL_RTOL = 1e-4  # a file's ppl must be exp(mean window NLL) to this relative tolerance


# --------------------------------------------------------------------------- protocols

def tokens_sha256(ids) -> str:
    """sha256 of a token stream as little-endian int64 (the whole stream, before windowing)."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(ids).reshape(-1), dtype="<i8").tobytes()).hexdigest()


def make_protocol(*, seqlen: int, n_windows: int, bos: str, corpus: str | None = None,
                  tokens_sha256: str | None = None, text_sha256: str | None = None) -> dict:
    p = {"corpus": corpus, "tokens_sha256": tokens_sha256, "text_sha256": text_sha256,
         "seqlen": int(seqlen), "n_windows": int(n_windows), "bos": bos}
    return _check_protocol_fields(p, "protocol")


def _check_protocol_fields(p, where) -> dict:
    if not isinstance(p, dict):
        raise ValueError(f"{where}: protocol must be an object with {', '.join(PROTOCOL_KEYS)}")
    extra = set(p) - set(PROTOCOL_KEYS)
    if extra:
        raise ValueError(f"{where}: unknown protocol field(s) {', '.join(sorted(extra))}")
    out = {k: p.get(k) for k in PROTOCOL_KEYS}
    for k in ("seqlen", "n_windows"):
        v = out[k]
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v < (2 if k == "seqlen" else 1):
            raise ValueError(f"{where}: protocol {k} must be an integer >= "
                             f"{2 if k == 'seqlen' else 1}, got {out[k]!r}")
        out[k] = v
    if out["bos"] not in BOS_RULES:
        raise ValueError(f"{where}: protocol bos must be one of {', '.join(BOS_RULES)}, got {out['bos']!r}")
    for k in ("tokens_sha256", "text_sha256"):
        v = out[k]
        if v is not None and (not isinstance(v, str) or not _HEX64.fullmatch(v.lower())):
            raise ValueError(f"{where}: protocol {k} must be 64 hex digits, got {v!r}")
        out[k] = None if v is None else v.lower()
    if out["tokens_sha256"] is None and out["text_sha256"] is None:
        raise ValueError(f"{where}: protocol needs tokens_sha256 or text_sha256 (which corpus?)")
    if out["corpus"] is not None and not isinstance(out["corpus"], str):
        raise ValueError(f"{where}: protocol corpus must be a string")
    return out


def check_protocol(ours: dict, theirs: dict, *, theirs_name="external", has_window_nlls=False) -> str:
    """Compare two protocols; ValueError naming the first field that differs. Returns a note
    ("" or how the windows were matched). With per-window NLLs, an external run over more windows
    is compared on our first n (the same windows: same stream, seqlen and BOS rule)."""
    def differ(field, a, b, extra=""):
        raise ValueError(f"protocol mismatch: {field} differs (ours {a}, {theirs_name} {b}){extra}")

    if ours.get("tokens_sha256") and theirs.get("tokens_sha256"):
        if ours["tokens_sha256"] != theirs["tokens_sha256"]:
            same_text = (ours.get("text_sha256") and ours.get("text_sha256") == theirs.get("text_sha256"))
            differ("tokens_sha256", ours["tokens_sha256"][:12], theirs["tokens_sha256"][:12],
                   "; the text is the same, so the tokenization differs (tokenizer or BOS)"
                   if same_text else "")
    elif ours.get("text_sha256") and theirs.get("text_sha256"):
        if ours["text_sha256"] != theirs["text_sha256"]:
            differ("text_sha256", ours["text_sha256"][:12], theirs["text_sha256"][:12])
    else:
        have = lambda p: [k for k in ("tokens_sha256", "text_sha256") if p.get(k)] or ["none"]
        raise ValueError(f"protocol mismatch: no common corpus hash (ours has {', '.join(have(ours))}, "
                         f"{theirs_name} has {', '.join(have(theirs))})")
    for field in ("seqlen", "bos"):
        if ours.get(field) != theirs.get(field):
            differ(field, ours.get(field), theirs.get(field))
    n, m = ours.get("n_windows"), theirs.get("n_windows")
    if n != m:
        if has_window_nlls and isinstance(n, int) and isinstance(m, int) and m > n:
            return f"compared on our first {n} of its {m} windows"
        differ("n_windows", n, m, "" if has_window_nlls else
               " (a single perplexity cannot be cut to other windows; per-window NLLs can)")
    return ""


# --------------------------------------------------------------------------- reading

def _num(v, what, where):
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {what} must be a number, got {v!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{where}: {what} must be finite, got {v!r}")
    return x


def _entry_to_row(e: dict, where: str, base: Path) -> dict:
    method = e.get("method")
    if not isinstance(method, str) or not method.strip():
        raise ValueError(f"{where}: 'method' (a name such as \"QuaRot\") is missing")
    bits = str(e.get("bits", "-")).strip() or "-"
    if bits != "-" and not re.fullmatch(r"W\d+A\d+(KV\d+)?", bits, re.IGNORECASE):
        raise ValueError(f"{where}: bits must look like W4A4 (or W4A4KV4, or '-'), got {bits!r}")
    protocol = _check_protocol_fields(e.get("protocol"), where)
    nlls = e.get("window_nlls")
    if nlls is not None:
        if not isinstance(nlls, (list, tuple)) or not nlls:
            raise ValueError(f"{where}: window_nlls must be a non-empty list of numbers")
        nlls = [_num(x, f"window_nlls[{i}]", where) for i, x in enumerate(nlls)]
        if len(nlls) != protocol["n_windows"]:
            raise ValueError(f"{where}: {len(nlls)} window_nlls but protocol n_windows is "
                             f"{protocol['n_windows']}")
    ppl = e.get("ppl")
    nll = e.get("nll")
    if ppl is not None:
        ppl = _num(ppl, "ppl", where)
        if ppl <= 0:
            raise ValueError(f"{where}: ppl must be > 0, got {ppl}")
    if nll is not None:
        nll = _num(nll, "nll", where)
    if nlls is not None:
        mean = float(np.mean(nlls))
        if ppl is not None and not math.isclose(ppl, math.exp(mean), rel_tol=_PPL_RTOL):
            raise ValueError(f"{where}: ppl {ppl} is not exp(mean window_nlls) = {math.exp(mean):.6g}")
        nll = mean
    elif nll is None and ppl is None:
        raise ValueError(f"{where}: give window_nlls (preferred), nll or ppl")
    elif nll is None:
        nll = math.log(ppl)
    elif ppl is not None and not math.isclose(ppl, math.exp(nll), rel_tol=_PPL_RTOL):
        raise ValueError(f"{where}: ppl {ppl} is not exp(nll) = {math.exp(nll):.6g}")
    logits = e.get("logits")
    if logits is not None:
        logits = str((base / logits) if not Path(logits).is_absolute() else Path(logits))
    fp32 = e.get("fp32_ppl")
    name = method.strip()
    return {
        "method": f"external:{name}", "label": f"{name} (external)", "bits": bits.upper() if bits != "-" else "-",
        "objective": "-", "weights": str(e.get("weights", "?")),
        "granularity": str(e.get("granularity", "?")), "form": str(e.get("form", "?")),
        "mode": str(e.get("mode", e.get("activations", "?"))),
        "trained_on": str(e.get("trained_on", "external")), "eval": protocol["corpus"] or "external",
        "ppl": math.exp(nll) if nll <= 709 else math.inf, "nll": nll, "delta": None,
        "kl": None, "top1": None, "n_windows": protocol["n_windows"], "window_nlls": nlls,
        "protocol": protocol, "model": e.get("model"), "source": e.get("source"),
        "fp32_ppl": None if fp32 is None else _num(fp32, "fp32_ppl", where), "logits": logits,
        "external": True,
    }


def _read_csv(path: Path, text: str) -> dict:
    """`# key: value` header lines, then a table with an `nll` column (one row per window, in
    window order) or a single row with a `ppl` column."""
    meta, body = {}, []
    for line in text.splitlines():
        if line.startswith("#"):
            k, sep, v = line[1:].partition(":")
            if not sep:
                raise ValueError(f"{path}: header line {line!r} is not '# key: value'")
            meta[k.strip()] = v.strip()
        elif line.strip():
            body.append(line)
    rows = list(csv.DictReader(io.StringIO("\n".join(body))))
    if not rows:
        raise ValueError(f"{path}: no data rows (expected a column 'nll' or 'ppl')")
    cols = set(rows[0])
    entry = {k: v for k, v in meta.items() if k not in PROTOCOL_KEYS}
    entry["protocol"] = {k: meta[k] for k in PROTOCOL_KEYS if k in meta}
    if "nll" in cols:
        entry["window_nlls"] = [r["nll"] for r in rows]
        if "window" in cols:
            idx = [r["window"] for r in rows]
            if idx != [str(i) for i in range(len(rows))]:
                raise ValueError(f"{path}: the window column must count 0, 1, 2, ... in order")
    elif "ppl" in cols and len(rows) == 1:
        entry["ppl"] = rows[0]["ppl"]
    else:
        raise ValueError(f"{path}: expected a column 'nll' (one row per window) or a single 'ppl' row, "
                         f"got columns {sorted(cols)}")
    return entry


def load_external(path) -> dict:
    """An external results file (JSON or CSV, docs/results-format.md) as a results document
    {"version", "external": True, "meta": {"source"}, "rows"}; ValueError naming the file."""
    from sasq.results import RESULTS_VERSION
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"results file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: unreadable results file ({e})") from None
    if path.suffix.lower() == ".csv":
        entries = [_read_csv(path, text)]
    else:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: a results file must be a JSON object")
        fmt = doc.get("format", FORMAT)
        if fmt != FORMAT:
            raise ValueError(f"{path}: format {fmt!r} is not {FORMAT!r}")
        shared = {k: v for k, v in doc.items() if k not in ("results", "format")}
        if "results" in doc:
            if not isinstance(doc["results"], list) or not doc["results"]:
                raise ValueError(f"{path}: 'results' must be a non-empty list")
            entries = []
            for e in doc["results"]:
                if not isinstance(e, dict):
                    raise ValueError(f"{path}: every entry of 'results' must be an object")
                entries.append({**shared, **e, "protocol": {**shared.get("protocol", {}),
                                                           **e.get("protocol", {})}})
        else:
            entries = [shared]
    rows = [_entry_to_row(e, f"{path}" + (f" (result {i})" if len(entries) > 1 else ""), path.parent)
            for i, e in enumerate(entries)]
    for r in rows:
        r["file"] = str(path)
        r["source"] = r["source"] or str(path)
        if r["trained_on"] == "external":
            r["trained_on"] = f"external: {path.name}"
    return {"version": RESULTS_VERSION, "external": True, "meta": {"source": str(path)}, "rows": rows}


# --------------------------------------------------------------------------- merging

def _match_eval(doc: dict, row: dict, eval_name: str | None):
    """(eval name, note) of our evaluation set whose protocol matches the row's."""
    protocols = doc["meta"].get("protocols") or {}
    src = Path(row["file"]).name if row.get("file") else "external"
    names = [eval_name] if eval_name is not None else list(doc["meta"].get("evals") or protocols)
    if eval_name is not None and eval_name not in (doc["meta"].get("evals") or protocols):
        raise ValueError(f"no evaluation set {eval_name!r} in these results "
                         f"({', '.join(doc['meta'].get('evals') or protocols) or 'none'})")
    errors = []
    for name in names:
        ours = protocols.get(name)
        if ours is None:
            errors.append(f"{name}: no protocol recorded (results written before protocols were; "
                          f"rerun the same `sasq run` command to record it)")
            continue
        try:
            note = check_protocol(ours, row["protocol"], theirs_name=src,
                                  has_window_nlls=row.get("window_nlls") is not None)
        except ValueError as e:
            errors.append(f"{name}: {e}")
            continue
        return name, note
    # The mismatch against the set with the same corpus name is the useful message.
    corpus = row["protocol"].get("corpus")
    errors.sort(key=lambda m: not (corpus and m.startswith(f"{corpus}:")))
    raise ValueError(f"{row['label']} {row['bits']} matches no evaluation set: " + "; ".join(errors))


def merge(doc: dict, external, eval_name: str | None = None, reference=None) -> dict:
    """A copy of results `doc` with the rows of `external` (a document from load(), a list of
    rows, or a path) added, each on the evaluation set whose protocol it matches (or on
    `eval_name`, still checked). delta is computed against our FP32 on that set; with per-window
    NLLs and more external windows than ours, the first n are used. `reference` (a
    sasq.eval.Reference of that set) adds KL and top-1 for rows that name a logits file."""
    if isinstance(external, (str, Path)):
        external = load_external(external)
    rows = external["rows"] if isinstance(external, dict) else list(external)
    out = json.loads(json.dumps(doc))  # a deep copy; the original stays as it was
    meta = out["meta"]
    meta.setdefault("external", [])
    bits = meta.setdefault("bits", [])
    for r in rows:
        name, note = _match_eval(out, r, eval_name)
        r = dict(r)
        n = meta["protocols"][name]["n_windows"]
        if r.get("window_nlls") is not None and len(r["window_nlls"]) != n:
            r["window_nlls"] = r["window_nlls"][:n]
            r["nll"] = float(np.mean(r["window_nlls"]))
            r["ppl"] = math.exp(r["nll"]) if r["nll"] <= 709 else math.inf
            r["n_windows"] = n
        r["eval"] = name
        fp32 = (meta.get("fp32") or {}).get(name, {}).get("ppl")
        r["delta"] = (r["ppl"] / fp32 - 1.0) if fp32 else None
        if reference is not None and r.get("logits"):
            r["kl"], r["top1"] = fidelity(r["logits"], reference)
        if r["bits"] != "-" and r["bits"] not in bits:
            bits.append(r["bits"])
        out["rows"] = [x for x in out["rows"] if not (x.get("method") == r["method"] and
                                                     x.get("bits") == r["bits"] and x.get("eval") == name)]
        out["rows"].append(r)
        meta["external"] = [x for x in meta["external"] if (x["label"], x["bits"], x["eval"]) !=
                            (r["label"], r["bits"], name)]
        src = r.get("file") or r.get("source")
        if r.get("source") and r.get("source") != src:
            src = f"{src} ({r['source']})"
        meta["external"].append({"label": r["label"], "bits": r["bits"], "eval": name,
                                 "source": src, "model": r.get("model"),
                                 "protocol": r["protocol"], "note": note,
                                 "fp32_ppl": r.get("fp32_ppl")})
    return out


def fidelity(logits_path, reference) -> tuple[float, float]:
    """(mean per-token KL(reference || external), top-1 agreement) from an external per-token
    logits file (.npy, (n_windows, seqlen, vocab), any float dtype) on the reference's windows
    (its first n), scored on the same seqlen - 1 positions per window as sasq.eval."""
    from sasq import losses
    try:
        z_all = np.load(logits_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{logits_path}: not a .npy logits array ({e})") from None
    n, T = reference.windows.shape
    V = reference.lm_head.shape[0]
    if z_all.ndim != 3 or z_all.shape[0] < n or z_all.shape[1] != T or z_all.shape[2] != V:
        raise ValueError(f"{logits_path}: logits of shape {z_all.shape}, expected "
                         f"(>= {n}, {T}, {V}) for the reference windows")
    kl = agree = 0.0
    for i in range(n):
        z = np.asarray(z_all[i, :-1], dtype=np.float32)  # (T-1, V)
        zp = reference.hidden[i, :-1] @ reference.lm_head.T
        kl += float(losses.kl_rows(z, zp).sum())
        agree += float(np.count_nonzero(z.argmax(axis=1) == zp.argmax(axis=1)))
    m = n * (T - 1)
    return kl / m, agree / m
