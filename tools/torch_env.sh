#!/usr/bin/env bash
# Sets up the PyTorch side of the interop tests (tests/test_interop_torch.py): Debian's
# python3-torch (torch 1.13.1, numpy 1.24; PyPI's torch wheels are too large for these machines)
# and a separate virtualenv created with --system-site-packages, holding timm, PEFT and their
# pure-Python dependencies installed with --no-deps (Debian's torch reports 1.13.0a0, so pip would
# otherwise fetch a PyPI torch). The JAX side needs numpy 2, so the two sides never share a
# process: they exchange arrays through files.
#
# Idempotent and cached: a stamp file in the venv records the pinned set; a second run with the
# same set does nothing. Fails loudly (non-zero exit, the failing step named) when it cannot
# install: the interop tests must never skip silently.
#
#   tools/torch_env.sh            # or: make torch-env
#   TORCH_VENV=/path tools/torch_env.sh
set -euo pipefail

VENV="${TORCH_VENV:-.torch-venv}"
APT_PACKAGES="python3-torch python3-torchvision python3-venv python3-numpy python3-yaml
  python3-packaging python3-filelock python3-requests python3-tqdm python3-psutil python3-regex
  python3-fsspec python3-typing-extensions python3-jinja2"
# Versions that run on torch 1.13 and numpy 1.24.
PIP_PACKAGES="peft==0.17.1 timm==1.0.15 transformers==4.46.3 tokenizers==0.20.3
  accelerate==1.0.1 huggingface_hub==0.26.5 safetensors==0.4.5"
STAMP="$VENV/.guft-torch-env"
WANT="$(echo "$APT_PACKAGES $PIP_PACKAGES" | tr -s ' \n' ' ')"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi

fail() { echo "torch_env: FAILED: $*" >&2; exit 1; }

missing=""
for p in $APT_PACKAGES; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "torch_env: apt-get install$missing"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq || fail "apt-get update"
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing \
    >/dev/null || fail "apt-get install$missing"
fi

rm -rf "$VENV"
/usr/bin/python3 -m venv --system-site-packages "$VENV" || fail "venv $VENV"
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q --no-deps $PIP_PACKAGES || fail "pip install $PIP_PACKAGES"
"$VENV/bin/python" - <<'PY' || fail "import check"
import numpy, peft, safetensors, timm, torch, transformers
print(f"torch_env: torch {torch.__version__}, numpy {numpy.__version__}, timm {timm.__version__},"
      f" peft {peft.__version__}, transformers {transformers.__version__}")
PY
echo "$WANT" > "$STAMP"
