"""Result reports: JSON, markdown table, bar chart (PNG). No JAX, no model code.

A *results* mapping is ``{setting: {metric: value}}``, e.g.::

    {"no_memory": {"exact_match": 0.1, "f1": 0.2},
     "delta_mem": {"exact_match": 0.5, "f1": 0.6},
     "full_context": {"exact_match": 0.9, "f1": 0.95}}

Rows of the table / bar groups are the settings, columns are the metrics
(LoCoMo: per-category F1 + overall; perplexity: loss / ppl). Nested metric
dicts are flattened with "/" (``{"f1": {"1": x}}`` -> ``"f1/1"``). Every file is
written atomically, through :mod:`deltamem_jax.utils.atomic` (the package's one writer).
"""

from __future__ import annotations

import io
import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from deltamem_jax.utils.atomic import atomic_write_bytes, atomic_write_text

__all__ = [
    "to_jsonable",
    "write_json",
    "read_json",
    "flatten_metrics",
    "metric_columns",
    "markdown_table",
    "write_markdown",
    "bar_chart_png",
    "write_bar_chart",
    "write_report",
]

PathLike = str | os.PathLike


# --------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------

def to_jsonable(obj: Any) -> Any:
    """Convert to strict-JSON values: numpy scalars/arrays -> Python, tuples ->
    lists, dataclasses -> dicts, mapping keys -> str, non-finite floats -> None."""
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return to_jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "tolist"):  # numpy arrays / scalars
        return to_jsonable(obj.tolist())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot convert {type(obj).__name__} to JSON")


def write_json(obj: Any, path: PathLike, *, indent: int = 2) -> Path:
    text = json.dumps(to_jsonable(obj), indent=indent, ensure_ascii=False, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def read_json(path: PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# --------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------

def flatten_metrics(metrics: Mapping, sep: str = "/", prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": 2}`` -> ``{"a/b": 1, "c": 2}`` (order kept)."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_metrics(v, sep, key + sep))
        else:
            out[key] = v
    return out


def _rows(results: Mapping[str, Mapping]) -> dict[str, dict[str, Any]]:
    if not isinstance(results, Mapping):
        raise TypeError("results must be a mapping {setting: {metric: value}}")
    rows = {}
    for setting, metrics in results.items():
        if not isinstance(metrics, Mapping):
            raise TypeError(f"results[{setting!r}] must be a mapping of metrics, "
                            f"got {type(metrics).__name__}")
        rows[str(setting)] = flatten_metrics(metrics)
    return rows


def metric_columns(results: Mapping[str, Mapping]) -> list[str]:
    """Union of the (flattened) metric names, in first-appearance order."""
    cols: list[str] = []
    for metrics in _rows(results).values():
        for k in metrics:
            if k not in cols:
                cols.append(k)
    return cols


def _fmt(value: Any, float_fmt: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        f = float(value)
        return "n/a" if math.isnan(f) else float_fmt.format(f)
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(
    results: Mapping[str, Mapping],
    *,
    metrics: Sequence[str] | None = None,
    row_label: str = "setting",
    float_fmt: str = "{:.4f}",
    title: str | None = None,
) -> str:
    """GitHub markdown table, one row per setting, one column per metric
    (default: all metrics). Missing values print as "—", None/NaN as "n/a"."""
    rows = _rows(results)
    cols = list(metrics) if metrics is not None else metric_columns(results)
    lines = []
    if title:
        lines += [f"## {title}", ""]
    lines.append("| " + " | ".join([row_label] + cols) + " |")
    lines.append("|" + "---|" + "".join("---:|" for _ in cols))
    for setting, m in rows.items():
        cells = [_fmt(m[c], float_fmt) if c in m else "—" for c in cols]
        lines.append("| " + " | ".join([setting] + cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(results: Mapping[str, Mapping], path: PathLike, **kwargs) -> Path:
    return atomic_write_text(path, markdown_table(results, **kwargs))


# --------------------------------------------------------------------------
# Bar chart
# --------------------------------------------------------------------------

def _chart_metrics(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Default chart columns: metrics with at least one float value (integer
    counts such as ``n`` are left out)."""
    cols: list[str] = []
    for m in rows.values():
        for k, v in m.items():
            if (isinstance(v, numbers.Real) and not isinstance(v, (bool, numbers.Integral))
                    and k not in cols):
                cols.append(k)
    return cols


def bar_chart_png(
    results: Mapping[str, Mapping],
    *,
    metrics: Sequence[str] | None = None,
    title: str | None = None,
    ylabel: str | None = None,
    dpi: int = 120,
) -> bytes:
    """Grouped bar chart as PNG bytes: one group per metric, one bar per setting.
    Uses matplotlib's Agg canvas directly (no pyplot, no display, no global
    backend change). Missing / None / NaN values are drawn as empty bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = _rows(results)
    cols = list(metrics) if metrics is not None else _chart_metrics(rows)
    settings = list(rows)
    n_set = max(len(settings), 1)
    width = 0.8 / n_set
    fig = Figure(figsize=(max(4.0, 1.2 + 0.5 * len(cols) * n_set), 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, setting in enumerate(settings):
        vals = []
        for c in cols:
            v = rows[setting].get(c)
            ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))
            vals.append(float(v) if ok else 0.0)
        xs = [j + (i - (n_set - 1) / 2) * width for j in range(len(cols))]
        bars = ax.bar(xs, vals, width=width, label=setting)
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(range(len(cols))))
    ax.set_xticklabels(cols, rotation=20 if len(cols) > 4 else 0,
                       ha="right" if len(cols) > 4 else "center")
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if settings:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def write_bar_chart(results: Mapping[str, Mapping], path: PathLike, **kwargs) -> Path:
    return atomic_write_bytes(path, bar_chart_png(results, **kwargs))


# --------------------------------------------------------------------------
# All three
# --------------------------------------------------------------------------

def write_report(
    results: Mapping[str, Mapping],
    out_dir: PathLike,
    name: str = "results",
    *,
    title: str | None = None,
    metrics: Sequence[str] | None = None,
    chart_metrics: Sequence[str] | None = None,
    meta: Mapping[str, Any] | None = None,
    float_fmt: str = "{:.4f}",
    ylabel: str | None = None,
) -> dict[str, Path]:
    """Write ``{name}.json`` (``{"title", "meta", "results"}``), ``{name}.md``
    and ``{name}.png`` into ``out_dir``; returns their paths by kind."""
    out = Path(out_dir)
    payload = {"title": title, "meta": dict(meta or {}), "results": results}
    md = markdown_table(results, metrics=metrics, float_fmt=float_fmt, title=title)
    if meta:
        md += "\n" + "".join(f"- {k}: {_fmt(v, float_fmt)}\n" for k, v in meta.items())
    return {
        "json": write_json(payload, out / f"{name}.json"),
        "markdown": atomic_write_text(out / f"{name}.md", md),
        "png": write_bar_chart(results, out / f"{name}.png", metrics=chart_metrics,
                               title=title, ylabel=ylabel),
    }
