"""`peftkit compare`: one report over run directories, as Markdown and a self-contained HTML page.

Runs of one method that differ only in their seed (`<name>-seed<k>`, from a recipe's `seeds`)
form one row: per task metric its mean over seeds, the spread (standard deviation) and a 95 %
bootstrap interval over examples and seeds (`peftkit.stats`); `*` marks a difference to LoRA
whose interval excludes zero. Beside them: trainable parameters (and % of the base), peak
memory, training tokens/s and time, adapter size, forgetting (the rise of the held-out loss on
a source outside the training mix over the base model's, when the base was evaluated), and
the loss curves. Runs that differ only in `impl` (peftkit vs peft) are paired. Sample outputs
show the base model's answer beside each method's for a few held-out prompts. Rank intervals,
the probability of beating LoRA (and full fine-tuning) and a verdict come from
`peftkit.verdict`, and `report.json` holds it all for other tools.

The HTML page has inline styles and matplotlib's SVG plots inlined: it works offline, with no
script and nothing to fetch.
"""

import html
import json
import math
import shutil
import uuid
from pathlib import Path

import numpy as np

from peftkit import plots, stats
from peftkit.errors import ConfigError
from peftkit.groups import (FORGETTING_TASK, MAIN_METRICS, Group, forgetting, groups_of, interval, metric_names,
                            reference_group, significance)
from peftkit.run_summary import RunSummary, method_name, summarize  # noqa: F401  (the report's inputs, re-exported)
from peftkit.verdict import rank_rows, report_json, tuning_note, tuning_rows, verdict


def setup_line(runs: list[RunSummary]) -> str:
    """What the runs share (model, data, budget, seed), or that they differ."""
    def setup(run: RunSummary) -> str:
        data, train = run.recipe.get("data") or {}, run.recipe.get("train") or {}
        sources = data.get("train")
        sources = " + ".join(sources) if isinstance(sources, list) else sources
        limit = f", at most {data['limit']} examples each" if data.get("limit") else ""
        steps = f"{train['max_steps']} steps" if train.get("max_steps", -1) > 0 else f"{train.get('epochs', 1)} epochs"
        return (f"data {sources}{limit}, max_length {data.get('max_length')}; "
                f"{steps} x batch {train.get('batch_size', 8) * train.get('grad_accum', 1)}")
    setups = {setup(r) for r in runs}
    seeds = sorted({(r.recipe.get("train") or {}).get("seed") for r in runs}, key=str)
    seed_text = f"; seed {seeds[0]}" if len(seeds) == 1 else f"; seeds {', '.join(map(str, seeds))}"
    models = list(dict.fromkeys(str(r.recipe.get("model")) for r in runs))
    if len(setups) > 1:
        return "The runs differ in data or budget."
    if len(models) > 1:
        return f"Models {', '.join(models)}; shared setup: {setups.pop()}{seed_text}."
    return f"Shared setup: model {models[0]}; {setups.pop()}{seed_text}."


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


def fmt_metric(metric: str, value: float) -> str:
    """A metric for reading: scores (percentages) to one decimal, losses to three."""
    if value is None or not math.isfinite(value):
        return "-"
    name = metric.rsplit("/", 1)[-1]
    if name == "loss":
        return f"{value:.3f}"
    if name == "perplexity":
        return f"{value:.2f}"
    return f"{value:.1f}"


def _cell(metric: str, found: stats.Interval | None, diff: stats.Interval | None) -> str:
    if found is None:
        return "-"
    text = fmt_metric(metric, found.value)
    if found.seeds > 1:
        text += f" ±{fmt_metric(metric, found.spread)}"
    if math.isfinite(found.low):
        text += f" [{fmt_metric(metric, found.low)}, {fmt_metric(metric, found.high)}]"
    if diff is not None and not diff.contains(0.0):
        text += " *"
    return text


def _forgetting_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value.value:+.3f} [{value.low:+.3f}, {value.high:+.3f}]"


GROUP_COLUMNS = ["method", "impl", "seeds", "trainable", "% of base", "peak MiB", "train tok/s", "train s",
                 "saved MiB"]


def group_rows(groups: list[Group], base: dict | None) -> tuple[list[str], list[list[str]]]:
    runs = [r for g in groups for r in g.runs]
    metrics, reference = metric_names(runs), reference_group(groups)
    show_forgetting = any(forgetting(g, base) is not None for g in groups)
    header = GROUP_COLUMNS + metrics + (["forgetting (Δ alpaca-heldout loss)"] if show_forgetting else []) + [
        "final loss"]
    rows = []
    for g in groups:
        final = [r.losses[-1][1] for r in g.runs if r.losses]
        row = [g.name, g.first.impl, str(len(g.runs)), f"{g.first.trainable:,}", f"{g.first.trainable_pct:.2f}",
               _fmt(g.mean("peak_memory_mb")), _fmt(g.mean("tokens_per_s")), _fmt(g.mean("train_time_s")),
               f"{g.first.adapter_bytes / 2**20:.2f}"]
        row += [_cell(m, interval(g, m), significance(g, reference, m)) for m in metrics]
        if show_forgetting:
            row.append(_forgetting_cell(forgetting(g, base)))
        row.append(f"{np.mean(final):.3f}" if final else "-")
        rows.append(row)
    return header, rows


def significance_rows(groups: list[Group]) -> tuple[list[str], list[list[str]]]:
    """Each method's difference to LoRA per metric, with its interval and whether it excludes 0."""
    reference = reference_group(groups)
    header = ["method", "metric", f"difference to {reference.name if reference else 'lora'}", "95 % interval",
              "significant"]
    rows = []
    for g in groups:
        for m in metric_names([r for g2 in groups for r in g2.runs]):
            diff = None if m.endswith("/perplexity") else significance(g, reference, m)  # perplexity: the loss's
            if diff is not None:
                signed = (lambda v: f"{v:+.3f}") if m.endswith("loss") else (lambda v: f"{v:+.1f}")  # noqa: E731
                rows.append([g.name, m, signed(diff.value), f"[{signed(diff.low)}, {signed(diff.high)}]",
                             "yes" if not diff.contains(0.0) else "no"])
    return header, rows


# --- per run --------------------------------------------------------------------------------------
COLUMNS = ["run", "model", "method", "impl", "lr", "trainable", "% of base", "peak MiB", "train tok/s", "wall s",
           "saved MiB"]


def table_rows(runs: list[RunSummary]) -> tuple[list[str], list[list[str]]]:
    metrics = metric_names(runs)
    header = COLUMNS + metrics + ["final loss"]
    rows = []
    for r in runs:
        lr = (r.recipe.get("train") or {}).get("lr", float("nan"))
        rows.append([r.name, str(r.recipe.get("model")), r.method, r.impl, _fmt(lr, 2),
                     f"{r.trainable:,}", f"{r.trainable_pct:.2f}", _fmt(r.peak_memory_mb),
                     _fmt(r.tokens_per_s), _fmt(r.wall_time_s), f"{r.adapter_bytes / 2**20:.2f}"]
                    + [fmt_metric(m, r.metrics.get(m, float("nan"))) for m in metrics]
                    + [f"{r.losses[-1][1]:.3f}" if r.losses else "-"])
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
            show = (lambda v: fmt_metric(name, v)) if "/" in name else _fmt  # noqa: E731
            rows.append([f"{ours.name} vs {theirs.name}: {name}", show(a), show(b), show(a - b)])
    return header, rows


def samples(groups: list[Group], base: dict | None, per_task: int = 3) -> dict[str, list[dict]]:
    """Per generation task, a few held-out prompts: {prompt, reference, answers: [(who, text)]}, the
    base model's answer first, then each method's (its first seed's)."""
    base_examples = {task: result.get("examples") or [] for task, result in ((base or {}).get("tasks") or {}).items()}
    found = {}
    for task, prompt_key, answer_key, reference_key in (("e2e", "mr", "prediction", "reference"),
                                                       ("gsm8k", "question", "output", "gold"),
                                                       ("alpaca-heldout", "instruction", "output", "reference")):
        entries = [(g.name, g.first.examples.get(task, [])) for g in groups]
        if base_examples.get(task):
            entries.insert(0, ("base model", base_examples[task]))
        blocks = []
        for i in range(per_task):
            first = next((e[i] for _, e in entries if len(e) > i), None)
            if first is None:
                break
            answers = [(who, _short(e[i].get(answer_key, ""))) for who, e in entries if len(e) > i]
            blocks.append({"prompt": _short(first.get(prompt_key, "")), "reference": _short(str(first.get(reference_key, ""))),
                           "answers": answers})
        if blocks:
            found[task] = blocks
    return found


def _short(text: str, limit: int = 240) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    escape = lambda c: c.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows])


RANKS_NOTE = ("Rank intervals: in each of 1,000 bootstrap draws (the examples resampled once for every method, "
              "each method's seeds resampled), the methods are ranked (1 = best); a method's interval is the "
              "2.5 to 97.5 % range of its rank. P(beats X): the share of those draws in which it beats X.")
INTERVALS_NOTE = ("Metrics are percentages (losses in nats per token): the mean over seeds, ± the standard "
                  "deviation over seeds where there are several, and [a 95 % bootstrap interval] over the "
                  "evaluated examples (and seeds). `*`: the difference to LoRA has a 95 % interval that "
                  "excludes 0 (paired over the same examples). saved MiB: the adapter's tensors as saved (full "
                  "fine-tuning: the whole model's).")


def render_markdown(runs: list[RunSummary], command: str, base: dict | None = None,
                    groups: list[Group] | None = None, tuning: dict | None = None) -> str:
    groups = groups or groups_of(runs, tuning)
    parts = ["# PEFT methods compared", "", f"Produced by `{command}`.", "", setup_line(runs), "",
             markdown_table(*group_rows(groups, base)), "", INTERVALS_NOTE]
    if len(groups) > 1:
        parts += ["", "## Verdict", ""] + [f"- {line}" for line in verdict(groups)]
        parts += ["", "## Ranks", "", markdown_table(*rank_rows(groups)), "", RANKS_NOTE]
    if tuning:
        parts += ["", "## Tuning", "", tuning_note(tuning), "", markdown_table(*tuning_rows(groups))]
    header, rows = significance_rows(groups)
    if rows:
        parts += ["", "## Differences to LoRA", "", markdown_table(header, rows)]
    if base is not None and any(forgetting(g, base) is not None for g in groups):
        parts += ["", f"Forgetting: the {FORGETTING_TASK} loss after training minus the base model's on the same "
                      f"examples (peft's benchmark's measure); positive means the method forgot."]
    if pairs(runs):
        parts += ["", "## peftkit vs peft, same recipe", "", markdown_table(*pair_rows(runs))]
    for task, blocks in samples(groups, base).items():
        parts += ["", f"## Sample outputs: {task}"]
        for number, block in enumerate(blocks, 1):
            parts += ["", f"{number}. `{block['prompt']}` (reference: {block['reference']})", "",
                      markdown_table(["", "output"], [[who, text] for who, text in block["answers"]])]
    parts += ["", "## Runs", "", markdown_table(*table_rows(runs))]
    if any(r.skipped for r in runs):
        parts += ["", "## Not scored", ""] + [f"- {r.name}: {task}: {why}" for r in runs for task, why in r.skipped.items()]
    parts += ["", "Plots (metric against parameters, memory and time; loss curves; per-task intervals): see report.html."]
    return "\n".join(parts) + "\n"


def html_table(header: list[str], rows: list[list[str]], css_class: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    attribute = f' class="{css_class}"' if css_class else ""
    return f"<table{attribute}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _points(groups: list[Group], metric: str) -> list[plots.Point]:
    points = []
    for g in groups:
        found = interval(g, metric)
        value = found.value if found else float("nan")
        low = found.low if found and math.isfinite(found.low) else value
        high = found.high if found and math.isfinite(found.high) else value
        points.append(plots.Point(g.name, g.index, value, low, high, g.first.impl == "peft"))
    return points


def render_html(runs: list[RunSummary], command: str, base: dict | None = None,
                groups: list[Group] | None = None, tuning: dict | None = None) -> str:
    groups = groups or groups_of(runs, tuning)
    metrics = metric_names(runs)
    sections = [f"<h1>PEFT methods compared</h1><p>Produced by <code>{html.escape(command)}</code>.</p>",
                f"<p>{html.escape(setup_line(runs))}</p>", html_table(*group_rows(groups, base)),
                f"<p>{html.escape(INTERVALS_NOTE)}</p>"]
    if len(groups) > 1:
        items = "".join(f"<li>{html.escape(line)}</li>" for line in verdict(groups))
        sections += [f"<h2>Verdict</h2><ul>{items}</ul>", "<h2>Ranks</h2>", html_table(*rank_rows(groups)),
                     f"<p>{html.escape(RANKS_NOTE)}</p>"]
    if tuning:
        sections += ["<h2>Tuning</h2>", f"<p>{html.escape(tuning_note(tuning))}</p>", html_table(*tuning_rows(groups))]
    main = next((m for m in MAIN_METRICS if m in metrics), None)  # a score: the plot's front keeps the higher
    if main:
        costs = {"trainable parameters": [float(g.first.trainable or "nan") for g in groups],
                 "peak memory (MiB)": [g.mean("peak_memory_mb") for g in groups],
                 "training time (s)": [g.mean("train_time_s") for g in groups]}
        sections += [f"<h2>{html.escape(main)} against cost</h2>", plots.tradeoff_svg(main, _points(groups, main), costs)]
    sections += ["<h2>Training loss</h2>",
                 plots.loss_svg([(r.name, g.index, r.impl == "peft", r.losses) for g in groups for r in g.runs])]
    header, rows = significance_rows(groups)
    if rows:
        sections += ["<h2>Differences to LoRA</h2>", html_table(header, rows)]
    if pairs(runs):
        sections += ["<h2>peftkit vs peft, same recipe</h2>", html_table(*pair_rows(runs))]
    for task, blocks in samples(groups, base).items():
        sections.append(f"<h2>Sample outputs: {html.escape(task)}</h2>")
        for block in blocks:
            sections += [f"<p><code>{html.escape(block['prompt'])}</code> (reference: {html.escape(block['reference'])})</p>",
                         html_table(["", "output"], [[who, text] for who, text in block["answers"]], "samples")]
    if any(r.skipped for r in runs):
        items = "".join(f"<li>{html.escape(f'{r.name}: {task}: {why}')}</li>" for r in runs for task, why in r.skipped.items())
        sections += [f"<h2>Not scored</h2><ul>{items}</ul>"]
    if metrics:
        sections += ["<h2>Task metrics</h2>"] + [plots.bars_svg(m, _points(groups, m)) for m in metrics]
    sections += ["<h2>Runs</h2>", html_table(*table_rows(runs))]
    style = ("body{font-family:sans-serif;margin:24px;color:#222;background:#fafafa}"
             "table{border-collapse:collapse;margin:12px 0}td,th{border:1px solid #bbb;padding:4px 8px;"
             "font-size:13px;text-align:right;max-width:420px}th{background:#eee}td:first-child{text-align:left}"
             "table.samples td{text-align:left}svg.plot{display:block;margin:12px 0;background:#fff}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>peftkit compare</title>"
            f"<style>{style}</style></head><body>{''.join(sections)}</body></html>\n")


def compare(run_dirs: list[str | Path], out: str | Path, *, overwrite: bool = False, command: str = "",
            base_eval: str | Path | None = None, tuning: dict | None = None) -> Path:
    """Write report.md, report.html and report.json for the runs into `out`; returns `out`.

    `base_eval`: the base model's eval.json on the same tasks, for forgetting and sample outputs.
    `tuning`: a study's tune/tuning.json (`peftkit.tune`); None: the one beside the runs, if any.
    """
    out = Path(out)
    if not run_dirs:
        raise ConfigError("compare needs at least one run directory")
    runs = [summarize(Path(r)) for r in run_dirs]
    if tuning is None:
        found = {Path(r).resolve().parent / "tune" / "tuning.json" for r in run_dirs}
        beside = found.pop() if len(found) == 1 else None
        tuning = json.loads(beside.read_text()) if beside is not None and beside.is_file() else None
    base = None
    if base_eval is not None:
        if not Path(base_eval).is_file():
            raise ConfigError(f"--base-eval: {base_eval} does not exist: pass the base model's eval.json "
                              f"(peftkit eval <model> --out FILE)")
        base = json.loads(Path(base_eval).read_text())
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} already exists: pass --overwrite to replace it, or choose another --out")
    command = command or "peftkit compare " + " ".join(map(str, run_dirs)) + f" --out {out}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    groups = groups_of(runs, tuning)  # once: every table, plot and report.json reads the same bootstrap results
    (tmp / "report.md").write_text(render_markdown(runs, command, base, groups, tuning))
    (tmp / "report.html").write_text(render_html(runs, command, base, groups, tuning))
    (tmp / "report.json").write_text(json.dumps(report_json(groups, runs, tuning), indent=2, allow_nan=False) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
