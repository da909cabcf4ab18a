#!/bin/bash
# The GRPO sweep behind the embedded checkpoint (checkpoints/hf-deepseek-r1-tiny/README.md, "How GRPO got
# above the SFT ancestor"): several GRPO configurations from the SFT-only ancestor checkpoints/hf-deepseek-r1-tiny-sft,
# many completions per step, all running CONCURRENTLY on one GPU (or the CPU: the device is cuda whenever torch sees
# one), each stopped by the same wall clock (benchmarks/grpo_wall.py); then validation greedy pass@1 (500 sums from
# the training side of the split, benchmarks/greedy_pass_at_1.py) of each run's final model and intermediate
# checkpoints, and a summary with the winner (benchmarks/grpo_sweep_summary.py).
#
# On the GPU machine, from the repo root, with $OUT set (the device runner's output folder) and .whl carried (the
# GPU image lacks trl and datasets: when `import trl, datasets` fails, the wheels .whl/*.whl are installed into
# /tmp/site and put on PYTHONPATH):
#   bash benchmarks/grpo_sweep.sh
# The first round of the model card was the default six configs; the second round (continuations of the best point,
# k1-k3) used EXTRA_CONFIGS_FILE and EVAL_TEST=1.
# Env knobs:
#   OUT (required)   where the summary, logs and tarballs go
#   WALL             seconds per run, startup and compile included (default 330)
#   BATCH            completions per optimizer step (2048)
#   NGEN             completions per prompt (16)
#   CONFIGS          names from the table below, space-separated (default the first six, c1-c6)
#   EXTRA_CONFIGS_FILE  a file of lines "name<TAB>overrides" that replace the default selection (e.g.
#                    "k2\tgrpo.init=outputs/grpo_sweep_.../c6.../checkpoint-75 learning_rate=1.5e-5 ...")
#   EVAL_TEST        1: after the sweep, test-split greedy pass@1 of the ancestor and the winner
#                    ($OUT/test_pass_at_1.txt), and the winner tarred into $OUT/winner.tgz (default 0)
#   PROMPTS          GRPO prompts in the dataset (40000)
#   TOTAL            seconds budget of the whole script; intermediate checkpoints are evaluated only while it allows (560)
#   PY               the python (python3)
#   THREADS          torch threads per training process (2)
#   FAST             1: CUDA rollouts through the fast decode path (static latent cache + CUDA graphs); 0: TRL's (1)
# Writes $OUT/grpo_sweep.md, $OUT/grpo_sweep.json, $OUT/grpo_logs.txt, $OUT/grpo_metrics.tgz; the runs stay under
# outputs/grpo_sweep_<time>/ (the best evaluated directory: .../best and .../WINNER).
# CPU smoke test (minutes): PY=.venv/bin/python OUT=/tmp/gs WALL=30 BATCH=16 NGEN=8 THREADS=1 TOTAL=120 \
#   CONFIGS="c1_lr3e-5_T0.7 c6_lr3e-5_eps1e-5_T0.7_posadv" bash benchmarks/grpo_sweep.sh
START=$(date +%s)
el() { echo $(( $(date +%s) - START )); }
say() { echo "[$(el)s] $*"; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-2}
PY=${PY:-python3}
WALL=${WALL:-330}; BATCH=${BATCH:-2048}; NGEN=${NGEN:-16}; PROMPTS=${PROMPTS:-40000}; TOTAL=${TOTAL:-560}
THREADS=${THREADS:-2}
OUT=${OUT:?set OUT}
mkdir -p "$OUT"
if ! $PY -c "import trl, datasets" 2>/dev/null; then  # the GPU image has neither: the carried wheels
  ls .whl/*.whl >/dev/null 2>&1 || { echo "trl/datasets missing and no .whl/*.whl (carry .whl)"; exit 1; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
say "python $($PY -c 'import torch, transformers, trl; print(torch.__version__, transformers.__version__, trl.__version__, "cuda" if torch.cuda.is_available() else "cpu")' 2>/dev/null)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader

ANCESTOR=checkpoints/hf-deepseek-r1-tiny-sft
# shared by every config: the ancestor, BATCH completions per optimizer step (one generation batch = one step:
# steps_per_generation 1, num_iterations 1), fp32 (no bf16 autocast), no MTP loss on the samples and no router-bias
# drift (both are non-reward changes to the policy), constant lr after 10 warm-up steps (Adam's first steps are
# sign-like), log every step; the wall clock (not max_steps) ends each run; intermediate checkpoints at 40% and 70% of
# WALL. FAST=0 turns the CUDA rollout fast path (static latent cache + compiled CUDA-graph decode) off for all runs.
# The recipe's grpo defaults have since become the winner's (r1_tiny.yaml: learning rate 3e-5, Adam epsilon 1e-5,
# temperature 0.7, positive advantages only); the second and third lines pin the values the sweep ran on top of (the
# recipe's grpo stage before that: lr 2e-5, epsilon 1e-8 (the default), temperature 0.8, both signs of the
# advantages, beta 0, seed 0, accuracy + format rewards 1.0/0.5), so that every config means what it meant then.
COMMON="grpo.init=$ANCESTOR per_device_train_batch_size=$BATCH num_generations=$NGEN grpo.data.tasks.addition=$PROMPTS
learning_rate=2e-5 adam_epsilon=1e-8 temperature=0.8 positive_advantages_only=false beta=0.0 seed=0
lr_scheduler_type=constant_with_warmup grpo.rewards=[accuracy,format] grpo.reward_weights=[1.0,0.5] grpo.data.seed=1
max_steps=100000 warmup_steps=10 bf16=false mtp_loss_weight=0 router_bias_update_speed=0 logging_steps=1
save_strategy=no save_total_limit=null max_completion_length=160 loss_type=grpo gradient_checkpointing=false"
[ "${FAST:-1}" = 0 ] && COMMON+=" fast_generation=false"
# name -> overrides on top of COMMON (learning rate, Adam epsilon, temperature, KL, rewards, and
# positive_advantages_only=true: zero the negative advantages, the trainer's DeepSeekGRPOConfig field)
declare -A CFG=(
  [c1_lr3e-5_T0.7]="learning_rate=3e-5 adam_epsilon=1e-8 temperature=0.7"
  [c2_lr3e-5_eps1e-5_T0.7]="learning_rate=3e-5 adam_epsilon=1e-5 temperature=0.7"
  [c3_lr1e-4_eps1e-4_T0.7]="learning_rate=1e-4 adam_epsilon=1e-4 temperature=0.7"
  [c4_lr3e-5_eps1e-5_T0.7_beta0.1]="learning_rate=3e-5 adam_epsilon=1e-5 temperature=0.7 beta=0.1"
  [c5_lr3e-5_eps1e-5_T0.7_column]="learning_rate=3e-5 adam_epsilon=1e-5 temperature=0.7 grpo.rewards=[accuracy,format,column] grpo.reward_weights=[1.0,0.5,0.5]"
  [c6_lr3e-5_eps1e-5_T0.7_posadv]="learning_rate=3e-5 adam_epsilon=1e-5 temperature=0.7 positive_advantages_only=true"
  # spares (CONFIGS="..." to swap them in)
  [s1_lr1e-4_eps1e-5_T0.7]="learning_rate=1e-4 adam_epsilon=1e-5 temperature=0.7"
  [s2_lr1e-5_T0.7]="learning_rate=1e-5 adam_epsilon=1e-8 temperature=0.7"
  [s3_lr3e-5_eps1e-5_T1.0]="learning_rate=3e-5 adam_epsilon=1e-5 temperature=1.0"
  [s4_lr3e-5_eps1e-5_T0.5]="learning_rate=3e-5 adam_epsilon=1e-5 temperature=0.5"
  [s5_lr3e-4_eps1e-4_T0.7]="learning_rate=3e-4 adam_epsilon=1e-4 temperature=0.7"
  [s6_lr3e-5_eps1e-5_T0.7_bf16_mtp_gamma]="learning_rate=3e-5 adam_epsilon=1e-5 temperature=0.7 bf16=true mtp_loss_weight=0.1 router_bias_update_speed=0.001"
  [s7_lr1e-4_eps1e-4_T0.7_posadv]="learning_rate=1e-4 adam_epsilon=1e-4 temperature=0.7 positive_advantages_only=true"
)
if [ -n "$EXTRA_CONFIGS_FILE" ]; then  # lines "name<TAB>overrides" replace the default selection
  CONFIGS=""
  while IFS=$'\t' read -r n o; do [ -n "$n" ] && CFG[$n]="$o" && CONFIGS+=" $n"; done < "$EXTRA_CONFIGS_FILE"
fi
CONFIGS=${CONFIGS:-"c1_lr3e-5_T0.7 c2_lr3e-5_eps1e-5_T0.7 c3_lr1e-4_eps1e-4_T0.7 c4_lr3e-5_eps1e-5_T0.7_beta0.1 c5_lr3e-5_eps1e-5_T0.7_column c6_lr3e-5_eps1e-5_T0.7_posadv"}
ROOT=outputs/grpo_sweep_$(date +%m%d-%H%M%S)
mkdir -p $ROOT
: > $ROOT/configs.tsv
for name in $CONFIGS; do
  [ -n "${CFG[$name]}" ] || { echo "unknown config $name; known: ${!CFG[*]}"; exit 1; }
  echo -e "$name\t${CFG[$name]}" >> $ROOT/configs.tsv
done
say "root $ROOT; WALL=$WALL BATCH=$BATCH NGEN=$NGEN; configs: $CONFIGS"

# the ancestor's validation pass@1, on the CPU while the runs train (greedy_pass_at_1.py has no device option)
OMP_NUM_THREADS=1 $PY benchmarks/greedy_pass_at_1.py --split validation $ANCESTOR > $ROOT/ancestor_eval.txt 2>$ROOT/ancestor_eval.err &
EVAL_ANCESTOR=$!

# the runs, one process each, all at once
NAMES=($CONFIGS); PIDS=()
set -f  # the overrides hold [ ] (YAML lists): no globbing
for name in "${NAMES[@]}"; do
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=$THREADS WALL=$WALL timeout -k 10 $((WALL + 45)) $PY benchmarks/grpo_wall.py $COMMON ${CFG[$name]} \
    output_dir=$ROOT/$name > $ROOT/$name.log 2>&1 &
  PIDS+=($!)
  say "started $name (pid $!)"
done
set +f
# progress every 30 s: each run's latest step, and the GPU's use
TICK=0
while true; do
  sleep 5; TICK=$((TICK + 5))
  alive=0; for p in "${PIDS[@]}"; do kill -0 $p 2>/dev/null && alive=$((alive + 1)); done
  [ $alive -eq 0 ] && break
  [ $((TICK % 30)) -eq 0 ] || continue
  line="[$(el)s] $alive running, steps:"
  for name in "${NAMES[@]}"; do
    line+=" ${name%%_*}=$(grep -o 'step [0-9]* ([0-9.]* s)' $ROOT/$name.log | tail -1 | sed 's/step //')"
  done
  command -v nvidia-smi >/dev/null && line+=" | gpu util,mem: $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader | head -1)"
  echo "$line"
done
for i in "${!PIDS[@]}"; do
  wait ${PIDS[$i]}; rc=$?
  name=${NAMES[$i]}
  say "$name rc=$rc: $(tr '\r' '\n' < $ROOT/$name.log | grep -E '^\[ *[0-9.]+s\]|Error' | tail -2 | tr '\n' ' ')"
done
wait $EVAL_ANCESTOR
say "ancestor: $(cat $ROOT/ancestor_eval.txt)"

# validation greedy pass@1 of each run: its final model (if saved) and its intermediate checkpoints, one CPU process
# per run (~10 s per directory); intermediates only while the budget allows
LEFT=$((TOTAL - $(el) - 25))
EPIDS=()
for name in "${NAMES[@]}"; do
  dirs=()
  [ -f $ROOT/$name/model.safetensors ] && dirs+=($ROOT/$name)
  ckpts=($(ls -d $ROOT/$name/checkpoint-* 2>/dev/null | sort -V))
  if [ ${#dirs[@]} -eq 0 ] && [ ${#ckpts[@]} -gt 0 ]; then dirs+=(${ckpts[-1]}); unset 'ckpts[-1]'; fi  # killed run
  [ $LEFT -gt 60 ] && dirs+=(${ckpts[@]})
  [ ${#dirs[@]} -gt 0 ] || continue
  OMP_NUM_THREADS=1 timeout $((LEFT > 30 ? LEFT : 30)) $PY benchmarks/greedy_pass_at_1.py --split validation "${dirs[@]}" \
    > $ROOT/$name.eval.txt 2>$ROOT/$name.eval.err &
  EPIDS+=($!)
done
say "evaluating (${#EPIDS[@]} processes, ${LEFT}s left)"
wait "${EPIDS[@]}"
say "evaluated"

$PY benchmarks/grpo_sweep_summary.py $ROOT "$OUT" 2>&1 | tail -40
{
  for name in "${NAMES[@]}"; do
    echo "=== $name: ${CFG[$name]}"
    tr '\r' '\n' < $ROOT/$name.log | grep -v -iE "warn|it/s\]|s/it\]|Writing model|Loading weights|kernels|\{'(loss|train_runtime)'|^\s*$" | tail -25
    cat $ROOT/$name.eval.txt 2>/dev/null; tail -3 $ROOT/$name.eval.err 2>/dev/null | grep -i error
  done
} > "$OUT/grpo_logs.txt"
tar czf "$OUT/grpo_metrics.tgz" $ROOT/configs.tsv $ROOT/*/metrics.jsonl $ROOT/*/steps.json $ROOT/*.eval.txt 2>/dev/null
say "done; winner: $(cat $ROOT/WINNER 2>/dev/null)"
if [ "${EVAL_TEST:-0}" = 1 ] && [ -f $ROOT/WINNER ]; then
  W=$(cat $ROOT/WINNER)
  say "test split: ancestor and winner $W"
  OMP_NUM_THREADS=4 $PY benchmarks/greedy_pass_at_1.py --split test $ANCESTOR "$W" 2>/dev/null | tee $OUT/test_pass_at_1.txt
  tar czf $OUT/winner.tgz -C "$(dirname $W)" "$(basename $W)" && say "winner tarred"
fi
