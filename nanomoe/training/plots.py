"""PNG plots of a run, drawn from metrics.jsonl: loss curves and expert load per layer over time."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Rows of metrics.jsonl; after a resume, the last row of each (kind, step) wins."""
    path = Path(run_dir) / "metrics.jsonl"
    rows: dict[tuple[str, int], dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a crash
                    continue
                rows[(row["kind"], row["step"])] = row
    return sorted(rows.values(), key=lambda r: (r["step"], r["kind"]))


def plot_run(run_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    if train or evals:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        if train:
            ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", alpha=0.8)
        if evals:
            ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="validation loss")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token, padding excluded)")
        ax.set_title(run_dir.name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / "loss.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # expert load per layer over time (evaluation passes; training rows when there are no evals)
    source = [r for r in evals if r.get("moe")]
    loads = [[layer["load_fractions"] for layer in r["moe"]["layers"]] for r in source]
    steps = [r["step"] for r in source]
    if not loads:
        source = [r for r in train if r.get("expert_load")]
        loads = [r["expert_load"] for r in source]
        steps = [r["step"] for r in source]
    if loads:
        n_layers = len(loads[0])
        n_experts = len(loads[0][0])
        cols = min(3, n_layers)
        n_rows = (n_layers + cols - 1) // cols
        fig, axes = plt.subplots(n_rows, cols, figsize=(4.2 * cols, 3.2 * n_rows), squeeze=False, sharey=True)
        for layer in range(n_layers):
            ax = axes[layer // cols][layer % cols]
            series = [[load[layer][e] for load in loads] for e in range(n_experts)]
            ax.stackplot(steps, series, labels=[f"expert {e}" for e in range(n_experts)])
            ax.axhline(0.5, color="white", lw=0.5)
            ax.set_title(f"MoE layer {layer}")
            ax.set_xlabel("step")
            ax.set_ylim(0, 1)
        for extra in range(n_layers, n_rows * cols):
            axes[extra // cols][extra % cols].axis("off")
        axes[0][0].set_ylabel("fraction of tokens")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper right", fontsize="small", ncol=1)
        fig.suptitle("expert load per layer (uniform = equal bands)")
        fig.tight_layout(rect=(0, 0, 0.9, 0.95))
        path = out_dir / "expert_load.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
