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
from sasq.methods import METHOD_LABELS, METHODS

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
            old = load_results(self.json_path)
            if old["meta"].get("identity") != meta.get("identity"):
                a, b = old["meta"].get("identity", {}), meta.get("identity", {})
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                raise ValueError(f"{self.json_path} holds results of different settings "
                                 f"({', '.join(diff)}); use another --out")
            self.rows = old["rows"]
            self.meta = {**old["meta"], **meta}

    def keys(self) -> set[str]:
        return {row_key(r) for r in self.rows}

    def has_cell(self, method, bits, objective, evals) -> bool:
        ks = self.keys()
        return all(cell_key(method, bits, objective) + "|" + e in ks for e in evals)

    def add(self, rows: list[dict]) -> None:
        have = self.keys()
        self.rows.extend(r for r in rows if row_key(r) not in have)
        self.save()

    def save(self) -> None:
        doc = {"version": RESULTS_VERSION, "meta": self.meta, "rows": self.rows}
        _atomic_write_text(self.json_path, json.dumps(doc, indent=1, sort_keys=False) + "\n")
        _atomic_write_text(self.md_path, render_markdown(doc))


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


def render_markdown(doc: dict) -> str:
    """One line per (method, bits, objective); the eval sets side by side."""
    meta, rows = doc["meta"], doc["rows"]
    evals = meta.get("evals", sorted({r["eval"] for r in rows}))
    fp32 = meta.get("fp32", {})
    lines = [f"# sasq results: {meta.get('model_name', '?')}", ""]
    lines.append(f"- scales trained/calibrated on: **{meta.get('trained_on', '?')}**; "
                 f"steps {meta.get('identity', {}).get('steps')}, lr {meta.get('identity', {}).get('lr')}, "
                 f"batch {meta.get('identity', {}).get('batch')} x seqlen {meta.get('seqlen')}")
    for e in evals:
        f = fp32.get(e, {})
        lines.append(f"- eval **{e}**: FP32 PPL {_fmt_ppl(f.get('ppl'))}, "
                     f"{f.get('n_windows', '?')} windows x {meta.get('seqlen')} tokens")
    lines.append("- delta = PPL / FP32 PPL - 1 on the same eval set; 'form' says whether a per-channel "
                 "number is deployable (folded) or not")
    lines.append("")
    head = ["method", "W/A", "granularity", "form", "static/dynamic", "objective", "trained on"]
    for e in evals:
        head += [f"PPL {e}", "delta"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    cells: dict = {}
    order = []
    for r in rows:  # the training split is part of a line's identity (merged tables)
        k = cell_key(r["method"], r["bits"], r["objective"]) + "|" + str(r.get("trained_on"))
        if k not in cells:
            cells[k] = {}
            order.append(k)
        cells[k][r["eval"]] = r
    method_rank = {m: i for i, m in enumerate(METHODS)}
    bits_rank = {b: i for i, b in enumerate(meta.get("bits", []))}
    order.sort(key=lambda k: (bits_rank.get(k.split("|")[1], -1), method_rank.get(k.split("|")[0], 99),
                              k.split("|")[2], k.split("|", 3)[3]))
    for k in order:
        c = cells[k]
        r0 = next(iter(c.values()))
        line = [METHOD_LABELS.get(r0["method"], r0["method"]), r0["bits"], r0["granularity"], r0["form"],
                r0["mode"], r0["objective"], r0["trained_on"]]
        for e in evals:
            r = c.get(e)
            if r is None:
                line += ["", ""]
            else:
                d = r.get("delta")
                line += [_fmt_ppl(r["ppl"]), "-" if d is None else f"{d * 100:+.1f}%"]
        lines.append("| " + " | ".join(line) + " |")
    lines.append("")
    lines.append(f"## Compact view (cells: PPL on {' / '.join(evals)})")
    lines.append("")
    lines.append(render_compact(doc))
    return "\n".join(lines)


def render_compact(doc: dict) -> str:
    """Pivot: one line per (method, objective, training split), one column per bit config,
    each cell "PPL eval-1 / PPL eval-2 / ..." in the order of meta["evals"]."""
    meta, rows = doc["meta"], doc["rows"]
    evals = meta.get("evals", sorted({r["eval"] for r in rows}))
    bits = list(meta.get("bits", []))
    if any(r["bits"] == "-" for r in rows):
        bits = ["-"] + bits
    lines_ = {}
    for r in rows:
        k = (r["method"], r["objective"], r["trained_on"])
        lines_.setdefault(k, {}).setdefault(r["bits"], {})[r["eval"]] = r["ppl"]
    rank = {m: i for i, m in enumerate(METHODS)}
    out = ["| method | obj | trained on | " + " | ".join("no quant" if b == "-" else b for b in bits) + " |",
           "|" + "---|" * (3 + len(bits))]
    for k in sorted(lines_, key=lambda k: (rank.get(k[0], 99), k[1], k[2])):
        cells = []
        for b in bits:
            c = lines_[k].get(b)
            cells.append("" if c is None else " / ".join(_fmt_ppl(c.get(e)) for e in evals))
        out.append(f"| {METHOD_LABELS.get(k[0], k[0])} | {k[1]} | {k[2]} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"
