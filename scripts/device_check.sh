#!/usr/bin/env bash
# The GPU device check: drafthorse's CUDA tests, then its device benchmark, on a machine that has PyTorch,
# transformers and grpcio but not Ray or this project's other dependencies, and no network. Run from the
# repository root with the wheels of the two pure imports it lacks in .whl/ (`make device-wheels` here):
#
#   scripts/device_check.sh OUT_DIR        (about 8 minutes at most; OUT_DIR default: $OUT, else device_out)
#
# Writes OUT_DIR/gpu.txt (the GPU, driver, torch), OUT_DIR/gpu-tests.log (pytest -m gpu: lossless greedy
# and the sampling G-test on CUDA), OUT_DIR/device_bench.json (cluster/tools/devicebench.py). Exits non-zero
# when a test failed or the benchmark recorded an error; every part runs regardless. A dry run on a machine
# without a GPU (the tests skip): DH_DEVICE=cpu DH_SHAPES=tiny scripts/device_check.sh /tmp/dry
set -uo pipefail
out=${1:-${OUT:-device_out}}
mkdir -p "$out"
start=$(date +%s)
site=$(mktemp -d)
pkg=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl || { echo "no wheels in .whl/: run make device-wheels"; exit 2; }
mkdir -p "$pkg/drafthorse"   # the namespace drafthorse.* without installing (pyproject's package-dir)
for d in actors cluster runtime protos; do ln -s "$PWD/$d" "$pkg/drafthorse/$d"; done
export PYTHONPATH="$pkg:$site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider -o addopts="-ra" -m gpu tests/test_device.py 2>&1 | tee "$out/gpu-tests.log"
tests=${PIPESTATUS[0]}
left=$(( 470 - ($(date +%s) - start) ))
timeout "$left" python3 -m drafthorse.cluster.tools.devicebench --device "${DH_DEVICE:-cuda}" \
    --shapes "${DH_SHAPES:-smollm2-135m,llama3-8b}" --out "$out/device_bench.json" --budget-s $(( left - 90 ))
bench=$?
python3 -c "import json, sys; e = json.load(open(sys.argv[1]))['errors']; print('bench errors:', list(e) or 'none'); sys.exit(bool(e))" "$out/device_bench.json" || bench=1
echo "tests exit $tests, bench exit $bench, $(( $(date +%s) - start )) s"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
