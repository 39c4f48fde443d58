#!/usr/bin/env bash
# Run the benchmark suite, the peak-memory script and the table; write everything to
# benchmarks/results/<device-name>/ (README.md with device, versions and commands).
#
#   benchmarks/run_all.sh                 # all parts: agg ops precompile-explain explain precompile-perf perf
#                                         #            precompile-hires hires memory table
#   benchmarks/run_all.sh agg             # one part (each is designed to fit in < 10 min on one H100)
#   benchmarks/run_all.sh precompile-perf perf   # a timed part after its precompile (same machine)
#
# Parts: agg (row + full-matrix aggregation), ops (head fusion, transform weights,
# legrad reduce), kernels (= agg ops), explain (whole explain vs forward+backward),
# perf (the performance protocol's sizes at 224/384 px: training step, literal, explain, peak memory),
# hires (the protocol's high-resolution sizes, N = 4097 / 9217 / 16385),
# precompile-explain / precompile-perf / precompile-hires (benchmarks/precompile.py: one untimed
# explain per size, method and attention path of that part, so that Triton's compile happens here and the
# timed part reads the kernels back from Triton's on-disk cache; writes precompile_<part>.json with each
# cold first call's seconds; precompile = all three, which may exceed 10 minutes cold),
# memory (peak memory per backend, fresh processes), table (table.md + README.md
# from the folder's files only: bench_*.json, peak_memory.md, commands_*.txt; so the
# parts may run on a remote GPU machine and `table` here after copying the files back).
#
# Environment:
#   BENCH_DEVICE  cpu | cuda            (default: cuda when available)
#   BENCH_SCALE   tiny | small | full   (default: full on cuda, small on cpu)
#   BENCH_OUT     output folder         (default: benchmarks/results/<device-slug>)
#   BENCH_ARGS    extra pytest arguments (e.g. "--bench-tf32" or "-k vit_b16")
#   BENCH_TAG     suffix of the JSON/log names (to split a part: BENCH_TAG=large BENCH_ARGS="-k large")
#   BENCH_METHODS explanation methods of explain/perf/hires (e.g. tokentm,gae,rollout,legrad)
#   BENCH_MEM_MODEL / BENCH_MEM_BATCH   peak-memory case (default vit_base_patch16_224,
#                                        batch 8 on cpu, 64 on cuda; vit_tiny_patch16_224 batch 2 at tiny)
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
DEV=${BENCH_DEVICE:-$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}
if [ "$DEV" = cuda ]; then SCALE=${BENCH_SCALE:-full}; MEM_BATCH=${BENCH_MEM_BATCH:-64}
else SCALE=${BENCH_SCALE:-small}; MEM_BATCH=${BENCH_MEM_BATCH:-8}; fi
MEM_MODEL=${BENCH_MEM_MODEL:-vit_base_patch16_224}
if [ "$SCALE" = tiny ]; then MEM_MODEL=${BENCH_MEM_MODEL:-vit_tiny_patch16_224}; MEM_BATCH=${BENCH_MEM_BATCH:-2}; fi
# Triton keeps compiled kernels on disk (TRITON_CACHE_DIR, default ~/.triton/cache); with this, the autotuner's
# choices too: a precompile-<part> run leaves the timed part in a later process nothing to compile or tune.
[ "$DEV" = cuda ] && export TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1}
SLUG=$($PY benchmarks/benchtable.py --slug "$DEV")
OUT=${BENCH_OUT:-benchmarks/results/$SLUG}
mkdir -p "$OUT"
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(agg ops precompile-explain explain precompile-perf perf precompile-hires hires memory table)
EXPANDED=()
for part in "${PARTS[@]}"; do
  case "$part" in
    kernels) EXPANDED+=(agg ops) ;;
    precompile) EXPANDED+=(precompile-explain precompile-perf precompile-hires) ;;
    *) EXPANDED+=("$part") ;;
  esac
done
PARTS=("${EXPANDED[@]}")
AGG=benchmarks/test_bench_aggregation.py
STATUS=0
log_cmd() { local part=$1; shift; echo "$*" > "$OUT/commands_$part.txt"; echo "+ $*"; }

run_pytest() {  # $1 = part name, then the test files / node ids
  local name="$1${BENCH_TAG:+_$BENCH_TAG}"
  shift
  local cmd=("$PY" -m pytest "$@" --benchmark-only -q -p no:cacheprovider
             --bench-device "$DEV" --bench-scale "$SCALE" --benchmark-json "$OUT/bench_$name.json"
             --benchmark-columns=min,mean,median,stddev,rounds,iterations)
  [ -n "${BENCH_METHODS:-}" ] && cmd+=(--bench-methods "$BENCH_METHODS")
  # shellcheck disable=SC2206
  [ -n "${BENCH_ARGS:-}" ] && cmd+=(${BENCH_ARGS})
  log_cmd "$name" "${cmd[*]}"
  "${cmd[@]}" 2>&1 | tee "$OUT/pytest_$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && { echo "pytest $name exited with $rc (see $OUT/pytest_$name.log)"; STATUS=$rc; }
}

for part in "${PARTS[@]}"; do
  t0=$SECONDS
  case "$part" in
    agg) run_pytest agg "$AGG::test_aggregation" "$AGG::test_aggregation_full" ;;
    ops) run_pytest ops "$AGG::test_head_fusion" "$AGG::test_transform_weights" "$AGG::test_legrad_reduce" \
           benchmarks/test_bench_transform_weights.py ;;
    explain) run_pytest explain benchmarks/test_bench_explain.py ;;
    perf) run_pytest perf benchmarks/test_bench_perf.py -k "not hires" ;;
    hires) run_pytest hires benchmarks/test_bench_perf.py -k hires ;;
    precompile-explain|precompile-perf|precompile-hires)
      which=${part#precompile-}
      cmd=("$PY" benchmarks/precompile.py --device "$DEV" --scale "$SCALE" --parts "$which"
           --json "$OUT/precompile_$which.json")
      [ -n "${BENCH_METHODS:-}" ] && cmd+=(--methods "$BENCH_METHODS")
      case " ${BENCH_ARGS:-} " in *" --bench-tf32 "*) cmd+=(--tf32) ;; esac
      log_cmd "$part" "${cmd[*]}"
      "${cmd[@]}" 2>&1 | tee "$OUT/precompile_$which.log"
      [ "${PIPESTATUS[0]}" -ne 0 ] && { echo "precompile $which failed"; STATUS=1; } ;;
    memory)
      cmd=("$PY" benchmarks/peak_memory.py --model "$MEM_MODEL" --batch "$MEM_BATCH" --device "$DEV"
           --methods tokentm gae rollout raw_attention attn_gradcam legrad --json "$OUT/peak_memory.json")
      log_cmd memory "${cmd[*]} > $OUT/peak_memory.md"
      "${cmd[@]}" > "$OUT/peak_memory.md" || { echo "peak_memory failed"; STATUS=1; }
      cat "$OUT/peak_memory.md" ;;
    table)
      shopt -s nullglob
      jsons=("$OUT"/bench_*.json)
      if [ ${#jsons[@]} -gt 0 ]; then
        log_cmd table "$PY benchmarks/benchtable.py ${jsons[*]} > $OUT/table.md"
        $PY benchmarks/benchtable.py "${jsons[@]}" > "$OUT/table.md" || STATUS=1
      fi
      $PY benchmarks/benchtable.py --readme "$OUT" > "$OUT/README.md" || STATUS=1
      echo "wrote $OUT/README.md" ;;
    *) echo "unknown part '$part' (agg | ops | kernels | precompile[-explain|-perf|-hires] | explain | perf | hires | memory | table)"; exit 2 ;;
  esac
  # wall time of each part (benchtable.py --readme lists them)
  [ "$part" != table ] && echo "$part${BENCH_TAG:+_$BENCH_TAG} $((SECONDS - t0)) s (scale $SCALE)" | tee -a "$OUT/part_times.txt"
done
exit $STATUS
