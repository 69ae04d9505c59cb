"""The results store: results.json (meta + long-format rows, rewritten atomically after every
cell) and its Markdown rendering (the full table and a compact pivot).

A row is one (method, bits, objective, eval set) cell; `meta` holds the run's identity (the
settings that change numbers: a rerun with other settings is refused), the FP32 reference per
eval set, the bit configs and the eval sets in order.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sasq.atomic import atomic_write
from sasq.methods import CATALOGUE, METHOD_LABELS, METHODS, SASQ_ROWS, STATIC_PTQ

RESULTS_VERSION = 1


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def cell_key(method: str, bits: str, objective: str) -> str:
    return f"{method}|{bits}|{objective}"


def row_key(row: dict) -> str:
    return cell_key(row["method"], row["bits"], row["objective"]) + "|" + row["eval"]


class Results:
    """results.json (meta + long-format rows) and its Markdown rendering, atomically rewritten."""

    def __init__(self, out_dir: Path, meta: dict):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.json_path = self.dir / "results.json"
        self.md_path = self.dir / "results.md"
        self.meta = meta
        self.rows: list[dict] = []
        if self.json_path.exists():
            old = check_identity(self.json_path, meta.get("identity"))
            self.rows = old["rows"]
            self.meta = {**old["meta"], **meta}

    def keys(self) -> set[str]:
        return {row_key(r) for r in self.rows}

    def has_cell(self, method, bits, objective, evals, recipe=None) -> bool:
        """Whether the cell's rows are all here; ValueError when a stored row was computed with
        another recipe (plan, rotation version, calibration, training) than `recipe` (rows
        recorded before recipes, or before a field of them, are taken as they are)."""
        ck = cell_key(method, bits, objective)
        for r in self.rows:
            old = r.get("recipe")
            if not (row_key(r).startswith(ck + "|") and old is not None and recipe is not None):
                continue
            # fields a row recorded are compared (a row written before a field existed lacks it)
            if any(old[k] != recipe.get(k) for k in old):
                a, b = old.get("plan") or {}, recipe.get("plan") or {}
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                diff += [k for k in old if k != "plan" and old[k] != recipe.get(k)]
                raise ValueError(f"{self.json_path}: cell {ck} was computed with another recipe "
                                 f"({', '.join(diff)}); use another --out or remove its rows")
        ks = self.keys()
        return all(ck + "|" + e in ks for e in evals)

    def add(self, rows: list[dict]) -> None:
        have = self.keys()
        self.rows.extend(r for r in rows if row_key(r) not in have)
        self.save()

    def save(self) -> None:
        doc = {"version": RESULTS_VERSION, "meta": self.meta, "rows": self.rows}
        _atomic_write_text(self.json_path, json.dumps(doc, indent=1, sort_keys=False) + "\n")
        _atomic_write_text(self.md_path, render_markdown(doc))


def check_identity(json_path, identity) -> dict | None:
    """The results document at json_path (None when absent) after checking it was written with
    these settings; ValueError naming the differing settings. The runner calls this before any
    work, so a refused run does nothing else first."""
    json_path = Path(json_path)
    if not json_path.exists():
        return None
    old = load_results(json_path)
    if old["meta"].get("identity") != identity:
        a, b = old["meta"].get("identity", {}), identity or {}
        diff = sorted(k for k in set(a) | set(b) if (k in a) != (k in b) or a.get(k) != b.get(k))
        raise ValueError(f"{json_path} holds results of different settings "
                         f"({', '.join(diff)}); use another --out")
    return old


def data_fingerprint(train_ids, val_ids, calib, evals: dict, model=None) -> dict:
    """sha256 of every token stream a run reads (training, held-out, calibration windows, each
    evaluation set) and the model's weight fingerprint: the run identity names corpora and a
    model path, this says what they held."""
    from sasq.eval import model_fingerprint
    from sasq.external import tokens_sha256
    return {"model": None if model is None else model_fingerprint(model).tobytes().hex(),
            "train": None if train_ids is None else tokens_sha256(train_ids),
            "heldout": None if val_ids is None else tokens_sha256(val_ids),
            "calib": tokens_sha256(calib),
            "evals": {k: tokens_sha256(v) for k, v in evals.items()}}


def _data_diff(old_meta: dict, data: dict) -> list[str]:
    """What differs between the data a stored run recorded and `data` (data_fingerprint).
    Folders written before fingerprints were recorded are checked by their eval protocols."""
    if old_meta.get("data") is not None:
        a = old_meta["data"]
        diff = [k for k in ("model", "train", "heldout", "calib") if a.get(k) != data.get(k)]
        ae, be = a.get("evals") or {}, data.get("evals") or {}
        return diff + [f"eval {k}" for k in sorted(set(ae) & set(be)) if ae[k] != be[k]]
    prot = old_meta.get("protocols") or {}
    return [f"eval {k}" for k, v in (data.get("evals") or {}).items()
            if v is not None and (prot.get(k) or {}).get("tokens_sha256") not in (None, v)]


def check_data(json_path, data: dict) -> None:
    """Refuse to resume into a folder whose cells were computed on other token streams (the same
    corpus names or paths holding other text): old rows and FP32 baselines would be mixed with
    new ones in one table."""
    json_path = Path(json_path)
    if not json_path.exists():
        return
    diff = _data_diff(load_results(json_path)["meta"], data)
    if diff:
        raise ValueError(f"{json_path}: its cells were computed on other data ({', '.join(diff)} "
                         f"changed since); use another --out")


def load(path) -> dict:
    """A results document from a run folder or results.json of ours, or from an external file
    (JSON/CSV, docs/results-format.md: a QuaRot-style script's per-window NLLs or a perplexity
    with its protocol). External documents carry "external": True; put their rows next to ours
    with merge()."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if p.suffix.lower() == ".json" and p.is_file():
        try:
            doc = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{p}: unreadable results file ({e})") from None
        if isinstance(doc, dict) and "rows" in doc and "meta" in doc:
            return load_results(p)
    from sasq.external import load_external
    return load_external(p)


def merge(doc: dict, external, eval_name: str | None = None, reference=None) -> dict:
    """Our results `doc` with external rows added on the evaluation set whose protocol they
    match (sasq.external.merge; mismatches are refused naming the field)."""
    from sasq.external import merge as _merge
    return _merge(doc, external, eval_name=eval_name, reference=reference)


def merge_runs(doc: dict, other: dict, name: str = "other run") -> dict:
    """`doc` with the rows of another `sasq run` document written with the same settings (meta
    identity; e.g. cells run in parallel into two folders). A cell in both must hold the same
    numbers (the FP32 rows do); a conflict is refused naming the cell."""
    a, b = doc["meta"].get("identity"), other["meta"].get("identity")
    if not a or not b:
        raise ValueError(f"{name}: both documents need the run settings (meta identity) to merge")
    if a != b:
        diff = sorted(k for k in set(a or {}) | set(b or {}) if (a or {}).get(k) != (b or {}).get(k))
        raise ValueError(f"{name} was run with different settings ({', '.join(diff)})")
    ma, mb = doc["meta"], other["meta"]
    if mb.get("data") is None and ma.get("data") is not None:
        ma, mb = mb, ma
    diff = _data_diff(ma, mb.get("data") or {"evals": {
        k: p.get("tokens_sha256") for k, p in (mb.get("protocols") or {}).items()}})
    fa, fb = doc["meta"].get("fp32") or {}, other["meta"].get("fp32") or {}
    diff += [f"FP32 on {k}" for k in sorted(set(fa) & set(fb))
             if fa[k].get("ppl") != fb[k].get("ppl")]
    if diff:
        raise ValueError(f"{name} was run on other data ({', '.join(diff)})")
    have = {row_key(r): r for r in doc["rows"]}
    rows = list(doc["rows"])
    for r in other["rows"]:
        k = row_key(r)
        if k not in have:
            rows.append(r)
            have[k] = r
        elif any(have[k].get(f) != r.get(f) for f in ("ppl", "kl", "top1", "recipe")):
            raise ValueError(f"{name}: cell {k} differs from the first run's ({have[k].get('ppl')} "
                             f"vs {r.get('ppl')}); keep one of them")
    meta = dict(doc["meta"])
    meta["bits"] = list(dict.fromkeys(list(doc["meta"].get("bits", [])) +
                                      list(other["meta"].get("bits", []))))
    return {**doc, "meta": meta, "rows": rows}


def load_results(path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable results file ({e})") from None
    if doc.get("version") != RESULTS_VERSION or "rows" not in doc or "meta" not in doc:
        raise ValueError(f"{path}: not a sasq results file of version {RESULTS_VERSION}")
    return doc


def _fmt_ppl(x):
    if x is None or not np.isfinite(x):
        return "inf"
    return f"{x:.2f}" if x < 1e4 else f"{x:.3g}"


def _fmt_kl(x):
    return "-" if x is None else (f"{x:.4f}" if x < 10 else f"{x:.3g}")


def _fmt_top1(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def _windows_note(f: dict, seqlen) -> str:
    n, avail = f.get("n_windows", "?"), f.get("available_windows")
    capped = f" (first {n} of {avail}: capped)" if avail and avail != n else ""
    return f"{n} windows x {seqlen} tokens{capped}"


def _with_fp32(doc) -> list[dict]:
    """The rows plus an FP32 row per eval set from meta when the run left it out (a table
    always shows the reference it is measured against)."""
    rows = list(doc["rows"])
    have = {r["eval"] for r in rows if r["method"] == "fp32"}
    for e, f in (doc["meta"].get("fp32") or {}).items():
        if e not in have and f.get("ppl") is not None:
            rows.append({"method": "fp32", "label": "FP32", "bits": "-", "objective": "-",
                         "granularity": "-", "form": "-", "mode": "-", "weights": "-",
                         "trained_on": "-", "eval": e, "ppl": f["ppl"], "delta": None, "kl": 0.0,
                         "top1": 1.0, "n_windows": f.get("n_windows")})
    return rows


def _protocol_note(p: dict | None) -> str:
    if not p:
        return ""
    h = p.get("tokens_sha256") or p.get("text_sha256")
    kind = "tokens" if p.get("tokens_sha256") else "text"
    return (f"; corpus {p.get('corpus') or '?'} ({kind} sha256 {h[:12] if h else '?'}), "
            f"BOS {p.get('bos')}")


def _lines(rows, meta):
    """Group rows into table lines: (method, bits, objective, training split) -> {eval: row},
    in catalogue and bit-config order."""
    cells, order = {}, []
    for r in rows:  # the training split is part of a line's identity (merged tables)
        k = (r["method"], r["bits"], r["objective"], str(r.get("trained_on")))
        if k not in cells:
            cells[k] = {}
            order.append(k)
        cells[k][r["eval"]] = r
    method_rank = {m: i for i, m in enumerate(METHODS)}
    bits_rank = {b: i for i, b in enumerate(meta.get("bits", []))}
    order.sort(key=lambda k: (bits_rank.get(k[1], -1), method_rank.get(k[0], 99), k[2], k[3]))
    return [(k, cells[k]) for k in order]


def render_markdown(doc: dict) -> str:
    """One line per (method, bits, objective); per eval set PPL, delta, KL to FP32, top-1."""
    meta, rows = doc["meta"], _with_fp32(doc)
    evals = meta.get("evals", sorted({r["eval"] for r in rows}))
    fp32 = meta.get("fp32", {})
    ident = meta.get("identity", {})
    lines = [f"# sasq results: {meta.get('model_name', '?')}", ""]
    lines.append(f"- scales trained/calibrated on: **{meta.get('trained_on', '?')}**; "
                 f"steps {ident.get('steps')}, lr {ident.get('lr')}, "
                 f"batch {ident.get('batch')} x seqlen {meta.get('train_seqlen', meta.get('seqlen'))}")
    for e in evals:
        f = fp32.get(e, {})
        lines.append(f"- eval **{e}**: FP32 PPL {_fmt_ppl(f.get('ppl'))}, "
                     f"{_windows_note(f, meta.get('seqlen'))}"
                     f"{_protocol_note((meta.get('protocols') or {}).get(e))}")
    for x in meta.get("external", []):
        p = x.get("protocol") or {}
        lines.append(f"- external **{x['label']} {x['bits']}** on {x['eval']}: from {x.get('source')}"
                     + (f" (model {x['model']})" if x.get("model") else "")
                     + f", protocol checked: seqlen {p.get('seqlen')}, {p.get('n_windows')} windows"
                     + _protocol_note(p) + (f"; {x['note']}" if x.get("note") else "")
                     + (f"; its own FP32 PPL {_fmt_ppl(x['fp32_ppl'])}" if x.get("fp32_ppl") else ""))
    lines.append("- delta = PPL / FP32 PPL - 1; KL = mean per-token KL(FP32 || model) and top-1 = "
                 "agreement of the argmax with FP32, on the same windows (fidelity; a PPL below FP32 "
                 "is domain fit); 'form' says whether a per-channel number is deployable (folded)")
    lines.append("")
    head = ["method", "W/A", "weights", "granularity", "form", "static/dynamic", "objective",
            "trained on"]
    for e in evals:
        head += [f"PPL {e}", "delta", "KL", "top-1"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for _, c in _lines(rows, meta):
        r0 = next(iter(c.values()))
        line = [r0.get("label") or METHOD_LABELS.get(r0["method"], r0["method"]), r0["bits"], r0.get("weights", "-"),
                r0["granularity"], r0["form"], r0["mode"], r0["objective"], r0["trained_on"]]
        for e in evals:
            r = c.get(e)
            if r is None:
                line += ["", "", "", ""]
            else:
                d = r.get("delta")
                line += [_fmt_ppl(r["ppl"]), "-" if d is None else f"{d * 100:+.1f}%",
                         _fmt_kl(r.get("kl")), _fmt_top1(r.get("top1"))]
        lines.append("| " + " | ".join(line) + " |")
    lines.append("")
    lines.append(render_compact(doc))
    check = render_static_check(doc)
    if check:
        lines.append(check)
    return "\n".join(lines)


def render_static_check(doc: dict) -> str:
    """The fidelity bar of a table: each SASQ cell's KL against the best untrained static PTQ
    cell of the same bits and eval set ("" when the table has no such pair)."""
    best, sasq = {}, []
    for r in doc["rows"]:
        if r.get("kl") is None:
            continue
        k = (r["eval"], r["bits"])
        if r["method"] in STATIC_PTQ and (k not in best or r["kl"] < best[k]["kl"]):
            best[k] = r
        elif r["method"] in SASQ_ROWS:
            sasq.append(r)
    bits_rank = {b: i for i, b in enumerate(doc["meta"].get("bits", []))}
    rank = {m: i for i, m in enumerate(METHODS)}
    eval_rank = {e: i for i, e in enumerate(doc["meta"].get("evals", []))}
    pairs = sorted(((r, best[(r["eval"], r["bits"])]) for r in sasq if (r["eval"], r["bits"]) in best),
                   key=lambda p: (eval_rank.get(p[0]["eval"], 99), bits_rank.get(p[0]["bits"], 99),
                                  rank.get(p[0]["method"], 99), p[0]["objective"]))
    if not pairs:
        return ""
    ok = sum(r["kl"] <= b["kl"] for r, b in pairs)
    out = ["## SASQ against the best static PTQ row (KL to FP32, same bits and eval set)", "",
           f"{ok} of {len(pairs)} SASQ cells at or below it.", "",
           "| eval | W/A | SASQ row | obj | KL | best static PTQ | KL | SASQ vs it |",
           "|---|---|---|---|---|---|---|---|"]
    for r, b in pairs:
        rel = r["kl"] / b["kl"] - 1 if b["kl"] > 0 else float("inf")
        out.append(f"| {r['eval']} | {r['bits']} | {r.get('label') or METHOD_LABELS[r['method']]} | "
                   f"{r['objective']} | {_fmt_kl(r['kl'])} | "
                   f"{b.get('label') or METHOD_LABELS[b['method']]} | {_fmt_kl(b['kl'])} | "
                   f"{rel * 100:+.1f}%{'' if r['kl'] <= b['kl'] else ' (above)'} |")
    out.append("")
    return "\n".join(out)


def render_compact(doc: dict) -> str:
    """Per eval set, a pivot: one line per (method, objective, training split), one column per
    bit config, each cell "PPL / KL / top-1"."""
    meta, rows = doc["meta"], _with_fp32(doc)
    evals = meta.get("evals", sorted({r["eval"] for r in rows}))
    bits = list(meta.get("bits", []))
    if any(r["bits"] == "-" for r in rows):
        bits = ["-"] + bits
    rank = {m: i for i, m in enumerate(METHODS)}
    out = []
    for e in evals:
        lines_, labels = {}, {}
        for r in rows:
            if r["eval"] == e:
                lines_.setdefault((r["method"], r["objective"], r["trained_on"]), {})[r["bits"]] = r
                labels.setdefault(r["method"], r.get("label") or r["method"])  # external rows
        out += [f"## {e}: PPL / KL to FP32 / top-1 agreement", "",
                "| method | obj | trained on | " + " | ".join("no quant" if b == "-" else b
                                                           for b in bits) + " |",
                "|" + "---|" * (3 + len(bits))]
        for k in sorted(lines_, key=lambda k: (rank.get(k[0], 99), k[1], k[2])):
            cells = []
            for b in bits:
                r = lines_[k].get(b)
                cells.append("" if r is None else f"{_fmt_ppl(r['ppl'])} / {_fmt_kl(r.get('kl'))} / "
                                                  f"{_fmt_top1(r.get('top1'))}")
            label = METHOD_LABELS.get(k[0]) or labels[k[0]]
            wol = CATALOGUE[k[0]].weight_only_label if k[0] in CATALOGUE else None
            if wol and any(b.endswith("A16") for b in lines_[k]):
                label += f" (A16: {wol})"
            out.append(f"| {label} | {k[1]} | {k[2]} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)
