#!/usr/bin/env bash
# Creates (or reuses) the virtual environment of one or more peers and prints each one's python.
#
#   bash bench/peers/setup.sh NAME [NAME ...]     # e.g. bitsandbytes torchao quanto hqq
#   bash bench/peers/setup.sh --list              # the names this script knows
#
# Each venv lives under ${LOWBIT_PEERS:-~/.cache/lowbit/peers}/NAME. bench/peers/venv.py does the work:
# torch==2.13.0 first, then the requirements below with a constraint file pinning torch (any other route
# lets pip pull a CUDA build), and a marker so that a second call with the same list is a no-op.
#
# The llmcompressor, gptqmodel and autoawq venvs are shared with bench/awq_peers.py and bench/gptq_peers.py:
# their requirement lists must stay exactly as those scripts spell them, or the venvs get rebuilt.
# The calibration-free peers also get what `import lowbit` needs (gguf, pyyaml, accelerate) and the main
# venv's transformers, because their models are scored inside their venv by lowbit.eval itself.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python3}"

LOWBIT_DEPS="transformers==5.23.0 accelerate gguf pyyaml tqdm safetensors"
declare -A REQS=(
  [bitsandbytes]="bitsandbytes==0.50.2 $LOWBIT_DEPS"
  [torchao]="torchao==0.18.0 $LOWBIT_DEPS"
  [quanto]="optimum-quanto==0.2.7 $LOWBIT_DEPS"
  [hqq]="hqq==0.2.8.post1 $LOWBIT_DEPS"
  [llmcompressor]="llmcompressor==0.14.0.1"
  [gptqmodel]="gptqmodel==7.6.0"
  [autoawq]="autoawq==0.2.9"
)

if [[ $# -eq 0 ]]; then
  echo "usage: $0 NAME [NAME ...] | --list" >&2
  exit 2
fi
if [[ $1 == --list ]]; then
  printf '%s\n' "${!REQS[@]}" | sort
  exit 0
fi
for name in "$@"; do
  if [[ -z ${REQS[$name]+x} ]]; then
    echo "setup.sh: unknown peer '$name'; known: $(printf '%s ' "${!REQS[@]}")" >&2
    exit 2
  fi
  # shellcheck disable=SC2086  # the requirement list is meant to split into words
  "$python" "$here/venv.py" "$name" ${REQS[$name]}
done
