"""The reader's two backends side by side in `nchunk bench io`: thread pool and io_uring, same reads.

For chunking + reorder on the bundled store at a few sparsities, every test frame's selection of
every matrix is read twice, cold (direct I/O, rows checked as the runtime does), once through each
backend with the same number of reads in flight, one right after the other, in alternating order over
frames and matrices, so drift, a drive cache or the shared machine favour neither. Ratios are medians of
the paired ratios. Convention, here and in `bench reader`: io_uring_vs_threads = the thread pool's
time ÷ io_uring's time (io_uring's throughput ÷ the thread pool's); above 1, io_uring is faster.
"""
from __future__ import annotations

import numpy as np

from nchunk_core.io.reader import Reader, io_uring_unavailable
from nchunk_core.runtime.layers import read_runs
from nchunk_core.runtime.select import select

SPARSITIES = [0.0, 0.3, 0.5, 0.7]
BACKENDS = ("threads", "io_uring")


def selection_reads(threads: int, mats: dict, names: list, test_v: dict, perms: dict, frames: int, buf,
                    method: str = "chunking", progress: bool = True) -> dict:
    """I/O time per frame of the same selections through each backend (see the module docstring)."""
    from tqdm import tqdm

    note = io_uring_unavailable()
    out = {"label": f"{method} + reorder (bundled)", "threads": threads, "available": not note, "note": note,
           "points": [], "io_uring_vs_threads": None}
    if note:
        return out
    ratios = []
    with Reader(threads=threads, backend="threads") as pool, Reader(threads=threads, backend="io_uring") as ring:
        readers = {"threads": pool, "io_uring": ring}
        for s in tqdm(SPARSITIES, desc="bench io: threads vs io_uring", disable=not progress):
            per_frame = {b: [] for b in BACKENDS}
            paired = []
            for f in range(frames):
                t = dict.fromkeys(BACKENDS, 0.0)
                for k, key in enumerate(names):
                    m = mats[key]
                    imp = test_v[key][f][perms[key]]  # stored order of a hot–cold store
                    sel = select(imp, m.rows - int(round(s * m.rows)), method, m.table, m.row_bytes)
                    pair = {}
                    for b in (BACKENDS if (f + k) % 2 == 0 else BACKENDS[::-1]):
                        pair[b] = read_runs(readers[b], m.handles, m.groups, sel.runs, buf)
                        t[b] += pair[b]
                    paired.append(pair["threads"] / pair["io_uring"])
                for b in BACKENDS:
                    per_frame[b].append(t[b])
            ratios.extend(paired)
            out["points"].append({"sparsity": s, "io_ms_threads": float(np.median(per_frame["threads"])) * 1e3,
                                  "io_ms_io_uring": float(np.median(per_frame["io_uring"])) * 1e3,
                                  "io_uring_vs_threads": float(np.median(paired)), "ratio_pairs": paired})
    out["io_uring_vs_threads"] = float(np.median(ratios))
    return out


def format_lines(res: dict) -> list[str]:
    """The table's section on the backends."""
    if not res["available"]:
        return [f"reader backends: io_uring unavailable ({res['note']}); only the thread pool measured"]
    lines = [f"reader backends, {res['label']}, {res['threads']} reads in flight, interleaved: I/O time per frame",
             f"{'sparsity':>10}{'threads ms':>12}{'io_uring ms':>13}{'io_uring_vs_threads':>21}"]
    for p in res["points"]:
        lines.append(f"{p['sparsity']:>10.1f}{p['io_ms_threads']:>12.1f}{p['io_ms_io_uring']:>13.1f}"
                     f"{p['io_uring_vs_threads']:>21.3f}")
    v = res["io_uring_vs_threads"]
    lines.append(f"io_uring_vs_threads: {v:.3f} (median of paired ratios; above 1: io_uring faster) -> "
                 f"{'io_uring' if v > 1 else 'threads'} is faster on these reads")
    return lines


def plot(res: dict, path) -> None:
    """PNG: I/O time per frame against sparsity for both backends, and the paired ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    pts = res["points"]
    s = [p["sparsity"] for p in pts]
    a.plot(s, [p["io_ms_threads"] for p in pts], "o-", label="thread pool")
    a.plot(s, [p["io_ms_io_uring"] for p in pts], "s-", label="io_uring")
    a.set(xlabel="sparsity", ylabel="I/O time per frame (ms, median)", title=res["label"])
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    b.boxplot([p["ratio_pairs"] for p in pts])
    b.set_xticks(range(1, len(s) + 1), [f"{x:.1f}" for x in s])
    b.axhline(1.0, color="k", lw=0.8, ls=":")
    b.set(xlabel="sparsity", ylabel="thread pool time ÷ io_uring time",
          title=f"paired ratios (median {res['io_uring_vs_threads']:.3f}; > 1: io_uring faster)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
