#!/bin/sh
# Python layer shared by every flavor. FLAVOR picks where torch comes from; every
# version is a build arg taken from images/versions.env.
set -eu
: "${PYTHON_VERSION:?}" "${TORCH_VERSION:?}" "${DEEPSPEED_VERSION:?}" "${TRANSFORMERS_VERSION:?}"
: "${TOKENIZERS_VERSION:?}" "${SAFETENSORS_VERSION:?}"
have="$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ "$have" != "$PYTHON_VERSION" ]; then
  echo "base image has python $have, manifest wants $PYTHON_VERSION" >&2
  exit 1
fi
python3 -m venv /opt/venv
export PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
pip=/opt/venv/bin/pip
$pip install --upgrade "pip>=24" wheel setuptools
index=""
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  index="--extra-index-url ${TORCH_INDEX_URL}"
fi
# shellcheck disable=SC2086
$pip install --find-links /opt/deepfleet/wheels $index "torch==${TORCH_VERSION}"
# DeepSpeed's setup.py imports torch: build isolation would fetch a second torch.
$pip install --find-links /opt/deepfleet/wheels --no-build-isolation \
  "torch==${TORCH_VERSION}" "deepspeed==${DEEPSPEED_VERSION}" \
  "transformers==${TRANSFORMERS_VERSION}" "tokenizers==${TOKENIZERS_VERSION}" \
  "safetensors==${SAFETENSORS_VERSION}" ninja pytest
rm -rf /opt/deepfleet/wheels
/opt/venv/bin/python - <<PY
import torch, deepspeed, transformers
assert torch.__version__.split("+")[0] == "${TORCH_VERSION}", torch.__version__
assert deepspeed.__version__ == "${DEEPSPEED_VERSION}", deepspeed.__version__
assert transformers.__version__ == "${TRANSFORMERS_VERSION}", transformers.__version__
print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "transformers", transformers.__version__)
PY
