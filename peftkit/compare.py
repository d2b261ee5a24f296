"""`peftkit compare`: one report over run directories, as Markdown and a self-contained HTML page.

Per run: base model, method and implementation, task metrics, trainable parameters (and % of the base),
peak memory, training tokens/s, wall time, adapter size on disk, and the loss curve. Runs that
differ only in `impl` (peftkit vs peft) are paired, with the difference. The HTML page has
inline styles and inline SVG plots: it works offline, with no script and nothing to fetch.
"""

import html
import json
import math
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from peftkit.errors import ConfigError
from peftkit.methods import method_label

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


@dataclass
class RunSummary:
    name: str
    method: str
    impl: str
    recipe: dict
    metrics: dict[str, float] = field(default_factory=dict)
    trainable: int = 0
    total: int = 0
    peak_memory_mb: float = float("nan")
    tokens_per_s: float = float("nan")
    wall_time_s: float = float("nan")
    adapter_bytes: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # eval task -> why it was not scored

    @property
    def trainable_pct(self) -> float:
        return 100 * self.trainable / self.total if self.total else float("nan")


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def method_name(adapter_config: dict) -> str:
    kind = adapter_config.get("peft_type", "?").lower()
    if kind == "lora":
        if (adapter_config.get("peftkit") or {}).get("base_quantization"):
            return "qlora"
        return "dora" if adapter_config.get("use_dora") else "lora"
    return {"prefix_tuning": "prefix", "prompt_tuning": "prompt"}.get(kind, kind)


def recipe_method(recipe: dict) -> str | None:
    """The method a run's recipe asked for (peft's saved config cannot tell QLoRA from LoRA)."""
    from peftkit.api import resolve_adapter

    try:
        cfg = resolve_adapter(recipe.get("adapter", "lora"), **(recipe.get("adapter_overrides") or {}))
    except ConfigError:
        return None
    return method_label(cfg)


def summarize(run: Path) -> RunSummary:
    """What one run directory says about itself."""
    if not (run / "recipe.yaml").is_file() or not (run / "adapter").is_dir():
        raise ConfigError(f"{run} is not a finished run directory (needs recipe.yaml and adapter/): "
                          f"pass directories written by peftkit train")
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    system = _json(run / "system.json")
    metrics, skipped = {}, {}
    for task, result in (_json(run / "eval.json").get("tasks") or {}).items():
        if result.get("skipped"):
            skipped[task] = result["skipped"]
        for key, value in (result.get("metrics") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"{task}/{key}"] = float(value)
    losses = []
    if (run / "metrics.jsonl").is_file():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "loss" in record:
                losses.append((record["step"], record["loss"]))
    return RunSummary(
        name=run.name, method=recipe_method(recipe) or method_name(_json(run / "adapter" / "adapter_config.json")),
        impl=recipe.get("impl", "peftkit"), recipe=recipe, metrics=metrics,
        trainable=system.get("trainable_parameters", 0), total=system.get("total_parameters", 0),
        peak_memory_mb=system.get("peak_memory_mb", float("nan")), tokens_per_s=system.get("tokens_per_s", float("nan")),
        wall_time_s=system.get("wall_time_s", float("nan")),
        adapter_bytes=sum(p.stat().st_size for p in (run / "adapter").iterdir() if p.suffix == ".safetensors"),
        losses=losses, skipped=skipped)


def setup_line(runs: list[RunSummary]) -> str:
    """What the runs share (model, data, budget, seed), or that they differ."""
    def setup(run: RunSummary) -> str:
        data, train = run.recipe.get("data") or {}, run.recipe.get("train") or {}
        sources = data.get("train")
        sources = " + ".join(sources) if isinstance(sources, list) else sources
        limit = f", at most {data['limit']} examples each" if data.get("limit") else ""
        steps = f"{train['max_steps']} steps" if train.get("max_steps", -1) > 0 else f"{train.get('epochs', 1)} epochs"
        return (f"data {sources}{limit}, max_length {data.get('max_length')}; "
                f"{steps} x batch {train.get('batch_size', 8) * train.get('grad_accum', 1)}; seed {train.get('seed')}")
    setups = {setup(r) for r in runs}
    models = list(dict.fromkeys(str(r.recipe.get("model")) for r in runs))
    if len(setups) > 1:
        return "The runs differ in data or budget."
    if len(models) > 1:
        return f"Models {', '.join(models)}; shared setup: {setups.pop()}."
    return f"Shared setup: model {models[0]}; {setups.pop()}."


def pairs(runs: list[RunSummary]) -> list[tuple[RunSummary, RunSummary]]:
    """(peftkit run, peft run) pairs whose recipes agree on everything but impl and output."""
    def key(run: RunSummary) -> str:
        return json.dumps({k: v for k, v in run.recipe.items() if k not in ("impl", "output")}, sort_keys=True)
    peft_runs = {key(r): r for r in runs if r.impl == "peft"}
    return [(r, peft_runs[key(r)]) for r in runs if r.impl == "peftkit" and key(r) in peft_runs]


def _fmt(value: float, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"


COLUMNS = ["run", "model", "method", "impl", "lr", "trainable", "% of base", "peak MiB", "train tok/s", "wall s",
           "adapter MiB"]


def table_rows(runs: list[RunSummary]) -> tuple[list[str], list[list[str]]]:
    metric_names = sorted({m for r in runs for m in r.metrics})
    header = COLUMNS + metric_names + ["final loss"]
    rows = []
    for r in runs:
        lr = (r.recipe.get("train") or {}).get("lr", float("nan"))
        rows.append([r.name, str(r.recipe.get("model")), r.method, r.impl, _fmt(lr, 2),
                     f"{r.trainable:,}", f"{r.trainable_pct:.2f}", _fmt(r.peak_memory_mb),
                     _fmt(r.tokens_per_s), _fmt(r.wall_time_s), f"{r.adapter_bytes / 2**20:.2f}"]
                    + [_fmt(r.metrics.get(m, float("nan"))) for m in metric_names]
                    + [_fmt(r.losses[-1][1]) if r.losses else "-"])
    return header, rows


def pair_rows(runs: list[RunSummary]) -> tuple[list[str], list[list[str]]]:
    header = ["quantity", "peftkit", "peft", "peftkit - peft"]
    rows = []
    for ours, theirs in pairs(runs):
        quantities = {"final loss": (ours.losses[-1][1] if ours.losses else float("nan"),
                                     theirs.losses[-1][1] if theirs.losses else float("nan")),
                      "train tok/s": (ours.tokens_per_s, theirs.tokens_per_s),
                      "peak MiB": (ours.peak_memory_mb, theirs.peak_memory_mb),
                      "wall s": (ours.wall_time_s, theirs.wall_time_s)}
        quantities |= {m: (ours.metrics.get(m, float("nan")), theirs.metrics.get(m, float("nan")))
                       for m in sorted(set(ours.metrics) | set(theirs.metrics))}
        for name, (a, b) in quantities.items():
            rows.append([f"{ours.name} vs {theirs.name}: {name}", _fmt(a), _fmt(b), _fmt(a - b)])
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def render_markdown(runs: list[RunSummary], command: str) -> str:
    parts = ["# PEFT methods compared", "", f"Produced by `{command}`.", "", setup_line(runs), "",
             markdown_table(*table_rows(runs))]
    if pairs(runs):
        parts += ["", "## peftkit vs peft, same recipe", "", markdown_table(*pair_rows(runs))]
    if any(r.skipped for r in runs):
        parts += ["", "## Not scored", ""] + [f"- {r.name}: {task}: {why}" for r in runs for task, why in r.skipped.items()]
    parts += ["", "Loss curves: see report.html."]
    return "\n".join(parts) + "\n"


def loss_svg(runs: list[RunSummary], width: int = 720, height: int = 360) -> str:
    """Training loss against step for every run, overlaid, as an inline SVG."""
    points = [(s, l) for r in runs for s, l in r.losses if math.isfinite(l)]
    if not points:
        return '<svg class="plot" data-plot="loss" width="720" height="60"><text x="10" y="30">no loss logged</text></svg>'
    pad = 50
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(max(xs), min(xs) + 1), min(ys), max(max(ys), min(ys) + 1e-6)
    sx = lambda x: pad + (x - x0) / (x1 - x0) * (width - 2 * pad)  # noqa: E731
    sy = lambda y: height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)  # noqa: E731
    parts = [f'<svg class="plot" data-plot="loss" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" style="background:#fff;border:1px solid #ccc">',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#333"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#333"/>']
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        parts.append(f'<text x="{pad - 6}" y="{sy(y) + 4:.1f}" font-size="11" text-anchor="end">{y:.2f}</text>')
        x = x0 + (x1 - x0) * i / 4
        parts.append(f'<text x="{sx(x):.1f}" y="{height - pad + 16}" font-size="11" text-anchor="middle">{x:.0f}</text>')
    parts.append(f'<text x="{width / 2}" y="{height - 8}" font-size="12" text-anchor="middle">step</text>')
    parts.append(f'<text x="14" y="{height / 2}" font-size="12" transform="rotate(-90 14 {height / 2})" '
                 f'text-anchor="middle">training loss</text>')
    for i, run in enumerate(runs):
        colour = COLOURS[i % len(COLOURS)]
        dash = ' stroke-dasharray="6 3"' if run.impl == "peft" else ""
        line = " ".join(f"{sx(s):.1f},{sy(l):.1f}" for s, l in run.losses if math.isfinite(l))
        parts.append(f'<polyline data-run="{html.escape(run.name)}" fill="none" stroke="{colour}" stroke-width="2"'
                     f'{dash} points="{line}"/>')
        parts.append(f'<text x="{width - pad + 4 - 150}" y="{pad + 16 * i}" font-size="12" fill="{colour}">'
                     f'{html.escape(run.name)} ({run.impl})</text>')
    return "\n".join(parts + ["</svg>"])


def bars_svg(runs: list[RunSummary], metric: str, width: int = 720) -> str:
    """One horizontal bar per run for one metric."""
    values = [r.metrics.get(metric, float("nan")) for r in runs]
    finite = [v for v in values if math.isfinite(v)]
    top = max(finite) if finite and max(finite) > 0 else 1.0
    height = 30 + 26 * len(runs)
    parts = [f'<svg class="plot" data-plot="{html.escape(metric)}" xmlns="http://www.w3.org/2000/svg" '
             f'width="{width}" height="{height}" style="background:#fff;border:1px solid #ccc">',
             f'<text x="10" y="18" font-size="13" font-weight="bold">{html.escape(metric)}</text>']
    for i, (run, value) in enumerate(zip(runs, values)):
        y = 28 + 26 * i
        length = 0 if not math.isfinite(value) else max(value, 0) / top * (width - 320)
        parts.append(f'<text x="10" y="{y + 15}" font-size="12">{html.escape(run.name)}</text>')
        parts.append(f'<rect x="220" y="{y}" width="{length:.1f}" height="18" fill="{COLOURS[i % len(COLOURS)]}"/>')
        parts.append(f'<text x="{226 + length:.1f}" y="{y + 14}" font-size="12">{_fmt(value)}</text>')
    return "\n".join(parts + ["</svg>"])


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(runs: list[RunSummary], command: str) -> str:
    metrics = sorted({m for r in runs for m in r.metrics})
    sections = [f"<h1>PEFT methods compared</h1><p>Produced by <code>{html.escape(command)}</code>.</p>",
                f"<p>{html.escape(setup_line(runs))}</p>", html_table(*table_rows(runs)), "<h2>Training loss</h2>",
                loss_svg(runs)]
    if pairs(runs):
        sections += ["<h2>peftkit vs peft, same recipe</h2>", html_table(*pair_rows(runs))]
    if any(r.skipped for r in runs):
        items = "".join(f"<li>{html.escape(f'{r.name}: {task}: {why}')}</li>" for r in runs for task, why in r.skipped.items())
        sections += [f"<h2>Not scored</h2><ul>{items}</ul>"]
    if metrics:
        sections += ["<h2>Task metrics</h2>"] + [bars_svg(runs, m) for m in metrics]
    style = ("body{font-family:sans-serif;margin:24px;color:#222;background:#fafafa}"
             "table{border-collapse:collapse;margin:12px 0}td,th{border:1px solid #bbb;padding:4px 8px;"
             "font-size:13px;text-align:right}th{background:#eee}td:first-child{text-align:left}"
             "svg.plot{display:block;margin:12px 0}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>peftkit compare</title>"
            f"<style>{style}</style></head><body>{''.join(sections)}</body></html>\n")


def compare(run_dirs: list[str | Path], out: str | Path, *, overwrite: bool = False, command: str = "") -> Path:
    """Write report.md and report.html for the runs into `out`; returns `out`."""
    out = Path(out)
    if not run_dirs:
        raise ConfigError("compare needs at least one run directory")
    runs = [summarize(Path(r)) for r in run_dirs]
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} already exists: pass --overwrite to replace it, or choose another --out")
    command = command or "peftkit compare " + " ".join(map(str, run_dirs)) + f" --out {out}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    (tmp / "report.md").write_text(render_markdown(runs, command))
    (tmp / "report.html").write_text(render_html(runs, command))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
