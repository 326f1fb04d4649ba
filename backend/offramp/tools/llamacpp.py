"""``offramp bench --compare llamacpp``: llama.cpp (llama-cpp-python) on the same GGUF file.

llama-cpp-python builds from source, so it lives in a separate tools environment (``.venv-tools/``,
made by ``make tools-env``) and never in the project's: this module runs *itself* there as a
subprocess (``python llamacpp.py`` reads a JSON spec on stdin and prints one JSON line), which is why
it imports only the standard library at the top.

What is compared: the same GGUF file, the same prompts as the same token ids (Offramp's chat-templated
ids, so both read identical input), the same ``max_tokens``, greedy, the same number of threads, one
request at a time. With ``ignore_eos`` a logits processor sets every end-of-generation token's logit
to -inf (llama.cpp would otherwise stop there). Tokens per second count generated tokens over the
wall time of all requests, prefill included, as Offramp's ``tokens_per_s`` does. llama-cpp-python's
own reuse of the previous prompt's common prefix is left on (Offramp shares prompt prefixes too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

TOOLS_ENV = ".venv-tools"
SKIP_NO_GGUF = "llama.cpp comparison skipped: it needs a GGUF model (--model default or a .gguf file)"
SKIP_NO_ENV = "llama.cpp comparison skipped: run `make tools-env`"


def tools_python() -> Path | None:
    """The tools environment's python with llama_cpp importable (``OFFRAMP_TOOLS_PYTHON`` overrides)."""
    override = os.environ.get("OFFRAMP_TOOLS_PYTHON")
    repo = Path(__file__).resolve().parents[3]  # backend/offramp/tools/llamacpp.py -> the checkout
    candidates = (
        [Path(override)] if override else [repo / TOOLS_ENV / "bin/python", Path.cwd() / TOOLS_ENV / "bin/python"]
    )
    for python in candidates:
        if python.is_file():
            probe = subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True, timeout=120)
            if probe.returncode == 0:
                return python
    return None


def compare(
    gguf: Path | None,
    prompt_ids: list[list[int]],
    max_tokens: int,
    ignore_eos: bool,
    num_threads: int,
    eos_ids: set[int],
) -> dict:
    """llama.cpp's figures as bench fields, or ``llamacpp_skipped`` with the one-line reason."""
    python = tools_python() if gguf is not None else None
    if gguf is None or python is None:
        reason = SKIP_NO_GGUF if gguf is None else SKIP_NO_ENV
        print(f"offramp: {reason}", file=sys.stderr)
        return {"llamacpp_skipped": reason}
    spec = {
        "model": str(gguf),
        "prompt_ids": prompt_ids,
        "max_tokens": max_tokens,
        "ignore_eos": ignore_eos,
        "num_threads": num_threads,
        "eos_ids": sorted(eos_ids),
    }
    proc = subprocess.run(
        [str(python), str(Path(__file__).resolve())], input=json.dumps(spec), capture_output=True, text=True
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        reason = f"llama.cpp comparison failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}"
        print(f"offramp: {reason}", file=sys.stderr)
        return {"llamacpp_skipped": reason}
    return json.loads(lines[-1])


# -- the worker: runs inside the tools environment --------------------------------------------------
def _eog_ids(llm, eos_ids: list[int]) -> list[int]:
    """Every token llama.cpp ends generation at (EOS, EOT, ...) plus the caller's EOS ids."""
    import llama_cpp

    ids = set(eos_ids) | {llm.token_eos()}
    vocab = getattr(llm._model, "vocab", None)
    is_eog = getattr(llama_cpp, "llama_vocab_is_eog", None)
    if vocab is not None and is_eog is not None:
        ids |= {t for t in range(llm.n_vocab()) if is_eog(vocab, t)}
    return sorted(ids)


def _run(spec: dict) -> dict:
    import llama_cpp
    import numpy as np

    prompts = spec["prompt_ids"]
    n_ctx = max(len(p) for p in prompts) + spec["max_tokens"] + 16
    threads = spec["num_threads"]
    llm = llama_cpp.Llama(
        model_path=spec["model"], n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, verbose=False
    )
    banned = _eog_ids(llm, spec["eos_ids"]) if spec["ignore_eos"] else []

    def no_eos(input_ids, scores):  # scores: [vocab] float32
        scores[banned] = -np.inf
        return scores

    processors = llama_cpp.LogitsProcessorList([no_eos]) if banned else None
    kwargs = {"temperature": 0.0, "logits_processor": processors, "stop": []}
    llm.create_completion(prompt=prompts[0][:8], max_tokens=4, **kwargs)  # warm-up
    num_tokens, start = 0, time.perf_counter()
    for ids in prompts:
        out = llm.create_completion(prompt=ids, max_tokens=spec["max_tokens"], **kwargs)
        num_tokens += out["usage"]["completion_tokens"]
    wall = time.perf_counter() - start
    return {
        "llamacpp_tokens_per_s": round(num_tokens / wall, 2),
        "llamacpp_num_output_tokens": num_tokens,
        "llamacpp_wall_s": round(wall, 3),
        "llamacpp_version": llama_cpp.__version__,
        "llamacpp_system": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),  # its SIMD build
    }


if __name__ == "__main__":
    print(json.dumps(_run(json.loads(sys.stdin.read()))), flush=True)
