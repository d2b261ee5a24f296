"""`peftkit compare`: tables from real run directories, an offline HTML page whose plots render."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from peftkit.compare import compare, method_name, pairs, summarize
from peftkit.errors import ConfigError
from peftkit.recipe import load_recipe
from peftkit.train import train
from tests.test_train import write_recipe


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    path = write_recipe(tmp, adapter_overrides={"dropout": 0.0}, train={"max_steps": 4, "logging_steps": 1})
    ours = train(load_recipe(str(path), [f"output={tmp / 'lora'}"]))
    theirs = train(load_recipe(str(path), ["impl=peft", f"output={tmp / 'lora-peft'}"]))
    dora = train(load_recipe(str(path), ["adapter=dora", f"output={tmp / 'dora'}"]))
    for run, accuracy in ((ours, 75.0), (theirs, 70.0), (dora, 80.0)):  # percentages, as `peftkit eval` writes
        (run / "eval.json").write_text(json.dumps({"tasks": {"sst2": {"metrics": {"accuracy": accuracy}}}}))
    (dora / "eval.json").write_text(json.dumps({"tasks": {"sst2": {"metrics": {"accuracy": 80.0}},
                                                          "e2e": {"metrics": {}, "skipped": "cannot generate"}}}))
    return [ours, theirs, dora]


def test_summaries_and_pairs(runs):
    summaries = [summarize(r) for r in runs]
    assert [(s.method, s.impl) for s in summaries] == [("lora", "peftkit"), ("lora", "peft"), ("dora", "peftkit")]
    assert summaries[0].trainable == summaries[1].trainable > 0 and summaries[2].trainable > summaries[0].trainable
    assert [len(s.losses) for s in summaries] == [4, 4, 4] and summaries[0].adapter_bytes > 0
    assert [(a.name, b.name) for a, b in pairs(summaries)] == [("lora", "lora-peft")]
    assert method_name({"peft_type": "LORA", "peftkit": {"base_quantization": {"quant_type": "nf4"}}}) == "qlora"


def test_markdown_and_html(runs, tmp_path):
    out = compare(runs, tmp_path / "report")
    markdown = (out / "report.md").read_text()
    assert "| lora | tiny-llama | lora | peftkit |" in markdown and "| lora-peft | tiny-llama | lora | peft |" in markdown
    assert "sst2/accuracy" in markdown and "lora vs lora-peft: sst2/accuracy | 75.0 | 70.0 | 5.0" in markdown
    assert "Shared setup: model tiny-llama; data " in markdown and "; 4 steps x batch 4; seed 7." in markdown
    assert "## Not scored\n\n- dora: e2e: cannot generate" in markdown
    page = (out / "report.html").read_text()
    plotted = re.findall(r'<svg class="plot" data-plot="([^"]+)"', page)
    assert plotted == ["tradeoff", "loss", "sst2/accuracy"]  # matplotlib's SVG, inlined
    assert "<script" not in page and not re.search(r'(src|href)="(?!#)', page)  # nothing to fetch
    with pytest.raises(ConfigError, match="--overwrite"):
        compare(runs, out)


def test_not_a_run(tmp_path):
    with pytest.raises(ConfigError, match="not a finished run directory"):
        compare([tmp_path], tmp_path / "out")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_page_renders_in_headless_chromium(runs, tmp_path):
    from PIL import Image

    out = compare(runs, tmp_path / "report")
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,1400", f"--screenshot={shot}"]
    subprocess.run([CHROMIUM, *flags, (out / "report.html").as_uri()], capture_output=True, timeout=120)
    image = Image.open(shot).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20)
    assert len(colours) > 50  # not blank: text, tables and plots
    pixels = set(c for _, c in colours)
    for hex_colour in ("#1f77b4", "#d62728", "#2ca02c"):  # every run's curve and bar is drawn
        rgb = tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
        assert rgb in pixels, hex_colour
    dom = subprocess.run([CHROMIUM, *flags[:-1], "--dump-dom", (out / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert dom.count('class="plot"') == 3 and 'data-plot="loss"' in dom and 'data-plot="sst2/accuracy"' in dom


def scored(run: Path, correct: list[int], nll: list[float]) -> None:
    """An eval.json with per-example statistics, as the eval tasks write them."""
    labels = [i % 2 for i in range(len(correct))]
    predictions = [label if ok else 1 - label for label, ok in zip(labels, correct)]
    tasks = {"sst2": {"metrics": {"accuracy": 100 * sum(correct) / len(correct)},
                      "scores": {"correct": correct, "prediction": predictions, "label": labels}},
             "alpaca-heldout": {"metrics": {"loss": sum(nll) / (10 * len(nll))},
                                "scores": {"nll": nll, "tokens": [10] * len(nll)}}}
    (run / "eval.json").write_text(json.dumps({"tasks": tasks}))


def test_seeds_intervals_significance_and_forgetting(runs, tmp_path):
    rng = __import__("random").Random(0)
    lora, _, dora = runs
    seeds = []
    for seed in (1, 2):  # two seeds of LoRA near 70 %, DoRA near 95 %: a real difference
        run = shutil.copytree(lora, tmp_path / f"lora-seed{seed}")
        scored(run, [int(rng.random() < 0.7) for _ in range(200)], [20 + rng.random() for _ in range(200)])
        seeds.append(run)
    better = shutil.copytree(dora, tmp_path / "dora")
    recipe = yaml.safe_load((better / "recipe.yaml").read_text())
    recipe["data"]["train"] = "sst2"  # trained without alpaca: its held-out loss measures forgetting
    (better / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    scored(better, [int(rng.random() < 0.95) for _ in range(200)], [21 + rng.random() for _ in range(200)])
    base = tmp_path / "base.json"
    scored(tmp_path, [1] * 100 + [0] * 100, [19 + rng.random() for _ in range(200)])
    (tmp_path / "eval.json").rename(base)
    out = compare([*seeds, better], tmp_path / "report", base_eval=base)
    markdown = (out / "report.md").read_text()
    rows = {}
    for line in markdown.splitlines():  # the first table: one row per method
        if line.startswith("| "):
            rows.setdefault(line.split(" | ")[0].strip("| "), line)
    assert rows["lora"].split(" | ")[2] == "2"  # one row for both seeds
    assert re.search(r"\| [67]\d\.\d ±\d\.\d \[[56]\d\.\d, 7\d\.\d\] \|", rows["lora"])  # mean ± spread [interval]
    assert re.search(r"9\d\.\d \[\d\d\.\d, \d\d\.\d\] \*", rows["dora"])  # significantly above LoRA
    assert "in training mix" in rows["lora"]  # write_recipe trains on alpaca: not forgetting
    assert re.search(r"\| \+0\.(19\d|20\d) \[\+0\.1\d\d, \+0\.2\d\d\] \|", rows["dora"])  # 2 nats / 10 tokens
    assert "| dora | sst2/accuracy | +2" in markdown and "| yes |" in markdown
    # ranks, the probability of beating LoRA and the verdict, all from the bootstrap; report.json holds them
    assert "| method | rank: alpaca-heldout/loss | rank: sst2/accuracy | P(beats lora) on sst2/accuracy |" in markdown
    assert "| lora | [1, 1] | [2, 2] | - |" in markdown and "| dora | [2, 2] | [1, 1] | 1.00 |" in markdown
    assert "- On sst2/accuracy, dora is the best: it alone has a 95 % rank interval that includes 1." in markdown
    assert "- Pareto front of sst2/accuracy against trainable parameters (means): lora, dora." in markdown
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "tiny-llama" and report["selection"] is None and report["main_metric"] == "sst2/accuracy"
    by_name = {m["name"]: m for m in report["methods"]}
    assert len(by_name["lora"]["seeds"]) == 2 and by_name["dora"]["rank"]["sst2/accuracy"] == [1, 1]
    accuracy = by_name["lora"]["metrics"]["sst2/accuracy"]
    assert accuracy["ci"][0] < accuracy["mean"] < accuracy["ci"][1] and accuracy["sd"] > 0
    assert by_name["dora"]["p_beats"] == {"lora": {"alpaca-heldout/loss": pytest.approx(0.0, abs=0.01),
                                                   "sst2/accuracy": 1.0}}  # its held-out loss is a nat higher
    assert by_name["dora"]["trainable"] > by_name["lora"]["trainable"] > 0 and by_name["lora"]["converged"] is None
