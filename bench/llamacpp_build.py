"""llama.cpp, built once from the source that the llama-cpp-python sdist vendors, and what its
source says a GGUF file may contain.

    sdist (PyPI, sha256-pinned)  ->  $PEFTKIT_CACHE/llamacpp/<version>/src  ->  cmake: libllama and
    the ggml libraries only  ->  build/bin  ->  the Python binding installed without compiling
    (--target python/, no llama.cpp build) and pointed at build/bin by LLAMA_CPP_LIB_PATH

The build (libllama and ggml only, no tools) took 91 s on this 2-core machine, 106 s with the
download and the binding; a loaded machine can take many times that. `build.json` beside it
records how long it took. `extract_names` reads, from that
source, the names `peftkit.llamacpp_names` checks exports against; `bench/llamacpp.py
--update-names` writes them into peftkit, and the `llamacpp` tests check they still agree.
"""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peftkit.models.fetch import cache_dir, check_sha256  # noqa: E402

VERSION = "0.3.36"  # llama-cpp-python; it vendors ggml-org/llama.cpp@0c1e57098
LLAMA_CPP_COMMIT = "0c1e57098"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
DISKCACHE = "diskcache==5.6.3"  # the binding's one dependency peftkit does not already install
CMAKE_OPTIONS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
                 "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON",
                 # one thread per check (see bench/llamacpp.py): no OpenMP pool spinning beside torch
                 "-DGGML_OPENMP=OFF"]


def home() -> Path:
    return cache_dir() / "llamacpp" / VERSION


def source() -> Path:
    """The unpacked sdist (downloaded from PyPI once, sha256-checked); its llama.cpp is `vendor/llama.cpp`."""
    root = home() / "src"
    if (root / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        return root
    home().mkdir(parents=True, exist_ok=True)
    sdist = home() / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.is_file():
        print(f"downloading the llama-cpp-python {VERSION} sdist from PyPI", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                        f"llama-cpp-python=={VERSION}", "-d", str(home())], check=True)
    check_sha256(sdist, SDIST_SHA256, f"llama-cpp-python=={VERSION} sdist")
    unpacked = home() / f".unpack-{os.getpid()}"
    with tarfile.open(sdist) as archive:
        archive.extractall(unpacked, filter="data")
    shutil.rmtree(root, ignore_errors=True)
    os.replace(unpacked / f"llama_cpp_python-{VERSION}", root)
    shutil.rmtree(unpacked, ignore_errors=True)
    return root


def build() -> Path:
    """The folder holding libllama.so and the ggml libraries, built once (`build.json` marks it done)."""
    lib, record = home() / "build" / "bin", home() / "build.json"
    if record.is_file() and (lib / "libllama.so").is_file():
        return lib
    llama_cpp = source() / "vendor" / "llama.cpp"
    jobs = str(os.cpu_count() or 1)
    print(f"building llama.cpp {LLAMA_CPP_COMMIT} into {home() / 'build'} (minutes, once)", flush=True)
    started = time.perf_counter()
    for cmd in (["cmake", "-S", str(llama_cpp), "-B", str(home() / "build"), *CMAKE_OPTIONS],
                ["cmake", "--build", str(home() / "build"), "--target", "llama", "-j", jobs]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"llama.cpp build failed ({' '.join(cmd[:2])}): {done.stderr.strip()[-2000:]}")
    seconds = round(time.perf_counter() - started, 1)
    record.write_text(json.dumps({"llama_cpp_python": VERSION, "llama_cpp": LLAMA_CPP_COMMIT, "seconds": seconds,
                                  "jobs": int(jobs), "cmake": CMAKE_OPTIONS}, indent=2) + "\n")
    print(f"built in {seconds:.0f} s", flush=True)
    return lib


def build_seconds() -> float | None:
    record = home() / "build.json"
    return json.loads(record.read_text())["seconds"] if record.is_file() else None


def binding() -> ModuleType:
    """The `llama_cpp` module, on the library `build()` made: its package installed beside the build
    (no compiler runs), then found there as `peftkit export --llamacpp` finds it."""
    from peftkit.gguf_llamacpp import load_binding

    build()
    target = home() / "python"
    if not (target / "llama_cpp" / "__init__.py").is_file():
        env = {**os.environ, "CMAKE_ARGS": "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"}
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                        str(home() / f"llama_cpp_python-{VERSION}.tar.gz"), DISKCACHE], check=True, env=env)
    return load_binding()


# --- what the source accepts -------------------------------------------------------------------


def extract_names(root: Path | None = None) -> dict:
    """llama.cpp's names, read from its source (see `peftkit.llamacpp_names` for their use)."""
    llama_cpp = (root or source()) / "vendor" / "llama.cpp"
    converter = (llama_cpp / "conversion" / "base.py").read_text()
    vocab = (llama_cpp / "src" / "llama-vocab.cpp").read_text()
    arch = (llama_cpp / "src" / "llama-arch.cpp").read_text()
    chktxt = ast.literal_eval(re.search(r"^\s*chktxt = ('.*')$", converter, re.M).group(1))
    hashes = {}
    for digest, name in re.findall(r'if chkhsh == "([0-9a-f]{64})":\n(?:\s*#[^\n]*\n)*\s*res = "([^"]+)"', converter):
        hashes[digest] = name  # as in the converter's chain of ifs, a later match wins
    # the BPE branch: from the empty-name warning to the throw for an unknown name
    bpe = vocab[vocab.index("tokenizer_pre.empty()"):vocab.index('"unknown pre-tokenizer type')]
    models = vocab[vocab.index("determine vocab type"):vocab.index('"unknown tokenizer:')]
    return {
        "llama_cpp_python": VERSION,
        "llama_cpp": LLAMA_CPP_COMMIT,
        "chktxt": chktxt,
        "pre_tokenizer_hashes": dict(sorted(hashes.items(), key=lambda item: (item[1], item[0]))),
        "pre_tokenizers": sorted(set(re.findall(r'tokenizer_pre == "([^"]+)"', bpe))),
        "tokenizer_models": sorted(set(re.findall(r'tokenizer_model == "([^"]+)"', models))),
        "architectures": sorted(set(re.findall(r'\{\s*LLM_ARCH_\w+,\s*"([^"]+)"\s*\}', block(arch, "LLM_ARCH_NAMES")))),
        "keys": sorted(set(re.findall(r'\{\s*LLM_KV_\w+,\s*"([^"]+)"\s*\}', block(arch, "LLM_KV_NAMES")))),
        "tensors": sorted(set(re.findall(r'\{\s*LLM_TENSOR_\w+,\s*"([^"]+)"\s*\}', block(arch, "LLM_TENSOR_NAMES")))),
    }


def block(source_text: str, table: str) -> str:
    """The body of `static const std::map<...> <table> = { ... };`."""
    start = source_text.index(f"{table} = {{")
    return source_text[start:source_text.index("\n};", start)]
