"""A run's logs: `metrics.csv` (one row per `log_every` steps, rewritten on resume so a
crashed run's rows after its checkpoint go), `loss.png`, TensorBoard when installed.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path


METRICS_FILE = "metrics.csv"


def read_metrics(run_dir: Path, upto: int) -> list[dict[str, float]]:
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    with path.open() as fh:
        rows = [{k: int(float(v)) if k == "step" else float(v) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(fh)]
    return [r for r in rows if r["step"] <= upto]


def write_metrics(run_dir: Path, history: list[dict[str, float]]) -> None:
    """Rewrite metrics.csv with `history`: rows logged after the resume point are dropped."""
    path = run_dir / METRICS_FILE
    path.unlink(missing_ok=True)
    for record in history:
        append_metrics(run_dir, record)


METRIC_COLUMNS = ("step", "loss_total", "loss_velocity", "loss_cls", "loss_align", "grad_norm", "lr",
                  "images_per_s", "tflops", "elapsed_s")


def append_metrics(run_dir: Path, record: dict[str, float]) -> None:
    """One row; columns are the usual ones plus any other loss term the objective reports (a VAE's)."""
    path = run_dir / METRICS_FILE
    extra = sorted(k for k in record if k.startswith("loss_") and k not in METRIC_COLUMNS)
    columns = list(METRIC_COLUMNS[:5]) + extra + list(METRIC_COLUMNS[5:])
    if path.exists():
        with path.open(newline="") as fh:
            header = next(csv.reader(fh), [])
        missing = [c for c in columns if c not in header]
        if missing:
            rows = read_metrics(run_dir, upto=10**12)  # a new term: rewrite with the wider header
            columns = header + missing
            path.unlink()
            for row in rows:
                _write_row(path, columns, row)
        else:
            columns = header
    _write_row(path, columns, record)
    _log_tensorboard(run_dir, record)


def _write_row(path: Path, columns: list[str], record: dict[str, float]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: record.get(k, "") for k in columns})


def _log_tensorboard(run_dir: Path, record: dict[str, float]) -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional
    except ImportError:
        return
    with SummaryWriter(str(run_dir / "tensorboard")) as tb:
        for key, value in record.items():
            if key != "step" and isinstance(value, float) and math.isfinite(value):
                tb.add_scalar(key, value, int(record["step"]))


def plot_loss(run_dir: Path) -> Path | None:
    rows = read_metrics(run_dir, upto=10**12)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = [r["step"] for r in rows]
    terms = [k for k in rows[-1] if k.startswith("loss_")]
    for key in terms:
        values = [r.get(key) for r in rows]
        if key == "loss_align":  # a negative cosine: plotted as 1 + it, on the log axis with the others
            values = [None if v is None else 1 + v for v in values]
            key = "1+loss_align"
        if any(v is not None for v in values) and not (key == "loss_velocity" and len(terms) == 2):
            ax.plot(steps, [v if v is not None else float("nan") for v in values], label=key.removeprefix("loss_"))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(run_dir.name)
    fig.tight_layout()
    out = run_dir / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out
