"""Model cards: the README.md written next to every adapter and merged model."""

from typing import Any

LICENCE_NOTES = {
    "alpaca": ("Stanford Alpaca (tatsu-lab/stanford_alpaca)", "CC BY-NC 4.0",
               "The training data is non-commercial, so this adapter is too: CC BY-NC 4.0."),
}


def base_model_lines(base_model: str) -> list[str]:
    """The base model's licence and provenance, from the registry (a model not in it: just its name)."""
    from peftkit.models import REGISTRY

    entry = next((e for e in REGISTRY.values() if base_model in (e.hub_id, e.name)), None)
    if entry is None:
        return [f"{base_model}: see its own licence."]
    return [f"{entry.hub_id}, licence: {entry.licence}.", *entry.notes]


def render_card(*, base_model: str, method: str, hyperparameters: dict[str, Any], trainable: tuple[int, int],
                data: str | list[str] | None = None, metrics: dict[str, Any] | None = None, notes: list[str] | None = None) -> str:
    """A Markdown model card with peft-style YAML front matter."""
    lines = ["---", f"base_model: {base_model}", "library_name: peft", "tags:", "- peftkit", f"- {method}", "---", "",
             f"# {method} adapter for {base_model}", "",
             "Written by peftkit in peft's format: load it with `peftkit.load_adapter(model, dir)` or "
             "`peft.PeftModel.from_pretrained(model, dir)`.", "", "## Method", "",
             "| hyperparameter | value |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in hyperparameters.items()]
    n, total = trainable
    lines += ["", f"Trainable parameters: {n:,} of {total:,} ({100 * n / total:.2f}%).", "", "## Data", ""]
    sources = [data] if isinstance(data, str) else list(data or [])
    for source in sources:
        if source in LICENCE_NOTES:
            name, licence, note = LICENCE_NOTES[source]
            lines += [f"Trained on {name}, licence {licence}. {note}"]
        else:
            lines += [f"Trained on: {source}."]
    if not sources:
        lines += ["No training data recorded (an untrained or hand-made adapter)."]
    lines += ["", "## Base model", "", *base_model_lines(base_model), "", "## Metrics", ""]
    if metrics:
        lines += ["| metric | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in metrics.items()]
    else:
        lines += ["No evaluation recorded."]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"
