#!/usr/bin/env bash
# The accelerator check of issue 16, one command on a GPU box (about 6 minutes on one H100/H200):
#
#   bash benchmarks/accelerator.sh            # PY=/path/to/python to use another interpreter
#
# 1. ops bench (bf16, ViT-B/16 layer shapes, batch 64): sparse-delta matmul fwd+bwd per SDDMM impl
#    (gather, dense, the compiled Pallas/Triton kernel, checked against the dense gradient) vs the
#    dense matmul, and fused attention vs einsum -> benchmarks/results/ops_bench_accelerator.json
# 2. step bench (ViT-B/16, 224 px, batch 64): full / LoRA / GUFT sparse / GUFT dense, with the
#    SDDMM that ops.AUTO_IMPL picks on GPU -> benchmarks/results/step_bench_accelerator.json
# 3. the GUFT sparse step again with the Pallas SDDMM (AUTO_IMPL["gpu"] overridden for this
#    process only) -> benchmarks/results/step_bench_accelerator_pallas.json
# 4. end to end: train.fit's steady-state images/s vs the bare step (ViT-B/16, batch 64, LoRA and
#    full, host vs device input, 112 and 224 px) -> benchmarks/results/fit_bench_accelerator_*.json
# step_bench's --precision is passed (bf16) when that step bench has it.
# If the Pallas kernel wins in (1) and (3), set ops.AUTO_IMPL["gpu"] = "pallas".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/results
mkdir -p "$OUT"
unset JAX_PLATFORMS  # the Makefile exports cpu; this script is for the accelerator

"$PY" - <<'EOF'
import jax
assert jax.default_backend() == "gpu", f"no GPU visible to JAX: {jax.devices()}"
print("devices:", jax.devices())
EOF
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/accelerator_env.csv" || true

echo "== ops bench"
timeout 150 "$PY" -m benchmarks.ops_bench --batches 64 --dtype bfloat16 \
  --impls gather,dense,pallas --reps 20 --attention_batch 64 \
  --out "$OUT/ops_bench_accelerator.json"

PRECISION=()
if "$PY" -m benchmarks.step_bench --help 2>/dev/null | grep -q -- "--precision"; then
  PRECISION=(--precision bf16)
fi

PEER=()
if "$PY" -c "import torch, timm, peft" 2>/dev/null; then
  PEER=(--peer torch)  # timm + peft timed in the same round-robin as ours
fi

echo "== step bench ${PRECISION[*]} ${PEER[*]}"
timeout 300 "$PY" -m benchmarks.step_bench --models ViT-B/16 --image_size 224 --batch 64 \
  --reps 10 --methods full,lora,guft,guft_dense,bitfit "${PRECISION[@]}" "${PEER[@]}" \
  --out "$OUT/step_bench_accelerator.json"

echo "== step bench, GUFT with the Pallas SDDMM"
timeout 150 "$PY" - "${PRECISION[@]}" <<'EOF'
import sys

from guft_jax import ops

ops.AUTO_IMPL["gpu"] = "pallas"  # this process only: the step engine calls impl="auto"
from benchmarks import step_bench

step_bench.main(
    ["--models", "ViT-B/16", "--image_size", "224", "--batch", "64", "--reps", "10",
     "--methods", "full,guft", "--out", "benchmarks/results/step_bench_accelerator_pallas.json"]
    + sys.argv[1:]
)
EOF
echo "== fit vs bare step (end to end)"
for SIZE in 112 224; do
  timeout 150 "$PY" -m benchmarks.fit_bench --model ViT-B/16 --image_size "$SIZE" --batch 64 \
    --epochs 3 --reps 1 --methods lora,full --inputs host,device --precision auto \
    --out "$OUT/fit_bench_accelerator_${SIZE}.json" || echo "fit bench at $SIZE px: failed/timed out"
done
echo "wrote $OUT/ops_bench_accelerator.json $OUT/step_bench_accelerator.json" \
  "$OUT/step_bench_accelerator_pallas.json $OUT/fit_bench_accelerator_{112,224}.json"
