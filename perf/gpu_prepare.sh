#!/usr/bin/env bash
# Run HERE (the development machine) before `perf/gpu_check.sh` on a lent GPU machine.
# The default model's GGUF (98 MB) is larger than what may travel to that machine (64 MiB), so this
# copies only its config and tokenizer into .gpu/default_shapes/ (ignored; name `.gpu` in the device
# call's carry). gpu_check.sh then benches a random-weight checkpoint of the default model's exact
# shapes (SmolLM2-135M: 30 layers, hidden 576, vocab 49152): the same kernels and bytes per token.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SRC=$($PY -c "from offramp.model.loader import resolve_model; print(resolve_model('default'))")
mkdir -p .gpu/default_shapes
for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
  [ -f "$SRC/$f" ] && cp "$SRC/$f" .gpu/default_shapes/
done
du -sh .gpu
