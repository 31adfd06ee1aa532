#!/usr/bin/env bash
# One call on a CUDA machine: the CUDA tests (fused FlexAttention path = skew path, forward and
# backward, fp32 and bf16; the CUDA-graph sampling step = the plain path), then the benchmarks
# in bf16 (the memory one: peaks of real steps).
#   bash scripts/gpu_check.sh                    # everything (about 20 min on an H100)
#   bash scripts/gpu_check.sh tests sampling     # only these sections, in this order
# Sections: tests production adapters perceiver moonbeam scg memory style_judge sampling.
# Figures go to stdout and, when $OUT is set (the device tool), to $OUT/gpu_check.log.
# The GPU machine lacks some of our dependencies: build the project's non-torch dependencies
# as wheels beforehand on a networked machine (e.g. `pip wheel ... -w .whl/`), carry .whl/ over,
# and this script installs them into /tmp/site. wandb is not needed: nothing here logs.
set -uo pipefail
cd "$(dirname "$0")/.."
log=${OUT:-/tmp}/gpu_check.log
export PYTHONUNBUFFERED=1
sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(tests production adapters perceiver moonbeam scg memory
                                         style_judge sampling)
run_section() {
  case $1 in
    tests)  # the files that hold CUDA tests: collecting the rest needs every dependency
      echo "== CUDA tests"
      python3 -m pytest -q -p no:cacheprovider -m cuda -rs $(grep -rl "mark.cuda" tests/) \
        2>&1 | tail -15 ;;
    production)
      echo "== benchmark (bf16)"
      python3 benchmarks/production.py --device cuda --dtype bf16 ;;
    adapters)
      echo "== adapters benchmark (bf16)"
      python3 benchmarks/adapters.py --device cuda --dtype bf16 ;;
    perceiver)
      echo "== perceiver benchmark (bf16)"
      python3 benchmarks/perceiver.py --device cuda --dtype bf16 --d-model 512 --layers 8 \
        --batch 4 --steps 5 --plain-max 8192 ;;
    moonbeam)
      echo "== moonbeam benchmark (bf16; 309M LoRA step at context 1024, 100 sampled events)"
      python3 benchmarks/moonbeam.py --device cuda --dtype bf16 --lora-config 309M ;;
    scg)
      echo "== SCG benchmark (bf16, scg_base)"
      python3 benchmarks/scg.py --device cuda --dtype bf16 --preset scg_base ;;
    memory)
      echo "== memory: 309M LoRA steps at 8 x 2048 (plain, checkpointed, QLoRA + checkpointed; bf16)"
      python3 benchmarks/memory.py --device cuda --size 309M --step
      echo "== memory: every branch's plan against max_memory_allocated of two real steps (tiny, large)"
      python3 benchmarks/memory.py --device cuda --branches
      echo "== memory: does the 839M QLoRA step fit 24 GiB? (3 rows a forward, as auto picks)"
      python3 benchmarks/memory.py --device cuda --size 839M --batch 3 --variants qlora_ckpt --step ;;
    style_judge)
      echo "== style judge: ResNet-18 step on 32 clips of 30 s (bf16), plan vs peak, PiJAMA estimate"
      python3 benchmarks/style_judge.py --device cuda --dtype bf16 --batch 32 --steps 10 ;;
    sampling)
      echo "== sampling: production and perceiver_mt (step as a CUDA graph, and kernel by kernel)"
      echo "   vs HF GPT-2 generate at the same size, batch 1 and 8 (bf16)"
      python3 benchmarks/sampling.py --device cuda --dtype bf16 --tokens 1024 --batch 8 \
        --repeats 2 --only production --only perceiver_mt
      echo "== sampling: moonbeam_lora and scg_diffusion (bf16)"
      python3 benchmarks/sampling.py --device cuda --dtype bf16 --only moonbeam --only scg ;;
    *) echo "unknown section $1; use: tests production adapters perceiver moonbeam scg memory" \
         "style_judge sampling"; return 2 ;;
  esac
}
{
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
      .whl/*.whl
    # the package as installed, without installing it: src/mehldau with branches/ and
    # configs/ inside (pyproject's package-dir), linked, not copied
    rm -rf /tmp/pkg && mkdir -p /tmp/pkg/mehldau
    ln -s "$PWD"/src/mehldau/* /tmp/pkg/mehldau/
    ln -s "$PWD"/branches /tmp/pkg/mehldau/branches
    ln -s "$PWD"/configs /tmp/pkg/mehldau/configs
    export PYTHONPATH=/tmp/site:/tmp/pkg:$PWD
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  for s in "${sections[@]}"; do
    start=$SECONDS
    run_section "$s"
    echo "-- $s: $((SECONDS - start)) s"
  done
} 2>&1 | tee "$log"
