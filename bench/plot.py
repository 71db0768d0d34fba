"""Regenerates every benchmark figure from the committed raw results (matplotlib, Agg, PNG).

    python bench/plot.py                      # all figures into bench/results/figures/
    python bench/plot.py --e2e bench/results/e2e_cpu/e2e_<stamp>_summary.csv
    python bench/plot.py --results DIR --out DIR

| figure | from |
|---|---|
| ``e2e_speedup.png``: speedup over ``plain`` and over ``hf-assisted`` by category and method | the headline ``e2e_cpu/*_summary.csv``: greedy, batch 1, the most categories, then the newest (or ``--e2e``) |
| ``e2e_acceptance.png``: acceptance per draft position, per category and method | the same summary |
| ``e2e_code_modes.png``: speedup over ``plain`` on code, greedy batch 1 / sampling / batch > 1 | the newest summary of each mode that has code |
| ``gpu_tokens_vs_alpha.png``: loop tokens/s against alpha for several draft lengths, with the ceiling (dashed) and the baselines | ``gpu_e2e/*.csv`` except ``--tiny`` runs (or ``--gpu``) |
| ``ops_cpu.png``: verify ops per provider | ``ops_cpu.csv`` |
| ``tree_attention_cpu.png``: tree attention against SDPA | ``tree_attention_cpu.csv`` |
| ``kv_commit_cpu.png``: KV commit against the index copy | ``kv_commit_cpu.csv`` |

A figure whose input is missing is skipped with a message. The op files accumulate rows over
runs: each (case, provider) is drawn from its newest run (largest ``date``).
"""

import argparse
import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BENCH = Path(__file__).resolve().parent
PROVIDER_COLORS = {"specops-cpu": "tab:green", "specops-kernel": "tab:green",
                   "specops-reference": "tab:gray", "plain": "tab:gray"}


# Runs whose method names meant something else than they do now: {file stem: {recorded: now}}.
# e2e_20261127T085807Z ran Hybrid's comparison of drafters as "hybrid" (the default then) and
# the rule that is the default again since as "hybrid-lookup-first".
METHOD_RENAMES = {"e2e_20261127T085807Z_summary": {"hybrid": "hybrid-compare",
                                                   "hybrid-lookup-first": "hybrid"}}


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    renames = METHOD_RENAMES.get(path.stem, {})
    for r in rows:
        if "method" in r:
            r["method"] = renames.get(r["method"], r["method"])
    return rows


def number(text: str | None) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def newest(rows: list[dict], key) -> list[dict]:
    """For each ``key(row)``, the row of the latest ``date``."""
    best: dict = {}
    for row in rows:
        k = key(row)
        if k not in best or row["date"] >= best[k]["date"]:
            best[k] = row
    return list(best.values())


def grouped_bars(ax, groups: list[str], series: dict[str, list[float | None]], ylabel: str,
                 log: bool = False, colors: dict[str, str] | None = None) -> None:
    """Bars of ``series[name][i]`` at group ``i``, one colour per name."""
    colors = colors or PROVIDER_COLORS
    width = 0.8 / max(len(series), 1)
    for j, (name, values) in enumerate(series.items()):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))]
        ax.bar([x for x, v in zip(xs, values) if v is not None],
               [v for v in values if v is not None], width, label=name,
               color=colors.get(name))
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)


def save(fig, path: Path, written: list[Path]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    print(f"wrote {path}")


# --------------------------------------------------------------------------- end to end
def plot_e2e(summary: Path, out: Path, written: list[Path]) -> None:
    rows = read_csv(summary)
    categories = list(dict.fromkeys(r["category"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    label = {r["category"]: r.get("label") or r["category"] for r in rows}
    value = {(r["category"], r["method"]): r for r in rows}
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}  # one colour per method
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, column, baseline in ((axes[0], "speedup_vs_plain", "plain"),
                                 (axes[1], "speedup_vs_hf_assisted", "hf-assisted")):
        series = {m: [number(value.get((c, m), {}).get(column)) for c in categories]
                  for m in methods if m != baseline}
        grouped_bars(ax, [label[c] for c in categories], series, f"tokens/s / {baseline}",
                     colors=colors)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_title(f"speedup over {baseline} (geometric mean over prompts)", fontsize=9)
    axes[0].legend(fontsize=7, ncol=2)
    axes[1].legend(fontsize=7, ncol=2)   # it has "plain", which the left panel omits
    first = rows[0]
    fig.suptitle(f"{first.get('target', '')} / {first.get('draft', '')}, "
                 f"{first.get('max_new_tokens', '')} new tokens, batch {first.get('batch', '')}"
                 f"{', sampling' if first.get('sampling') == 'True' else ', greedy'}; "
                 f"{first.get('machine', '')}, {first.get('date', '')[:10]}", fontsize=9)
    save(fig, out / "e2e_speedup.png", written)

    fig, axes = plt.subplots(1, len(categories), figsize=(3.6 * len(categories), 3.4),
                             squeeze=False)
    for ax, category in zip(axes[0], categories):
        for m in methods:
            text = value.get((category, m), {}).get("acceptance_per_position") or ""
            points = [(i + 1, number(a)) for i, a in enumerate(text.split())]
            points = [(x, y) for x, y in points if y is not None]  # "-": never drafted
            if points:
                ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=m,
                        color=colors[m])
        ax.set_title(label[category], fontsize=9)
        ax.set_xlabel("draft position")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("acceptance (given earlier ones accepted)")
    axes[0][0].legend(fontsize=7)
    save(fig, out / "e2e_acceptance.png", written)


def summary_mode(rows: list[dict]) -> str:
    """``"greedy"``, ``"sampling"`` or ``"batch N"`` (greedy) of one summary's rows."""
    first = rows[0]
    if str(first.get("batch", "1")) not in ("", "1"):
        return f"batch {first['batch']}" + (", sampling" if first.get("sampling") == "True"
                                             else "")
    return "sampling" if first.get("sampling") == "True" else "greedy"


def headline_summary(paths: list[Path]) -> Path | None:
    """The greedy batch-1 summary with the most categories, then the most methods, newest
    among those (file names carry the UTC start time); a narrower or sampled run, or one of
    a few methods over every category (a focused comparison), never replaces it."""
    best, best_key = None, None
    for path in paths:
        rows = read_csv(path)
        if not rows or summary_mode(rows) != "greedy":
            continue
        key = (len({r["category"] for r in rows}), len({r["method"] for r in rows}),
               path.name)
        if best_key is None or key > best_key:
            best, best_key = path, key
    return best


def plot_code_modes(paths: list[Path], out: Path, written: list[Path]) -> None:
    """Speedup over plain on code for the newest summary of each mode (greedy batch 1,
    sampling, batch > 1), methods side by side; skipped with fewer than two modes."""
    newest_by_mode: dict[str, tuple[Path, list[dict]]] = {}
    for path in sorted(paths):                        # names sort by start time
        rows = [r for r in read_csv(path) if r["category"] == "code"]
        if rows:
            newest_by_mode[summary_mode(rows)] = (path, rows)
    if len(newest_by_mode) < 2:
        print("e2e_code_modes.png skipped: fewer than two code runs of different modes")
        return
    modes = sorted(newest_by_mode, key=lambda m: (m != "greedy", m))
    methods = list(dict.fromkeys(r["method"] for _, rows in newest_by_mode.values()
                                 for r in rows if r["method"] != "plain"))
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    value = {(mode, r["method"]): number(r["speedup_vs_plain"])
             for mode, (_, rows) in newest_by_mode.items() for r in rows}
    fig, ax = plt.subplots(figsize=(9, 4))
    groups = [f"{mode} ({newest_by_mode[mode][1][0].get('max_new_tokens', '?')} tokens)"
              for mode in modes]
    grouped_bars(ax, groups, {m: [value.get((mode, m)) for mode in modes] for m in methods},
                 "tokens/s / plain", colors=colors)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.legend(fontsize=7, ncol=2)
    first = next(iter(newest_by_mode.values()))[1][0]
    ax.set_title(f"code: speedup over plain decoding by mode (geometric mean over prompts); "
                 f"{first.get('machine', '')}", fontsize=9)
    save(fig, out / "e2e_code_modes.png", written)


# --------------------------------------------------------------------------- GPU loop
def plot_gpu(paths: list[Path], out: Path, written: list[Path]) -> None:
    rows = [dict(r, _file=p.name) for p in paths for r in read_csv(p)]
    # the synthetic drafter's rows (the agreeing draft model's have no alpha to plot against)
    rows = [r for r in rows if r["section"] != "loop" or r["method"] == "synthetic"]
    panels = sorted({(r["pair"], r["batch"], r["tiny"], r["machine"]) for r in rows
                     if r["section"] == "loop" and r["status"] == "ok"})
    if not panels:
        print("gpu_tokens_vs_alpha.png skipped: no measured loop rows in", *paths)
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (pair, batch, tiny, machine) in zip(axes[0], panels):
        mine = [r for r in rows if (r["pair"], r["batch"], r["tiny"], r["machine"]) ==
                (pair, batch, tiny, machine)]
        loop = [r for r in mine if r["section"] == "loop" and r["status"] == "ok"]
        lengths = sorted({int(r["g"]) for r in loop})
        shown = [g for g in lengths if g in (1, 2, 4, 8)] or lengths
        for i, g in enumerate(shown):
            points = sorted((float(r["alpha"]), float(r["tokens_per_s"]),
                             float(r["ceiling_tokens_per_s"])) for r in loop if int(r["g"]) == g)
            color = f"C{i}"
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=color,
                    label=f"g={g}")
            ax.plot([p[0] for p in points], [p[2] for p in points], "--", color=color, lw=1)
        baselines = [r for r in mine if r["section"] == "baseline" and r["status"] == "ok"]
        for j, r in enumerate(baselines):   # four baselines: a colour each, not black
            ax.axhline(float(r["tokens_per_s"]), color=f"C{len(shown) + j}", lw=1,
                       ls=[":", "-.", "-", (0, (3, 1, 1, 1, 1, 1))][j % 4], label=r["method"])
        ax.set_title(f"{pair}{' (tiny)' if tiny == 'True' else ''}, batch {batch}\n{machine}",
                     fontsize=9)
        ax.set_xlabel("alpha (synthetic drafter)")
        ax.set_ylabel("tokens/s (all rows)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="dashed: ceiling", title_fontsize=7)
    save(fig, out / "gpu_tokens_vs_alpha.png", written)


# --------------------------------------------------------------------------- op benchmarks
def plot_ops(path: Path, out: Path, written: list[Path]) -> None:
    rows = [r for r in read_csv(path) if number(r.get("median_us")) is not None]

    def case(r):
        size = f"K{r['K']}" if r.get("K") else f"T{r['T']}"
        return f"B{r['B']} {size} V{int(r['V']) // 1000}k {r['case']}"
    rows = newest(rows, lambda r: (r["op"], case(r), r["provider"]))
    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(len(ops), 1, figsize=(11, 3.3 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        mine = [r for r in rows if r["op"] == op]
        cases = list(dict.fromkeys(case(r) for r in mine))
        providers = list(dict.fromkeys(r["provider"] for r in mine))
        at = {(case(r), r["provider"]): number(r["median_us"]) for r in mine}
        grouped_bars(ax, cases, {p: [at.get((c, p)) for c in cases] for p in providers},
                     "median us per call (log)", log=True)
        ax.set_title(f"{op} ({mine[0]['machine']}, {mine[0]['device']})", fontsize=9)
        ax.legend(fontsize=7)
    save(fig, out / "ops_cpu.png", written)


def plot_tree_attention(path: Path, out: Path, written: list[Path]) -> None:
    rows = [r for r in read_csv(path) if number(r.get("median_us")) is not None]

    def case(r):
        return f"B{r['B']} T{r['T']} prefix {r['prefix']}"
    rows = newest(rows, lambda r: (case(r), r["dtype"], r["provider"]))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    fig, axes = plt.subplots(len(dtypes), 1, figsize=(13, 3.6 * len(dtypes)), squeeze=False)
    for ax, dtype in zip(axes[:, 0], dtypes):
        mine = [r for r in rows if r["dtype"] == dtype]
        cases = sorted(dict.fromkeys(case(r) for r in mine),
                       key=lambda c: [int(w.lstrip("BT")) for w in c.split() if w != "prefix"])
        providers = list(dict.fromkeys(r["provider"] for r in mine))
        at = {(case(r), r["provider"]): number(r["median_us"]) for r in mine}
        grouped_bars(ax, cases, {p: [at.get((c, p)) for c in cases] for p in providers},
                     "median us per call (log)", log=True)
        ax.set_title(f"tree_attention {dtype}, H={mine[0]['H']} Hkv={mine[0]['Hkv']} "
                     f"D={mine[0]['D']} ({mine[0]['machine']})", fontsize=9)
        ax.legend(fontsize=7)
    save(fig, out / "tree_attention_cpu.png", written)


def plot_kv_commit(path: Path, out: Path, written: list[Path]) -> None:
    rows = [r for r in read_csv(path) if number(r.get("median_us")) is not None]

    def case(r):
        return f"B{r['B']} T{r['T']} {r['dtype']}"
    rows = newest(rows, lambda r: (case(r), r["provider"]))
    cases = list(dict.fromkeys(case(r) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    at = {(case(r), r["provider"]): number(r["median_us"]) for r in rows}
    fig, ax = plt.subplots(figsize=(8, 3.8))
    grouped_bars(ax, cases, {p: [at.get((c, p)) for c in cases] for p in providers},
                 "median us per call (log)", log=True)
    first = rows[0]
    ax.set_title(f"kv_commit, {first['L']} layers x K/V, Hkv={first['Hkv']} D={first['D']} "
                 f"S={first['S']} ({first['machine']}, {first['num_threads']} thread(s))",
                 fontsize=9)
    ax.legend(fontsize=7)
    save(fig, out / "kv_commit_cpu.png", written)


# --------------------------------------------------------------------------- main
def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=BENCH / "results")
    p.add_argument("--out", type=Path, help="default: RESULTS/figures")
    p.add_argument("--e2e", type=Path,
                   help="the e2e summary CSV of the first two figures (default: the headline)")
    p.add_argument("--gpu", type=Path, nargs="*", help="GPU suite CSVs (default: all non-tiny)")
    args = p.parse_args(argv)
    out = args.out or args.results / "figures"
    written: list[Path] = []

    summaries = sorted((args.results / "e2e_cpu").glob("*_summary.csv"))
    summary = args.e2e or headline_summary(summaries)
    if summary is not None and summary.exists():
        plot_e2e(summary, out, written)
    else:
        print("e2e figures skipped: no greedy e2e_cpu/*_summary.csv (run bench/bench_e2e.py)")
    plot_code_modes(summaries, out, written)

    gpu = args.gpu if args.gpu is not None else sorted(
        f for f in (args.results / "gpu_e2e").glob("*.csv") if "_tiny_" not in f.name)
    if gpu:
        plot_gpu(gpu, out, written)
    else:
        print("gpu_tokens_vs_alpha.png skipped: no GPU results in gpu_e2e/ "
              "(run bench/bench_gpu_e2e.py on a GPU)")

    for name, plot in (("ops_cpu.csv", plot_ops), ("tree_attention_cpu.csv", plot_tree_attention),
                       ("kv_commit_cpu.csv", plot_kv_commit)):
        path = args.results / name
        if path.exists():
            plot(path, out, written)
        else:
            print(f"{name} figure skipped: {path} does not exist")
    return written


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
