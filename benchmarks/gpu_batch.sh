#!/usr/bin/env bash
# Runs the GPU benchmarks of the built components in one go on a CUDA machine (from a checkout,
# without installing): results go to $HF_EXT_RESULTS_DIR (default benchmarks/results), logs beside them.
# Usage: bash benchmarks/gpu_batch.sh [part ...]   parts: doctor simulate sale latent_omni autoparallel fsep dataflex
#   (default: those, one GPU) and, on a 2-GPU machine: fsep2 autoparallel2 (torchrun, NCCL); on a 4-GPU machine:
#   fsep4 (Mixtral experts, with and without an attention block per layer, the eager schedule as a baseline);
#   tie_static, tie_cb, tie_plan, tie_plan_rounds, tie_sdpa: the TIE real-engine jobs (benchmarks/tie_real_cb.py,
#   benchmarks/tie_generate_sdpa.py) on one GPU (tie_plan: TIE's planned offline batches against every baseline plan,
#   about 20 minutes on an H100; tie_plan_rounds: TIE's plan and FCFS sorted by prompt length, two rounds in
#   alternating order, about 8 minutes; tie_sdpa: padded generate with and without cuDNN SDPA, about 3 minutes).
#   The static jobs need transformers >= 5.24: older versions repeat the KV heads in every padded GQA decode step.
set -u
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
RES=${HF_EXT_RESULTS_DIR:-benchmarks/results}
mkdir -p "$RES/logs"
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(doctor simulate sale latent_omni autoparallel fsep dataflex)
run() {  # name, limit in seconds, command...
  local name=$1 limit=$2; shift 2
  echo "=== $name: $* (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$RES/logs/$name.log" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0))s"
  tail -n 25 "$RES/logs/$name.log"
}
for p in "${parts[@]}"; do
  case $p in
    doctor) run doctor 120 $PY -m hf_ext doctor ;;
    simulate) run simulate 240 $PY -m hf_ext.simulate.calibrate --device cuda --shape llama3.1-8b --out "$RES/" ;;
    sale) run sale_e2e 300 $PY -m hf_ext bench sale --e2e --lengths 32768 65536 ;;
    latent_omni) run latent_omni 240 $PY -m hf_ext bench latent_omni --mode gpu ;;
    autoparallel) run autoparallel 300 $PY -m hf_ext bench autoparallel ;;
    fsep) run fsep 240 $PY -m hf_ext bench fsep --calibrate --skip-gloo --no-plot ;;
    dataflex) run dataflex 300 $PY -m hf_ext bench dataflex -- --device cuda --preset small ;;
    fsep2) run fsep2 200 $PY -m torch.distributed.run --standalone --nproc-per-node 2 \
      -m hf_ext.accelerate.fsep.bench --torchrun --no-plot ;;
    fsep4) run fsep4 240 $PY -m torch.distributed.run --standalone --nproc-per-node 4 \
      -m hf_ext.accelerate.fsep.bench --torchrun --no-plot --models mixtral8x7b --eager
      run fsep4_attn 240 $PY -m torch.distributed.run --standalone --nproc-per-node 4 \
      -m hf_ext.accelerate.fsep.bench --torchrun --no-plot --models mixtral8x7b --eager --attention ;;
    autoparallel2) run autoparallel2 380 $PY -m torch.distributed.run --standalone --nproc-per-node 2 \
      -m hf_ext.accelerate.autoparallel.bench ;;
    tie_static) run tie_static 320 $PY benchmarks/tie_real_cb.py --shape llama3.1-8b --n 96 --static-batch 32 \
      --max-new-tokens 600 --policies tie,fcfs,ssjf,ltr --budget-s 220 ;;
    tie_plan) run tie_plan 2400 $PY benchmarks/tie_real_cb.py --workload benchmarks/data/tie_azure_replay_n40k.json \
      --shape llama3.1-8b --n 400 --max-prompt 2048 --static-kv-tokens 120000 --static-plan expected \
      --policies tie,fcfs,ssjf,ltr,sjf_oracle --budget-s 1100 ;;
    tie_plan_rounds) run tie_plan_rounds 900 $PY benchmarks/tie_real_cb.py \
      --workload benchmarks/data/tie_azure_replay_n40k.json --shape llama3.1-8b --n 400 --max-prompt 2048 \
      --static-kv-tokens 120000 --static-plan expected --policies tie,fcfs \
      --static-only tie_planned,fcfs_prompt_sorted --static-rounds 2 --budget-s 900 ;;
    tie_sdpa) run tie_sdpa 300 $PY benchmarks/tie_generate_sdpa.py ;;
    tie_cb) run tie_cb 540 $PY benchmarks/tie_real_cb.py --shape llama3.1-8b --n 150 --speeds 4 \
      --max-requests-per-batch 32 --cuda-graph --record-steps --budget-s 420 ;;
    *) echo "unknown part $p" ;;
  esac
done
