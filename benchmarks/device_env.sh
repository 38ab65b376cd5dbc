# Source on a lent GPU machine, from the checkout's root: `source benchmarks/device_env.sh`.
# That machine has torch, Triton, transformers and typer but no ortools, fastapi or uvicorn and no
# package index: their wheels travel in .whl/ (git-ignored; fetched here with `pip download` for
# ortools, immutabledict, protobuf, fastapi, starlette, pydantic, pydantic_core, annotated-types,
# typing-inspection, uvicorn and opentelemetry-api (fastapi >= 0.16x imports it; a run without it fails);
# CPython 3.12, manylinux x86-64, as the device README says). moeplace itself is installed from the
# tree (not editable), so `python3 -m moeplace.cli` and torchrun's `-m moeplace.runtime.launch` work
# from any directory.
set -e
SITE=${MOEPLACE_DEVICE_SITE:-/tmp/site}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${MOEPLACE_WHEELS:-.whl}"/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .
export PYTHONPATH="$SITE" PATH="$SITE/bin:$PATH" PYTHONUNBUFFERED=1
# NVLink multicast stays off on these machines (device KINDS.md).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
set +e
