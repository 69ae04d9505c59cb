"""Figures for a researcher's first look (matplotlib; optional: pip install 'sasq[plot]').

Every plot_* function writes one PNG and returns its path. Matplotlib's object interface is used
(no pyplot state, no backend switch), so the functions work headless and inside notebooks.

  plot_channel_ranges   per-channel absmax per site and layer (where the outlier channels are)
  plot_position_profile absmax per token position per site and layer (the attention sink)
  plot_truncation       a site's inputs before and after the soft-knee truncation, vs a clamp
  plot_scales           learned scales against their PTQ start, per site
  plot_bits             perplexity and KL against bit width, per method (external rows too)
  plot_loss             training loss curves (train and held-out)
  plot_run              all of them for a `sasq run` folder (python -m sasq plot RUN_DIR)

Inputs: results documents (sasq.results.load), ActivationStats (collect_activations: an
Observer hook on the FP model), QuantModels (scales, truncation knees, sink scales).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sasq.model import Observer

PLOT_SITES = ("attn_in", "o_in", "mlp_in", "down_in")
MISSING_MATPLOTLIB = ("sasq.plots needs matplotlib, an optional dependency: "
                      "pip install 'sasq[plot]' (or pip install matplotlib)")
DPI = 100
MAX_SAMPLE_ROWS = 4096  # rows kept per site for histograms


def _figure(w, h):
    """A matplotlib Figure not registered with pyplot (nothing global changes)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(MISSING_MATPLOTLIB) from None
    return Figure(figsize=(w, h), dpi=DPI, layout="constrained")


def _save(fig, path) -> Path:
    """The PNG as a 256-colour palette image: a third of the RGBA size, the same look for
    line plots and colormaps (which have 256 entries)."""
    import io
    from PIL import Image  # a matplotlib dependency
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    buf.seek(0)
    Image.open(buf).convert("RGB").quantize(colors=256).save(path, format="PNG", optimize=True)
    return path


def _site_colors():
    return {"attn_in": "tab:blue", "o_in": "tab:orange", "mlp_in": "tab:green", "down_in": "tab:red",
            "k_cache": "tab:purple", "v_cache": "tab:brown", "head_in": "tab:gray"}


# --------------------------------------------------------------------------- activation statistics

@dataclass
class ActivationStats:
    """Per (layer, site): per-channel absmax (C,), per-position absmax (T,) (max over windows
    and channels) and its mean over windows, and a sample of rows with their positions."""
    n_layers: int
    sites: tuple
    n_windows: int = 0
    seqlen: int = 0
    channel_absmax: dict = field(default_factory=dict)
    position_absmax: dict = field(default_factory=dict)
    position_mean: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)  # (layer, site) -> (rows (N, C), positions (N,))


class _Collector(Observer):
    def __init__(self, stats: ActivationStats, max_rows: int):
        self.s, self.max_rows = stats, max_rows

    def observe(self, layer, site, x, pos):
        k = (layer, site)
        if site not in self.s.sites:
            return
        a = np.abs(x)  # (B, T, C)
        ch, po = a.max(axis=(0, 1)), a.max(axis=2)  # (C,), (B, T)
        s = self.s
        s.channel_absmax[k] = ch if k not in s.channel_absmax else np.maximum(s.channel_absmax[k], ch)
        pm = po.max(axis=0)
        s.position_absmax[k] = pm if k not in s.position_absmax else np.maximum(s.position_absmax[k], pm)
        s.position_mean[k] = po.sum(axis=0) + s.position_mean.get(k, 0.0)
        rows, posn = s.samples.get(k, (np.empty((0, x.shape[2]), np.float32), np.empty(0, np.int64)))
        room = self.max_rows - rows.shape[0]
        if room > 0:
            B, T, C = x.shape
            take = x.reshape(B * T, C)[:room].astype(np.float32)
            p = np.tile(np.arange(pos, pos + T), B)[:room]
            s.samples[k] = (np.concatenate([rows, take]), np.concatenate([posn, p]))


def collect_activations(model, windows, sites=PLOT_SITES, batch_size: int = 4,
                        max_rows: int = MAX_SAMPLE_ROWS, progress: bool = False) -> ActivationStats:
    """Statistics of the FP model's activations at `sites` over token windows (n, T)."""
    from sasq.progress import bar
    wins = np.asarray(windows)
    if wins.ndim == 1:
        wins = wins[None]
    if wins.ndim != 2 or wins.shape[0] == 0:
        raise ValueError(f"windows must be token ids (n, T), got shape {wins.shape}")
    stats = ActivationStats(model.config.num_hidden_layers, tuple(sites), wins.shape[0], wins.shape[1])
    obs = _Collector(stats, max_rows)
    for b0 in bar(range(0, wins.shape[0], batch_size), desc="activations", disable=not progress):
        model.forward(wins[b0:b0 + batch_size], hook=obs, return_hidden=True)
    for k in stats.position_mean:
        stats.position_mean[k] = stats.position_mean[k] / wins.shape[0]
    return stats


# --------------------------------------------------------------------------- activations

def plot_channel_ranges(stats: ActivationStats, path, title: str = "") -> Path:
    """One heat map per site: layers (rows) x input channels (columns), log10 of the channel's
    absmax over the windows. Outlier channels show as bright vertical stripes."""
    from matplotlib.colors import LogNorm
    sites = [s for s in stats.sites if any((i, s) in stats.channel_absmax for i in range(stats.n_layers))]
    fig = _figure(11, 2.0 + 1.6 * len(sites))
    axes = fig.subplots(len(sites), 1, squeeze=False)[:, 0]
    for ax, s in zip(axes, sites):
        m = np.stack([stats.channel_absmax[(i, s)] for i in range(stats.n_layers)])  # (L, C)
        m = np.maximum(m, 1e-6)
        im = ax.imshow(m, aspect="auto", interpolation="nearest", cmap="magma",
                       norm=LogNorm(vmin=m.min(), vmax=m.max()))
        top = np.unravel_index(np.argmax(m), m.shape)
        ax.set_title(f"{s}: max {m.max():.3g} (layer {top[0]}, channel {top[1]}), "
                     f"median {np.median(m):.3g}", fontsize=9, loc="left")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, label="|x| max", pad=0.01)
    axes[-1].set_xlabel("input channel")
    fig.suptitle(title or f"per-channel activation range ({stats.n_windows} windows x {stats.seqlen} tokens)")
    return _save(fig, path)


def plot_position_profile(stats: ActivationStats, path, title: str = "") -> Path:
    """Per site: absmax over channels at each token position (max over windows, solid; mean,
    dotted), one line per layer. A sink shows as a spike at position 0 (or 0..k)."""
    from matplotlib import colormaps
    sites = [s for s in stats.sites if (0, s) in stats.position_absmax]
    fig = _figure(11, 3.0 * math.ceil(len(sites) / 2))
    axes = fig.subplots(math.ceil(len(sites) / 2), 2, squeeze=False).ravel()
    cmap = colormaps["viridis"]
    for ax, s in zip(axes, sites):
        peak = []
        for i in range(stats.n_layers):
            c = cmap(i / max(1, stats.n_layers - 1))
            pm = stats.position_absmax[(i, s)]
            ax.plot(np.arange(len(pm)), pm, color=c, lw=1, label=f"layer {i}" if i in (0, stats.n_layers - 1) else None)
            ax.plot(np.arange(len(pm)), stats.position_mean[(i, s)], color=c, lw=0.8, ls=":")
            peak.append((pm[0] / max(np.median(pm[1:]), 1e-12) if len(pm) > 1 else 1.0, i))
        ratio, layer = max(peak)
        ax.set_yscale("log")
        ax.set_title(f"{s}: position 0 / median other = {ratio:.1f}x (layer {layer})", fontsize=9, loc="left")
        ax.set_xlabel("token position")
        ax.set_ylabel("max |x| over channels")
        ax.legend(fontsize=7, loc="upper right")
    for ax in axes[len(sites):]:
        ax.set_visible(False)
    fig.suptitle(title or f"position profile: the attention sink ({stats.n_windows} windows; "
                          f"solid max, dotted mean over windows)")
    return _save(fig, path)


def site_inputs(qmodel, windows, key: str):
    """(x (N, C) as it reaches the site's quantizer in the deployed fake-quant model, sink rows
    left out; the Site). For a folded site x is already divided by its scale (the fold)."""
    from sasq.model import ActivationHook

    site = qmodel.site_of(key)
    target = (site.layer, site.name)
    got = []

    class Recorder(ActivationHook):
        def forward(self, layer, name, x, pos, keep):
            if (layer, name) == target:
                k = max(0, site.sink - pos)
                got.append(np.array(x[:, k:], dtype=np.float32).reshape(-1, x.shape[-1]))
            return qmodel.hook.forward(layer, name, x, pos, keep)

    qmodel._check_ready()
    wins = np.asarray(windows)
    for b0 in range(0, wins.shape[0], 4):
        qmodel.deploy.forward(wins[b0:b0 + 4], hook=Recorder(), return_hidden=True)
    return np.concatenate(got), site


def plot_truncation(x, threshold, ceiling, path, title: str = "", bits: int | None = None) -> Path:
    """Histogram of x / c before and after the soft-knee truncation (sasq.ops.truncate with
    threshold t and ceiling c, scalars or per channel), and after a hard clamp at c. The knee
    at t/c leaves the bulk untouched; values beyond the range are compressed into [t, c] in
    order instead of all landing on c."""
    from sasq import ops
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(-1, np.shape(x)[-1]))
    t = np.asarray(threshold, dtype=np.float32)
    c = np.asarray(ceiling, dtype=np.float32)
    y = ops.truncate(x, t if t.ndim else float(t), c if c.ndim else float(c))
    cc = np.broadcast_to(c, x.shape[-1:])
    u, v = x / cc, y / cc
    w = np.clip(u, -1.0, 1.0)
    knee = float(np.median(np.broadcast_to(t, x.shape[-1:]) / cc))
    lim = max(1.05, float(np.abs(u).max()) * 1.02)
    bins = np.linspace(-lim, lim, 161)
    fig = _figure(13, 4.2)
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.8, 1]})
    ax.hist(u.ravel(), bins=bins, color="0.7", label=f"before (max |x|/c = {np.abs(u).max():.2f})")
    ax.hist(w.ravel(), bins=bins, histtype="step", lw=2.5, alpha=0.7, color="tab:orange",
            label="hard clamp at c")
    ax.hist(v.ravel(), bins=bins, histtype="step", lw=1.5, color="tab:blue", label="after truncation")
    for sgn in (-1, 1):
        ax.axvline(sgn * 1.0, color="k", lw=0.8, ls="--")
        ax.axvline(sgn * knee, color="tab:blue", lw=0.8, ls=":")
    ax.set_yscale("log")
    beyond = float(np.mean(np.abs(u) > 1.0))
    ax.set_xlabel("x / c   (c = s * qmax: the quantizer's range; dotted: median knee t / c)")
    ax.set_ylabel("count")
    ax.set_title(title or "truncation", fontsize=10, loc="left")
    ax.text(0.01, 0.97, f"{100 * beyond:.3f}% of values beyond the range"
            + (f"; {bits}-bit grid" if bits else ""), transform=ax.transAxes, va="top", fontsize=8)
    ax.legend(fontsize=8, loc="upper right")
    # The map itself for the channel with the median knee, with this site's values on it.
    j = int(np.argsort(np.broadcast_to(t, x.shape[-1:]) / cc)[x.shape[-1] // 2])
    tj, cj = float(np.broadcast_to(t, cc.shape)[j]), float(cc[j])
    grid = np.linspace(-lim, lim, 801, dtype=np.float32) * cj
    yg = ops.truncate(np.ascontiguousarray(grid[None]), tj, cj)[0]
    ax2.plot(grid / cj, grid / cj, color="0.6", lw=0.8, ls=":", label="identity")
    ax2.plot(grid / cj, np.clip(grid, -cj, cj) / cj, color="tab:orange", lw=2.5, alpha=0.7,
             label="hard clamp")
    ax2.plot(grid / cj, yg / cj, color="tab:blue", lw=1.5, label=f"truncation (t/c = {tj / cj:.3f})")
    ax2.plot(u[:, j], v[:, j], "k.", ms=3, label=f"channel {j} values")
    ax2.set_xlabel("x / c")
    ax2.set_ylabel("output / c")
    ax2.set_title(f"the map, channel {j} (median knee)", fontsize=9, loc="left")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def pick_truncation_site(qmodel, windows) -> str:
    """The site key whose inputs reach furthest beyond the quantizer's range (the most visible
    truncation); only sites with truncation."""
    best = None
    for s in qmodel.site_list():
        if not s.truncation:
            continue
        x, _ = site_inputs(qmodel, windows[:2], s.key)
        r = float(np.max(np.abs(x) / np.broadcast_to(s.c, x.shape[-1:])))
        if best is None or r > best[0]:
            best = (r, s.key)
    if best is None:
        raise ValueError(f"{qmodel.plan.label} has no truncation")
    return best[1]


# --------------------------------------------------------------------------- scales

def scale_table(qmodel) -> dict[str, np.ndarray]:
    """Site key -> scales (unfolded domain, sasq.quant.QuantModel.scales), plus
    "<key>.sink" -> sink-row scales and "<key>.knee" -> t / c (truncation) when present."""
    out = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in qmodel.scales().items()}
    out.update({f"{k}.sink": np.asarray(v, np.float64).reshape(-1) for k, v in qmodel.sink_scales().items()})
    for s in qmodel.site_list():
        if s.truncation and s.sig is not None:
            out[f"{s.key}.knee"] = np.asarray(s.sig, np.float64).reshape(-1)
    return out


def plot_scales(learned, start, path, title: str = "") -> Path:
    """Learned scales (y) against their PTQ start (x), per site type, log-log with y = x; and
    the distribution of log2(learned / start). `learned`/`start`: QuantModels or scale_table
    dicts with the same keys."""
    L = learned if isinstance(learned, dict) else scale_table(learned)
    S = start if isinstance(start, dict) else scale_table(start)
    keys = [k for k in L if k in S and not k.endswith(".knee")]
    if not keys:
        raise ValueError("no common scale keys between learned and start")
    colors = _site_colors()
    fig = _figure(12, 4.6)
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
    groups: dict = {}
    for k in keys:
        name = k.split(".")[2] if k.startswith("layers.") else k.split(".")[0]
        grp = name + (" sink rows" if k.endswith(".sink") else "")
        a, b = S[k], L[k]
        if a.shape != b.shape:
            raise ValueError(f"{k}: learned {b.shape} vs start {a.shape}")
        g = groups.setdefault(grp, ([], [], colors.get(name, "k"), "x" if k.endswith(".sink") else "o"))
        g[0].append(a)
        g[1].append(b)
    lo, hi = np.inf, 0.0
    for grp, (a, b, c, mk) in sorted(groups.items()):
        a, b = np.concatenate(a), np.concatenate(b)
        lo, hi = min(lo, a.min(), b.min()), max(hi, a.max(), b.max())
        ax.scatter(a, b, s=8 if mk == "o" else 30, c=c, marker=mk, alpha=0.6, label=f"{grp} ({a.size})")
        r = np.log2(b / a)
        ax2.hist(r, bins=60, histtype="step", color=c, ls="-" if mk == "o" else "--",
                 label=f"{grp}: median {np.median(r):+.2f}")
    ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("PTQ start scale")
    ax.set_ylabel("learned scale")
    ax.legend(fontsize=7)
    ax2.axvline(0, color="k", lw=0.8)
    ax2.set_xlabel("log2(learned / start)   (< 0: range tightened, more clipping)")
    ax2.set_ylabel("count")
    ax2.legend(fontsize=7)
    kn = [k for k in L if k.endswith(".knee")]
    if kn:
        knees = np.concatenate([L[k] for k in kn])
        ax2.set_title(f"truncation knee t/c: median {np.median(knees):.3f} "
                      f"(range {knees.min():.3f}..{knees.max():.3f})", fontsize=9, loc="left")
    fig.suptitle(title or "learned scales vs their PTQ start")
    return _save(fig, path)


# --------------------------------------------------------------------------- results

def _line_key(r):
    return (r["method"], r.get("objective", "-"), r.get("trained_on", "-"))


def plot_bits(doc: dict, path, eval_name: str | None = None, title: str = "") -> Path:
    """Perplexity (left) and KL(FP32 || model) (right) against the bit configuration, one line
    per (method, objective) on one evaluation set; FP32 as a dashed line, external rows as stars."""
    from sasq.methods import METHOD_LABELS, METHODS
    meta = doc["meta"]
    evals = meta.get("evals") or sorted({r["eval"] for r in doc["rows"]})
    e = eval_name or evals[0]
    if e not in evals and e not in {r["eval"] for r in doc["rows"]}:
        raise ValueError(f"no evaluation set {e!r}; choose from {', '.join(evals)}")
    rows = [r for r in doc["rows"] if r["eval"] == e and r["bits"] != "-"]
    if not rows:
        raise ValueError(f"no quantized rows on {e!r} to plot")
    bits = [b for b in meta.get("bits", []) if any(r["bits"] == b for r in rows)]
    bits += sorted({r["bits"] for r in rows} - set(bits))
    xpos = {b: i for i, b in enumerate(bits)}
    lines: dict = {}
    for r in rows:
        lines.setdefault(_line_key(r), {})[r["bits"]] = r
    rank = {m: i for i, m in enumerate(METHODS)}
    fig = _figure(13, 4.8)
    ax_p, ax_k = fig.subplots(1, 2)
    from matplotlib import colormaps
    cmap = colormaps["tab20"]
    for j, k in enumerate(sorted(lines, key=lambda k: (rank.get(k[0], 99), k[1], k[2]))):
        cells = lines[k]
        r0 = next(iter(cells.values()))
        ext = bool(r0.get("external"))
        label = METHOD_LABELS.get(k[0]) or r0.get("label") or k[0]
        if k[1] not in ("-", None):
            label += f" ({k[1]})"
        xs = [xpos[b] for b in bits if b in cells]
        style = dict(color=cmap(j % 20), marker="*" if ext else "o", ms=10 if ext else 4,
                     ls="none" if ext else ("--" if r0.get("mode") == "dynamic" else "-"), lw=1.2)
        ax_p.plot(xs, [cells[b]["ppl"] for b in bits if b in cells], label=label, **style)
        kl = [(xpos[b], cells[b].get("kl")) for b in bits if b in cells and cells[b].get("kl") is not None]
        if kl:
            ax_k.plot([p for p, _ in kl], [max(v, 1e-6) for _, v in kl], label=label, **style)
    fp = (meta.get("fp32") or {}).get(e, {}).get("ppl")
    if fp:
        ax_p.axhline(fp, color="k", ls="--", lw=1, label=f"FP32 {fp:.3g}")
    for ax, yl in ((ax_p, "perplexity"), (ax_k, "KL(FP32 || model) per token")):
        ax.set_xticks(range(len(bits)))
        ax.set_xticklabels(bits)
        ax.set_yscale("log")
        ax.set_ylabel(yl)
        ax.set_xlabel("bit configuration (weights / activations)")
        ax.grid(alpha=0.3, which="both")
    ax_k.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    n = (meta.get("fp32") or {}).get(e, {}).get("n_windows")
    fig.suptitle(title or f"{meta.get('model_name', '')}: {e}"
                 + (f" ({n} windows x {meta.get('seqlen')})" if n else ""))
    return _save(fig, path)


def loss_curves(doc: dict | None = None, run_dir=None) -> list[dict]:
    """Training curves {"label", "objective", "history" [[step, loss]], "val_history"
    [[step, val]], "done"} from results rows (one per trained cell) and, with run_dir, from
    checkpoints of cells not in the results yet (training in progress)."""
    from sasq.methods import METHOD_LABELS
    curves, seen = [], set()
    for r in (doc or {}).get("rows", []):
        if not r.get("history"):
            continue
        k = (r["method"], r["bits"], r["objective"])
        if k in seen:
            continue
        seen.add(k)
        curves.append({"label": f"{METHOD_LABELS.get(r['method'], r['method'])} {r['bits']}",
                       "objective": r["objective"],
                       "select": (r.get("recipe") or {}).get("select") or r["objective"],
                       "history": r["history"],
                       "val_history": r.get("val_history") or [], "done": True})
    if run_dir is not None:
        from sasq.optim import load_checkpoint
        from sasq.runs import checkpoints, parse_cell
        for ck in checkpoints(run_dir):
            try:
                key, bits, obj = parse_cell(ck)
                st, _ = load_checkpoint(ck)
            except ValueError:
                continue
            if (key, bits, obj) in seen or not st.get("history"):
                continue
            seen.add((key, bits, obj))
            curves.append({"label": f"{METHOD_LABELS.get(key, key)} {bits} (in progress)",
                           "objective": obj,
                           "select": (st.get("config") or {}).get("select") or obj,
                           "history": [[h["step"], h["loss"]] for h in st["history"]],
                           "val_history": [[h["step"], h["val"]] for h in st.get("val_history", [])],
                           "done": False})
    return curves


def plot_loss(curves: list[dict], path, title: str = "") -> Path:
    """One panel per objective: per-step training loss (thin) with its running mean (thick) and
    the held-out loss (markers, dashed), one color per trained cell."""
    if not curves:
        raise ValueError("no training curves (no trained cells in these results)")
    from matplotlib import colormaps
    objs = sorted({c["objective"] for c in curves})
    fig = _figure(6.5 * len(objs), 4.6)
    axes = fig.subplots(1, len(objs), squeeze=False)[0]
    cmap = colormaps["tab10"]
    for ax, o in zip(axes, objs):
        # held-out losses of another kind (CE training selected on held-out KL): own axis
        other = sorted({c.get("select", o) for c in curves if c["objective"] == o} - {o})
        vax = ax.twinx() if other else ax
        for j, c in enumerate(x for x in curves if x["objective"] == o):
            col = cmap(j % 10)
            h = np.asarray(c["history"], dtype=np.float64).reshape(-1, 2)
            if h.size:
                ax.plot(h[:, 0], h[:, 1], color=col, lw=0.6, alpha=0.35)
                ema, acc = np.empty(len(h)), None
                for i, v in enumerate(h[:, 1]):
                    acc = v if acc is None else 0.9 * acc + 0.1 * v
                    ema[i] = acc
                ax.plot(h[:, 0], ema, color=col, lw=1.6, label=c["label"])
            v = np.asarray(c["val_history"], dtype=np.float64).reshape(-1, 2)
            if v.size:
                (vax if c.get("select", o) != o else ax).plot(v[:, 0], v[:, 1], color=col,
                                                               marker="o", ms=4, ls="--", lw=1)
        if other:
            vax.set_ylabel(f"held-out {', '.join(x.upper() for x in other)} (dashed; picks the "
                           f"kept parameters)")
        ax.set_xlabel("step")
        if o == "kl":
            ax.set_yscale("log")  # cells of different bit widths differ by orders of magnitude
        ax.set_ylabel({"ce": "next-token cross-entropy", "kl": "KL(FP32 || model)"}.get(o, o))
        ax.set_title(f"objective {o} (thin: per step, thick: running mean, dashed: held-out)",
                     fontsize=9, loc="left")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or "training loss")
    return _save(fig, path)


# --------------------------------------------------------------------------- a run folder

PLOTS = ("bits", "loss", "channels", "positions", "truncation", "scales")
FILES = {"bits": "ppl_kl_vs_bits.png", "loss": "loss_curves.png", "channels": "channel_ranges.png",
         "positions": "position_profile.png", "truncation": "truncation_hist.png",
         "scales": "scales_vs_start.png"}


def _pick_cell(doc, run_dir, cell, need_trunc=False):
    """The checkpoint of a trained cell to show: `cell` ("method:bits:objective"), else a
    finished SASQ cell (truncation first), fewest activation bits, KL objective first."""
    from sasq.methods import parse_bits
    from sasq.runs import checkpoints, parse_cell
    cks = {parse_cell(c): c for c in checkpoints(run_dir)}
    if cell:
        parts = tuple(cell.split(":"))
        if len(parts) != 3 or parts not in cks:
            have = ", ".join(":".join(k) for k in cks) or "none"
            raise ValueError(f"no checkpoint for cell {cell!r} (method:bits:objective); have {have}")
        return cks[parts]
    done = {(r["method"], r["bits"], r["objective"]) for r in doc["rows"]}
    cands = [k for k in cks if k in done and k[0].startswith("sasq") and k[1] != "-"
             and (not need_trunc or "trunc" in k[0])]
    if not cands:
        return None
    cands.sort(key=lambda k: ("trunc" not in k[0], parse_bits(k[1])[1], parse_bits(k[1])[0], k[2] != "kl"))
    return cks[cands[0]]


def plot_run(run_dir, out_dir=None, which=PLOTS, eval_name: str | None = None, external=(),
             cell: str | None = None, windows: int = 8, log=print) -> list[Path]:
    """The figures of a `sasq run` folder (FILES) into out_dir (default RUN_DIR/figures).
    bits/loss need only results.json; the others load the run's model and its calibration
    windows (and a trained cell's checkpoint for truncation/scales)."""
    from sasq.results import merge
    from sasq.runs import load_run, quant_from_checkpoint, run_data, run_model, start_state
    bad = set(which) - set(PLOTS)
    if bad:
        raise ValueError(f"unknown plot(s) {', '.join(sorted(bad))}; choose from {', '.join(PLOTS)}")
    _figure(1, 1)  # a missing matplotlib fails here, before any work
    run_dir = Path(run_dir)
    doc = load_run(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "figures"
    name = doc["meta"].get("model_name", "")
    written = []
    if "bits" in which:
        d = doc
        for ext in external:
            d = merge(d, ext)
        written.append(plot_bits(d, out / FILES["bits"], eval_name))
    if "loss" in which:
        curves = loss_curves(doc, run_dir)
        if curves:
            written.append(plot_loss(curves, out / FILES["loss"], title=f"{name}: training loss"))
        else:
            log("loss: no trained cells in this run, skipped")
    rest = [w for w in which if w in ("channels", "positions", "truncation", "scales")]
    if not rest:
        return written
    model = run_model(doc)
    data = run_data(doc, model, run_dir)
    calib = data.calib[:windows]
    if "channels" in rest or "positions" in rest:
        stats = collect_activations(model, calib)
        if "channels" in rest:
            written.append(plot_channel_ranges(stats, out / FILES["channels"],
                                               f"{name}: per-channel |x| max ({stats.n_windows} calibration "
                                               f"windows x {stats.seqlen})"))
        if "positions" in rest:
            written.append(plot_position_profile(stats, out / FILES["positions"],
                                                 f"{name}: |x| max per token position ({stats.n_windows} "
                                                 f"windows; solid max, dotted mean)"))
    for what in ("truncation", "scales"):
        if what not in rest:
            continue
        ck = _pick_cell(doc, run_dir, cell, need_trunc=what == "truncation")
        if ck is None:
            log(f"{what}: no finished SASQ{' + truncation' if what == 'truncation' else ''} "
                f"checkpoint in {run_dir / 'checkpoints'}, skipped")
            continue
        qm, (key, bits, obj), _ = quant_from_checkpoint(model, ck, calib=data.calib)
        row = next((r for r in doc["rows"] if (r["method"], r["bits"], r["objective"]) == (key, bits, obj)), {})
        label = f"{row.get('label', key)} {bits} ({obj})"
        if what == "truncation":
            if not qm.plan.truncation:
                log(f"truncation: {label} has no truncation, skipped")
                continue
            site = pick_truncation_site(qm, calib)
            x, s = site_inputs(qm, calib, site)
            written.append(plot_truncation(x, s.t, s.c, out / FILES["truncation"],
                                           f"{name}, {label}: {site} (trained knee), sink rows left out",
                                           bits=s.bits))
        else:
            learned = scale_table(qm)
            start = _loaded(qm, start_state(qm, data.calib, row.get("start")))
            written.append(plot_scales(learned, start, out / FILES["scales"],
                                       f"{name}, {label}: learned scales vs PTQ start "
                                       f"({row.get('start') or 'absmax-mean'})"))
    return written


def _loaded(qm, state):
    """A copy of qm's site values with `state` loaded (qm itself unchanged)."""
    keep = qm.state_dict()
    qm.load_state_dict(state)
    try:
        return scale_table(qm)
    finally:
        qm.load_state_dict(keep)
