"""A run's report, drawn from its results.json: the end-of-run table, and the figures: dev loss and accuracy against
forward passes (curves.png), the divergence of each attention matrix (divergence.png), DiZO's projection phases
(projection.png)."""
import math

import torch

from runs import write_atomically


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # the file-only backend: no display needed
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, margins=None):
    """Writes the figure; `margins` (left, right, bottom, top) in inches place its panels, about twice as fast as
    matplotlib's tight_layout, which measures every label (used without them)."""
    if margins is None:
        fig.tight_layout()
    else:
        (left, right, bottom, top), (width, height) = margins, fig.get_size_inches()
        fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height)
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format=path.suffix[1:]))
    pyplot().close(fig)


def plot_curves(results, path):
    """Dev loss and accuracy against forward passes (the fair axis: a DiZO phase costs 2M + 2 of them; FO's
    also run backward), training loss against steps; one line per method."""
    fig, axes = pyplot().subplots(1, 3, figsize=(14, 3.8), gridspec_kw={"wspace": 0.25})
    for method, r in results["methods"].items():
        for ax, (x, y) in zip(axes, (("forward_passes", "dev_loss"), ("forward_passes", "dev_acc"), ("step", "loss"))):
            hist = [h for h in r["history"] if h.get(y) is not None]
            ax.plot([h.get(x, 0) for h in hist], [h[y] for h in hist], marker="." if x != "step" else None,
                    label=method)
    passes = "forward passes (fo's backward not counted)"
    axes[0].set(xlabel=passes, ylabel="dev loss", title="dev loss", yscale="log")
    axes[1].set(xlabel=passes, ylabel="dev accuracy", title="dev accuracy")
    axes[2].set(xlabel="step", ylabel="mean since the last evaluation",
                title="training loss: fo L(θ), zo and dizo L(θ + εz)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path, margins=(0.7, 0.15, 0.6, 0.35))


def plot_divergence(results, path):
    """One panel per method: ‖W_T - W_0‖ of Q, K, V, O per layer at the last evaluation, each divided by
    √(entries), so that ZO's size-only movement (η|g|√n per step, DiZO §2.2) shows as flat lines."""
    methods = [(m, r) for m, r in results["methods"].items() if "divergence" in r["history"][-1]]
    fig, axes = pyplot().subplots(1, len(methods), figsize=(4 * len(methods), 3.4), squeeze=False, sharey=True)
    for ax, (method, r) in zip(axes[0], methods):
        last = r["history"][-1]
        for role, dists in last["divergence"].items():
            per_entry = [d / math.sqrt(n) for d, n in zip(dists, r["matrix_sizes"][role])]
            ax.plot(range(len(dists)), per_entry, marker="o", label=role.upper())
        ax.set(title=f"{method}, step {last['step']}", xlabel="layer", yscale="log", xticks=range(len(dists)))
        ax.grid(alpha=0.3, which="both")
        ax.legend(ncol=4, fontsize=8)
    axes[0][0].set_ylabel("‖W - W0‖ / √entries")
    save_figure(fig, path, margins=(1.15, 0.15, 0.6, 0.35))


def _short_name(name):
    """'model.decoder.layers.2.self_attn.k_proj.weight' -> '2 k_proj': the layer and what follows its block."""
    parts = name.replace(".weight", "").replace(".default", "").split(".")
    layer = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    return name if layer is None else f"{parts[layer]} {'.'.join(parts[layer + 2:])}"


def plot_projection(results, path):
    """DiZO's projection phases (§3) per method: the ratio r_l chosen for each projected matrix (rows) at each phase
    (columns; 1 = left as it was), and its loss change on the first search batch and on held-out dev examples."""
    runs = [(m, r) for m, r in results["methods"].items() if r.get("projection")]
    fig, axes = pyplot().subplots(len(runs), 2, figsize=(12, 0.5 + 3.5 * len(runs)), squeeze=False,
                                  gridspec_kw={"width_ratios": (3, 2), "wspace": 0.25, "hspace": 0.45})
    for (method, r), (ax_r, ax_loss) in zip(runs, axes):
        phases = r["projection"]
        steps = [p["step"] for p in phases]
        ratios = torch.tensor([p["ratios"] for p in phases]).T.tolist()  # [matrix][phase]
        spread = max(max(abs(x - 1) for row in ratios for x in row), 1e-3)
        image = ax_r.imshow(ratios, aspect="auto", interpolation="nearest", cmap="RdBu_r", vmin=1 - spread,
                            vmax=1 + spread)
        names = [_short_name(n) for n in r["projected"]]
        for set_ticks, labels, most, size in ((ax_r.set_yticks, names, 20, 6), (ax_r.set_xticks, steps, 12, 7)):
            every = max(1, len(labels) // most)  # at most 20 matrix and 12 step labels
            set_ticks(range(0, len(labels), every), labels[::every], fontsize=size)
        ax_r.set(title=f"{method}: ratio r = γ/‖θ−θ0‖ chosen per matrix", xlabel="after step")
        fig.colorbar(image, ax=ax_r)
        width = 0.4 * (steps[1] - steps[0]) if len(steps) > 1 else 1.0
        for key, label, shift in (("loss", "first search batch (used by the search)", -0.5),
                                  ("dev_loss", "held-out dev examples", 0.5)):
            if all(f"{key}_before" in p for p in phases):
                ax_loss.bar([s + shift * width for s in steps], [100 * (p[f"{key}_after"] / p[f"{key}_before"] - 1)
                                                                   for p in phases], width=width, label=label)
        ax_loss.axhline(0, color="gray", lw=0.8)
        ax_loss.set(title=f"{method}: loss change at each phase", xlabel="step", ylabel="after / before − 1 (%)")
        ax_loss.legend(fontsize=7)
        ax_loss.grid(alpha=0.3)
    save_figure(fig, path, margins=(1.0, 0.15, 0.6, 0.4))


def plot_run(results, folder):
    """Draws a train.py run's figures into `folder` (curves; divergence, projection if recorded); their names."""
    methods = results["methods"]
    figures = {"curves.png": plot_curves}
    if any(r.get("history") and "divergence" in r["history"][-1] for r in methods.values()):
        figures["divergence.png"] = plot_divergence
    if any(r.get("projection") for r in methods.values()):
        figures["projection.png"] = plot_projection
    for name, plot in figures.items():
        plot(results, folder / name)
    return list(figures)


def print_table(results):
    """The end-of-run summary, one row per method."""
    cells = {"zero_shot_acc": "{:.3f}", "best_dev_acc": "{:.3f}", "dev_loss": "{:.4f}", "test_acc": "{:.3f}",
             "steps": "{}", "forward_passes": "{}", "wall_s": "{:.1f}", "peak_mem_mb": "{:.0f}"}
    rows = [("method", "zero-shot", "best dev", "dev loss", "test", "steps", "fwd passes", "train s", "peak MB",
             "status")]
    rows += [(method, *(f.format(r[k]) if r.get(k) is not None else "-" for k, f in cells.items()), r["status"])
             for method, r in results["methods"].items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows[:1] + [["-" * w for w in widths]] + rows[1:]:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    if "fo" in results["methods"]:
        print("fwd passes: training's forward passes; fo's backward passes are not counted")
