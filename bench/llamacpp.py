"""llama.cpp itself loads every kind of GGUF file `peftkit export` writes, and is measured against
the model the file came from.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/llamacpp.py --build        # llama.cpp, once (minutes)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/llamacpp.py                # every case -> bench/results/llamacpp.json
    HF_HUB_OFFLINE=1 .venv/bin/python bench/llamacpp.py --only tiny    # the tiny models (a minute or two)
    .venv/bin/python bench/llamacpp.py --update-names                  # peftkit/llamacpp_names.json from its source

llama.cpp is the one llama-cpp-python's sdist vendors, built once into the peftkit cache
(`bench/llamacpp_build.py`). Cases: smollm2-135m, qwen2.5-0.5b and gemma3-270m, and the tiny
Llama, Qwen2 and Gemma 3 models (Gemma 3 with 6 layers, as llama.cpp's layout needs), each as it
is and with a LoRA adapter merged in (seeded, random B: every target weight moves), at f16 and
q8_0. Each is `peftkit.export(..., llamacpp=True)`: transformers' reload check, then llama.cpp on
ten prompts (five texts, plain and in the chat template): token ids, top-1 agreement and the
largest logit difference over every prompt position, 32-token greedy continuations
(`peftkit.gguf_llamacpp`). At q8_0 the weights themselves change, so continuations may part
where the model's best two tokens are close; f16 must match.
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llamacpp_build  # noqa: E402
import transformers  # noqa: E402

import peftkit  # noqa: E402
from peftkit.errors import ModelError  # noqa: E402
from peftkit.export import export  # noqa: E402
from peftkit.models import REGISTRY, ensure_cached  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "llamacpp.json"
NAMES = Path(peftkit.__file__).with_name("llamacpp_names.json")
TINY = ["tiny-llama", "tiny-qwen2", "tiny-gemma3"]
REAL = ["smollm2-135m", "qwen2.5-0.5b", "gemma3-270m"]
OUTTYPES = ["f16", "q8_0"]


def sources(name: str, work: Path) -> dict[str, str]:
    """adapter kind -> what export reads: the model, and a LoRA adapter saved for it."""
    from tests.test_export import gemma3_exportable, saved_adapter

    model = gemma3_exportable(work / "tiny-gemma3-6") if name == "tiny-gemma3" else name
    if name in REGISTRY and not REGISTRY[name].is_tiny:
        ensure_cached(REGISTRY[name])
    adapter = saved_adapter(work / f"{name}-lora", model, std=0.05 if name in TINY else 0.01)
    return {"base": model, "lora": str(adapter)}


def run_case(name: str, adapter: str, source: str, outtype: str, work: Path) -> dict:
    row = {"model": name, "adapter": adapter, "outtype": outtype}
    started = time.perf_counter()
    try:
        record = export(source, outtype=outtype, out=work / f"{name}-{adapter}-{outtype}.gguf", llamacpp=True)
    except ModelError as exc:
        return {**row, "loads": False, "error": str(exc)}
    llama = record["llamacpp"]
    row.update({"bytes": record["bytes"], "loads": llama["loads"], "token_ids": llama["token_ids_equal"],
                "greedy": llama["greedy_equal"], "greedy_split_margin": llama["greedy_split_margin"],
                "top1": llama["top1_agreement"], "top1_flip_margin": llama["top1_flip_margin"],
                "max_logit_diff": llama["max_logit_diff"], "llamacpp_seconds": llama["seconds"],
                "transformers": {k: record[k] for k in ("tokenizer_round_trip", "greedy_generations_equal",
                                                        "top1_agreement", "max_logit_diff")},
                "seconds": round(time.perf_counter() - started, 1)})
    (work / f"{name}-{adapter}-{outtype}.gguf").unlink()
    return row


def table(rows: list[dict]) -> str:
    lines = ["| file | outtype | loads | token ids | greedy (32 tokens) | top-1 | max logit diff |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        file = r["model"] + (" + LoRA (merged)" if r["adapter"] == "lora" else "")
        if not r["loads"]:
            lines.append(f"| {file} | {r['outtype']} | no: {r['error']} | | | | |")
            continue
        parted = f" (parts at a gap of {r['greedy_split_margin']:.3f})" if r["greedy_split_margin"] else ""
        flips = f" (flips at gaps up to {r['top1_flip_margin']:.3f})" if r["top1_flip_margin"] else ""
        lines.append(f"| {file} | {r['outtype']} | yes | {r['token_ids']} | {r['greedy']}{parted} | "
                     f"{100 * r['top1']:.2f}%{flips} | {r['max_logit_diff']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", action="store_true", help="only build llama.cpp and its binding (once)")
    parser.add_argument("--update-names", action="store_true", help="rewrite peftkit/llamacpp_names.json")
    parser.add_argument("--only", choices=["tiny", "real"], help="only the tiny or only the real models")
    args = parser.parse_args()
    if args.update_names:
        NAMES.write_text(json.dumps(llamacpp_build.extract_names(), indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {NAMES}")
        return
    llama_cpp = llamacpp_build.binding()
    if args.build:
        print(f"llama.cpp ready: {llamacpp_build.home()} (llama_cpp {llama_cpp.__version__})")
        return
    models = {"tiny": TINY, "real": REAL}.get(args.only, REAL + TINY)
    rows = []
    with tempfile.TemporaryDirectory(prefix="peftkit-llamacpp-") as work:
        for name in models:
            for adapter, source in sources(name, Path(work)).items():
                for outtype in OUTTYPES:
                    rows.append(run_case(name, adapter, source, outtype, Path(work)))
                    print(table(rows[-1:]).splitlines()[-1], flush=True)
    result = {"llama_cpp_python": llamacpp_build.VERSION, "llama_cpp": llamacpp_build.LLAMA_CPP_COMMIT,
              "build_seconds": llamacpp_build.build_seconds(), "transformers": transformers.__version__,
              "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "threads": 1, "cases": rows}
    if args.only is None:
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {RESULTS}")
    print(table(rows))


if __name__ == "__main__":
    main()
