"""Figures of an artifact: report.png (before / after of an `apply`) and curves.png (a training run).

Drawn with matplotlib's Agg backend (no display needed) into the path given, which the
artifact writer places in its temporary folder: a figure is never written over a user's file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(ax: Any, title: str, labels: list[str], values: list[float], fmt: str) -> None:
    colors = ["#7f7f7f", "#1f77b4", "#2ca02c"][:len(values)]
    bars = ax.bar(labels, values, color=colors)
    for bar, v in zip(bars, values):
        ax.annotate(fmt.format(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelsize=8)
    ax.margins(y=0.15)


def report_panels(report: dict[str, Any]) -> list[tuple[str, list[str], list[float], str]]:
    """(title, labels, values, number format) of each panel report.png draws: what was measured only."""
    panels = []
    before, after = report.get("before") or {}, report.get("after") or {}
    for key, title in (("params", "params"), ("macs", "MACs (batch 1)")):
        if key in before and key in after:
            top = max(before[key], after[key], 1)
            unit, scale = next((u, d) for u, d in (("G", 1e9), ("M", 1e6), ("k", 1e3), ("", 1)) if top >= d)
            panels.append((f"{title}{f' ({unit})' if unit else ''}", ["before", "after"],
                           [before[key] / scale, after[key] / scale], "{:.2f}"))
    batches = (report.get("latency") or {}).get("batches") or {}
    for b, v in list(batches.items())[:1]:
        title = f"CPU latency b={b} (ms)" + (" - noisy" if v.get("noisy") else "")
        panels.append((title, ["before", "after"], [v["before"]["median_ms"], v["after"]["median_ms"]], "{:.2f}"))
    acc = report.get("accuracy") or {}
    scored = [(label, acc[key]["val_top1"]) for key, label in (("original", "original"), ("rewritten", "rewritten"),
                                                               ("finetuned", "fine-tuned"))
              if isinstance(acc.get(key), dict) and "val_top1" in acc[key]]
    if scored:
        panels.append((f"top-1 on {acc.get('data', 'val')}", [s[0] for s in scored], [s[1] for s in scored],
                       "{:.3f}"))
    return panels


def report_figure(report: dict[str, Any], path: str | Path) -> Path:
    """Bars of params, MACs, latency (when measured) and top-1 (when evaluated), before and after."""
    plt = _pyplot()
    panels = report_panels(report)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        _bars(ax, *panel)
    passes = " -> ".join(p["pass"] for p in report.get("passes", [])) or "no pass"
    fig.suptitle(f"{report.get('model', 'model')}: {passes}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def curves_figure(history: list[dict[str, Any]], path: str | Path, title: str = "training") -> Path:
    """Loss and top-1 per epoch from a run's history.json (train and val)."""
    plt = _pyplot()
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(8, 3.2))
    for key, ax, label in (("train_loss", loss_ax, "train"), ("val_loss", loss_ax, "val"),
                           ("train_acc", acc_ax, "train"), ("val_top1", acc_ax, "val")):
        points = [(e, h[key]) for e, h in zip(epochs, history) if isinstance(h.get(key), (int, float))]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    loss_ax.set(title="loss", xlabel="epoch")
    acc_ax.set(title="top-1", xlabel="epoch")
    for ax in (loss_ax, acc_ax):
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
