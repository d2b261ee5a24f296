"""Downstream evaluation: task specs in `eval/*.yaml`, offline metrics, k-shot prompting, sampling.

    from peftkit.evaluation import evaluate_model
    report = evaluate_model(model, tokenizer, ["sst2", "e2e"], shots=4, limit=100)

`split_e2e`, `split_heldout`, `alpaca_chat` and `chat_example` are the splits and formatting
the training pipeline shares with evaluation, so both see the same held-out data.
"""

from peftkit.evaluation.command import eval_command, eval_from_args
from peftkit.evaluation.prompts import IGNORE_INDEX, chat_example
from peftkit.evaluation.report import format_table, write_report
from peftkit.evaluation.runner import evaluate_model, prepare_specs
from peftkit.evaluation.spec import GenerationSettings, TaskResult, TaskSpec, load_spec, task_names
from peftkit.evaluation.splits import split_e2e, split_heldout
from peftkit.evaluation.tasks.alpaca import alpaca_chat
from peftkit.evaluation.tasks.gsm8k import extract_answer

__all__ = [
    "IGNORE_INDEX", "GenerationSettings", "TaskResult", "TaskSpec", "alpaca_chat", "chat_example", "eval_command",
    "eval_from_args", "evaluate_model", "extract_answer", "format_table", "load_spec", "prepare_specs", "split_e2e",
    "split_heldout", "task_names", "write_report",
]
