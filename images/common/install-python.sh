#!/bin/sh
# Python layer shared by every flavor. FLAVOR picks where torch comes from; every
# version is a build arg taken from images/versions.env.
set -eu
: "${FLAVOR:?}" "${PYTHON_VERSION:?}" "${TORCH_VERSION:?}" "${DEEPSPEED_VERSION:?}"
: "${TRANSFORMERS_VERSION:?}" "${TOKENIZERS_VERSION:?}" "${SAFETENSORS_VERSION:?}"
python="python${PYTHON_VERSION}"
have="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ "$have" != "$PYTHON_VERSION" ]; then
  echo "$python is python $have, manifest wants $PYTHON_VERSION" >&2
  exit 1
fi
"$python" -m venv /opt/venv
export PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
pip=/opt/venv/bin/pip
$pip install --upgrade "pip>=24" wheel setuptools

index=""
case "$FLAVOR" in
  cpu)
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
      index="--extra-index-url ${TORCH_INDEX_URL}"
    fi
    ;;
  cuda | rocm)
    # PyPI's torch is built for one CUDA release only; the flavor's index (the manifest's
    # TORCH_INDEX_CUDA / TORCH_INDEX_ROCM) must be the only index torch can come from.
    : "${TORCH_INDEX_URL:?the $FLAVOR image needs the manifest torch index}"
    index="--index-url ${TORCH_INDEX_URL}"
    # The image builder has no GPU: DeepSpeed would pick its cpu accelerator and its JIT
    # builders would find no device to compile for. Compile FusedAdam into the package
    # instead, for the manifest's arch list (TORCH_CUDA_ARCH_LIST / PYTORCH_ROCM_ARCH build
    # args). DeepSpeed runs ROCm through its cuda accelerator too.
    if [ "$FLAVOR" = cuda ]; then
      : "${TORCH_CUDA_ARCH_LIST:?}"
    else
      : "${PYTORCH_ROCM_ARCH:?}"
    fi
    export DS_ACCELERATOR=cuda DS_BUILD_FUSED_ADAM=1
    ;;
  *)
    echo "unknown FLAVOR $FLAVOR" >&2
    exit 1
    ;;
esac
# shellcheck disable=SC2086
$pip install --find-links /opt/deepfleet/wheels $index "torch==${TORCH_VERSION}"
if [ "$FLAVOR" = cuda ] && [ ! -x /usr/local/cuda/bin/nvcc ]; then
  # Not NVIDIA's devel base: take nvcc and the CUDA headers from NVIDIA's wheels, at the
  # CUDA release torch was built for, and make them the /usr/local/cuda that DeepSpeed's
  # builders and torch's cpp_extension look for.
  cuda="$(/opt/venv/bin/python -c 'import torch; print(torch.version.cuda or "")')"
  major="${cuda%%.*}"
  if [ -z "$cuda" ] || [ "$major" -lt 13 ]; then
    echo "install-python: torch's CUDA ${cuda:-(none)} has no single-tree toolkit wheels;" \
      "build the cuda image on NVIDIA's devel base (the default BASE_IMAGE)" >&2
    exit 1
  fi
  $pip install --find-links /opt/deepfleet/wheels "cuda-toolkit[nvcc,cccl,cudart]==${cuda}.*"
  tree="$(/opt/venv/bin/python -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu${major}'))")"
  ln -sfn lib "$tree/lib64"
  ln -sf "libcudart.so.${major}" "$tree/lib/libcudart.so"
  ln -sfn "$tree" /usr/local/cuda
  /usr/local/cuda/bin/nvcc --version | tail -n 2
fi
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
flavor = "${FLAVOR}"
# The image's labels promise the manifest's CUDA / ROCm release: torch must be built for it.
if flavor == "cuda":
    want = ".".join("${CUDA_VERSION:-}".split(".")[:2])
    assert torch.version.cuda == want, f"torch {torch.__version__} is CUDA {torch.version.cuda}, not {want}"
if flavor == "rocm":
    want = ".".join("${ROCM_VERSION:-}".split(".")[:2])
    assert ((torch.version.hip or "") + ".").startswith(want + "."), f"torch {torch.__version__} is HIP {torch.version.hip}, not ROCm {want}"
print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "transformers", transformers.__version__)
PY
