#!/usr/bin/env bash
# The accelerator check of issue 16: one command on a GPU box, stages in priority order under one
# time budget (a stage that would not fit in what is left is skipped and says so):
#
#   bash benchmarks/accelerator.sh                    # results in benchmarks/results/
#   PY=python3 RESULTS=$OUT/results BUDGET_S=420 bash benchmarks/accelerator.sh
#
# 1. step bench, bf16, ViT-B/16, 224 px, batch 64: full / LoRA / BitFit / GUFT sparse (the SDDMM
#    guft_jax.kernels.SDDMM_DEFAULTS picks on GPU) / GUFT sparse with the Pallas (Triton) SDDMM,
#    and the PyTorch peer (timm + peft: full eager, full + torch.compile, LoRA, BitFit; bf16
#    autocast) in the same round-robin -> step_bench_accelerator.json
# 2. end to end: train.fit's steady-state images/s vs the bare step (LoRA, device vs host input,
#    224 then 112 px) -> fit_bench_accelerator_{224,112}.json
# 3. ops bench (bf16, ViT-B/16 layer shapes, batch 64): the sparse-delta matmul per SDDMM impl vs
#    the dense matmul, fused attention vs einsum -> ops_bench_accelerator.json
# 4. remat: ViT-B/16 batch 256 and ViT-L/16 batch 64 with jax.checkpoint per block, full
#    fine-tuning and LoRA: XLA's peak estimate and the step -> step_bench_remat.json
# 5. (stage "guft", second; step_bench --group guft_real) GUFT's step at a real selection:
#    DINOv2-S/14 (GUFT_JAX_CACHE) trained 3 epochs on Animal-MNIST, then timed with and without
#    its row x column blocks beside full, LoRA and BitFit -> guft_step_bench_accelerator.json
# STAGES="guft fit remat" (say) runs a subset, in the order above.
# The tables (not in the default STAGES; resumable: a second call goes on where one stopped):
#   STAGES="probe56 sizes gpu" BUDGET_S=540 bash benchmarks/accelerator.sh
# 6. probe56 (issue 30): FourierFT, diff pruning, AdaLoRA, prefix beside the linear probe at 56 px,
#    val200 lr, 3 seeds, Animal-MNIST and digits (offline_benchmark --preset full, those rows)
# 7. sizes (issue 31): the sizes preset at 56 px, one process per dataset -> $RESULTS/sizes
# 8. gpu (issue 28): the gpu preset's table (3 tasks, 3 seeds, 112 px, 20 epochs)
# DRY=1: every stage on CPU at tiny sizes (ViT-tiny/4, 32 and 16 px, batch 8, 2 reps; GUFT's real
# selection on DINOv2-S/14 at 28 px, batch 50, rows full, lora and guft, up to 420 s; no Pallas in
# the ops bench), results in /tmp/accelerator_dry (on 2 busy CPU cores the GUFT stage may need its
# own run: DRY=1 STAGES=guft):
#
#   DRY=1 timeout 600 bash benchmarks/accelerator.sh
# JAX and torch share the GPU in (1): JAX is held to XLA_PYTHON_CLIENT_MEM_FRACTION of it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [[ "${DRY:-0}" == 1 ]]; then  # the CPU dry run's sizes (each still settable)
  export ALLOW_CPU=1
  RESULTS=${RESULTS:-/tmp/accelerator_dry} BUDGET_S=${BUDGET_S:-580} MODEL=${MODEL:-ViT-tiny/4}
  SIZES=${SIZES:-32 16} BATCH=${BATCH:-8} REPS=${REPS:-2} OPS_IMPLS=${OPS_IMPLS:-gather,dense}
  REMAT_MODELS=${REMAT_MODELS:-ViT-tiny/4} REMAT_BATCHES=${REMAT_BATCHES:-8}
  GUFT_SIZE=${GUFT_SIZE:-28} GUFT_BATCH=${GUFT_BATCH:-50} GUFT_MAX_S=${GUFT_MAX_S:-420}
  GUFT_ROWS=${GUFT_ROWS:-full,lora,guft}
  # the tables at tiny sizes: two rows on digits at 28 px, one epoch; the sizes pipeline's dry
  # preset; the gpu preset is skipped
  PROBE_ARGS=${PROBE_ARGS:---tasks digits --methods linear,prefix --epochs 1 --image_size 28 --seeds 0}
  SIZES_PRESET=${SIZES_PRESET:-sizes_dry} SIZES_DATASETS=${SIZES_DATASETS:-animal_mnist}
  GPU_PRESET=${GPU_PRESET:-}
fi
RESULTS=${RESULTS:-benchmarks/results}
BUDGET_S=${BUDGET_S:-420}
# Sizes (the issue's; smaller ones only for a dry run of this script on CPU with ALLOW_CPU=1)
MODEL=${MODEL:-ViT-B/16} SIZES=${SIZES:-224 112} BATCH=${BATCH:-64} REPS=${REPS:-10}
METHODS=${METHODS:-full,lora,bitfit,guft,guft_pallas}
STAGES=${STAGES:-step guft fit ops remat}  # which stages, in this order
FIT_INPUTS=${FIT_INPUTS:-device,host}
mkdir -p "$RESULTS"
unset JAX_PLATFORMS  # the Makefile exports cpu; this script is for the accelerator
export PYTHONUNBUFFERED=1
T0=$(date +%s)

# stage NAME MIN_S MAX_S CMD...: runs CMD under timeout min(MAX_S, time left) if MIN_S is left
stage() {
  local name=$1 min=$2 max=$3
  shift 3
  local left=$((BUDGET_S - ($(date +%s) - T0)))
  if ((left < min)); then
    echo "== $name: SKIPPED (${left}s left of ${BUDGET_S}s, needs ${min}s)"
    return 0
  fi
  local lim=$((left < max ? left : max))
  echo "== $name (limit ${lim}s, t=$(($(date +%s) - T0))s)"
  timeout "$lim" "$@" || echo "== $name: FAILED or timed out (rc $?)"
}

ALLOW_CPU=${ALLOW_CPU:-0} "$PY" - <<'EOF' || exit 1
import os
import jax, flax, optax
print("devices:", jax.devices(), "jax", jax.__version__, "flax", flax.__version__,
      "optax", optax.__version__)
if os.environ["ALLOW_CPU"] != "1":
    assert jax.default_backend() == "gpu", f"no GPU visible to JAX: {jax.devices()}"
EOF
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
    > "$RESULTS/accelerator_env.csv" || true
fi

on() { [[ " $STAGES " == *" $1 "* ]]; }

if on step; then
  PEER=()
  if "$PY" -c "import torch, timm, peft" 2>/dev/null; then
    PEER=(--peer torch)
  fi
  XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45} \
    stage "step bench bf16 ${PEER[*]}" 60 270 "$PY" -m benchmarks.step_bench \
    --models "$MODEL" --image_size "${SIZES%% *}" --batch "$BATCH" --reps "$REPS" \
    --precision bf16 --saliency 0 --methods "$METHODS" "${PEER[@]}" \
    --out "$RESULTS/step_bench_accelerator.json"
fi

if on guft; then  # GUFT at a real selection (pretrained DINOv2-S/14, Animal-MNIST; its cache)
  stage "GUFT step at a real selection" 90 "${GUFT_MAX_S:-200}" \
    "$PY" -m benchmarks.step_bench --group guft_real \
    --image_size "${GUFT_SIZE:-${SIZES%% *}}" --batch "${GUFT_BATCH:-$BATCH}" --reps "$REPS" \
    --precision bf16 ${GUFT_ROWS:+--rows=$GUFT_ROWS} \
    --out "$RESULTS/guft_step_bench_accelerator.json"
fi

if on fit; then
  for SIZE in $SIZES; do
    stage "fit vs bare step, ${SIZE} px" 40 150 "$PY" -m benchmarks.fit_bench --model "$MODEL" \
      --image_size "$SIZE" --batch "$BATCH" --epochs 4 --reps 1 --bare_once 1 --methods lora \
      --inputs "$FIT_INPUTS" --precision auto --out "$RESULTS/fit_bench_accelerator_${SIZE}.json"
  done
fi

if on ops; then
  stage "ops bench" 40 90 "$PY" -m benchmarks.ops_bench --batches "$BATCH" --dtype bfloat16 \
    --impls "${OPS_IMPLS:-gather,dense,pallas}" --reps "$REPS" --attention_batch "$BATCH" \
    --out "$RESULTS/ops_bench_accelerator.json"
fi

if on remat; then  # jax.checkpoint per block: ViT-B/16 batch 256 and ViT-L/16 batch 64, bf16
  stage "remat: ${REMAT_MODELS:-ViT-B/16,ViT-L/16} b${REMAT_BATCHES:-256,64}" 60 150 \
    "$PY" -m benchmarks.step_bench --models "${REMAT_MODELS:-ViT-B/16,ViT-L/16}" \
    --batch "${REMAT_BATCHES:-256,64}" --image_size "${SIZES%% *}" --reps 3 --precision bf16 \
    --saliency 0 --remat 1 --methods full,lora --out "$RESULTS/step_bench_remat.json"
fi

if on probe56; then  # issue 30's acceptance table
  stage "probe56" 60 "$BUDGET_S" "$PY" -m experiments.offline_benchmark --preset full \
    ${PROBE_ARGS:---tasks animal_mnist,digits --methods linear,fourierft,diff_pruning,adalora,prefix} \
    --workers "${WORKERS:-4}" --out "$RESULTS/offline_probe56"
fi

if on sizes; then  # issue 31's table: one process per dataset on one OUT
  sizes_all() {  # run by timeout in its own bash: a TERM stops the dataset processes too
    trap 'kill $(jobs -p) 2>/dev/null; exit 124' TERM
    local pids=()
    for d in ${SIZES_DATASETS:-animal_mnist fashion_mnist}; do
      "$PY" -m experiments.rows --preset "${SIZES_PRESET:-sizes}" --datasets "$d" \
        --out "$RESULTS/sizes" > "$RESULTS/sizes_$d.log" 2>&1 &
      pids+=($!)
    done
    wait "${pids[@]}"
    "$PY" -m experiments.rows --preset "${SIZES_PRESET:-sizes}" --out "$RESULTS/sizes" | tail -4
  }
  export PY RESULTS SIZES_PRESET SIZES_DATASETS
  export -f sizes_all
  stage "sizes" 60 "$BUDGET_S" bash -c sizes_all
fi

if on gpu; then  # issue 28's gpu preset table
  if [[ -n "${GPU_PRESET-gpu}" ]]; then
    stage "gpu preset" 60 "$BUDGET_S" "$PY" -m experiments.offline_benchmark \
      --preset "${GPU_PRESET-gpu}" --workers "${WORKERS:-4}" --out "$RESULTS/offline_gpu"
  else
    echo "== gpu preset: SKIPPED (dry run)"
  fi
fi

echo "== done in $(($(date +%s) - T0))s; results in $RESULTS:"
ls -la "$RESULTS"
