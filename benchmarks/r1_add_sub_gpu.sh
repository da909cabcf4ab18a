#!/bin/bash
# Trains and evaluates the candidate embedded default (recipe r1_add_sub: cold-start SFT, then GRPO, on 1- to 4-digit
# addition and subtraction) and runs R1-Zero in miniature (recipe r1_zero_tiny: a base pretrained on plain text, then
# GRPO with accuracy and format rewards only) on one GPU, each stage on a wall-clock budget (benchmarks/train_wall.py);
# then greedy pass@1 of the cold-start, ancestor and GRPO models on every add_sub bucket and on first vs second turns
# (benchmarks/add_sub_eval.py; then the embedded default's chat-app conversation and hardest-bucket tests on each,
# tests/test_checkpoint_add_sub.py, in NAME_app_tests.log), and of the R1-Zero base and GRPO models on held-out
# 4-digit sums (benchmarks/r1_zero_eval.py). On the GPU machine, from the repo root, with $OUT set:
#   bash benchmarks/r1_add_sub_gpu.sh                          # both recipes
#   SFT_WALL=0 GRPO_WALL=0 bash benchmarks/r1_add_sub_gpu.sh   # R1-Zero alone (attempt h of docs/r1_add_sub.md)
# Env: SFT_WALL (s, default 210), GRPO_WALL (150), ZPRE_WALL (300), ZGRPO_WALL (140); ZERO_ATTEMPTS, the R1-Zero
# attempts as NAME:TAGGED_SHARE[:KEY=VALUE,...] words, the optional third part that attempt's own pretraining overrides
# (default "zh_tagged035pct:0.0035", the recipe's own; empty for none); WHEELS, a folder of wheels to install when
# `import trl, datasets` fails (default .whl); SFT_ARGS, GRPO_ARGS, ZPRE_ARGS, ZGRPO_ARGS: more overrides; EVAL_ARGS
# more options of both evaluations, R1_EVAL_ARGS of add_sub_eval.py alone (`--large`: also the 2,000-problem add4_2k
# and sub4_2k sets). A stage is skipped with its WALL at 0: SFT_WALL=0 starts GRPO from the model at SFT_INIT (no
# SFT_INIT and GRPO_WALL=0: no R1 model at all), GRPO_WALL=0 stops after the cold start, ZGRPO_WALL=0 after the R1-Zero
# bases; ZPRE_INIT gives a pretrained R1-Zero base instead of pretraining one. ANCESTOR=0.88: the cold start saves
# checkpoints (SAVE_STEPS, default 30) and the one nearest 88% on sub4 becomes the ancestor `anc`
# (benchmarks/pick_ancestor.py, options in ANCESTOR_ARGS), evaluated and archived. GRPO_INITS, the models GRPO starts
# from, `anc` and/or `sft` (default `anc` with ANCESTOR, else `sft`): each a GRPO run of GRPO_WALL s into grpo_INIT,
# all at once (~49 GiB of GPU memory each on an H200; GRPO_SERIAL=1: one after the other), each evaluated.
# GPU memory: an R1 GRPO stage takes ~49 GiB and an R1-Zero GRPO stage ~44 GiB (H200, 1,024 completions a step), so
# one R1 GRPO and two R1-Zero GRPO stages do not fit in 140 GiB together (2026-12-04e): the R1-Zero GRPO stages start
# only once every R1 GRPO stage has finished; the R1-Zero pretraining and base evaluation run beside the cold start.
# A training stage that fails is named in one line (its log in outputs/logs) and its evaluation skipped.
# CPU smoke test (a few minutes; checks the script, not the recipes):
#   OUT=/tmp/smoke SMOKE=1 bash benchmarks/r1_add_sub_gpu.sh
# (SMOKE=1: tiny data, steps and batches, walls of seconds, `--limit 4` evaluations, CPU devices; the walls and args
# above still override it.)
# Writes $OUT/logs.tgz first (logs, metrics.csv, evaluation JSON), then one model an archive (each ~14 MB, under the
# device tool's 16 MiB a file; 64 MiB in all): $OUT/sft.tgz, $OUT/anc.tgz (with ANCESTOR), $OUT/grpo_INIT.tgz and
# $OUT/zero_NAME.tgz (an R1-Zero attempt's GRPO model; its base's evaluation and curves are in logs.tgz); ARCHIVES
# names the model archives to write (default "sft anc grpo zero"; `grpo` is every grpo_INIT, `grpo_anc` one of them;
# leave some out to stay under 64 MiB).
START=$(date +%s)
say() { echo "[$(( $(date +%s) - START ))s] $*"; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export TORCHINDUCTOR_COMPILE_THREADS=2 OMP_NUM_THREADS=2
OUT=${OUT:?set OUT}
PY=${PY:-python3}
if [ "${SMOKE:-0}" = 1 ]; then  # the script's own check on a CPU: every stage for seconds, at tiny sizes
  : "${SFT_WALL:=25}" "${GRPO_WALL:=25}" "${ZPRE_WALL:=20}" "${ZGRPO_WALL:=25}" "${ANCESTOR=0.5}" "${SAVE_STEPS:=2}"
  : "${ANCESTOR_ARGS:=--last 2 --limit 2 --floor 0}"
  SMOKE_DATA="dataset_num_proc=1 per_device_train_batch_size=8 logging_steps=1"
  SFT_ARGS="$SMOKE_DATA sft.data.tasks.add_sub=400 $SFT_ARGS"
  GRPO_ARGS="per_device_train_batch_size=16 num_generations=4 max_completion_length=32 fast_generation=false logging_steps=1 grpo.data.tasks.add_sub=200 $GRPO_ARGS"
  ZPRE_ARGS="$SMOKE_DATA pretrain.data.tasks.add_sub=400 $ZPRE_ARGS"
  ZGRPO_ARGS="per_device_train_batch_size=16 num_generations=4 max_completion_length=32 fast_generation=false logging_steps=1 grpo.data.tasks.add_sub=200 $ZGRPO_ARGS"
  EVAL_ARGS="--limit 4 --device cpu $EVAL_ARGS"
  ANCESTOR_ARGS="$ANCESTOR_ARGS --device cpu"
  export OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=""
fi
if ! $PY -c "import trl, datasets, math_verify.parser" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site ${WHEELS:-.whl}/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
# math-verify scores the answers (it needs latex2sympy2_extended and antlr4-python3-runtime): fail now, not after training
$PY -c "import math_verify.parser" || { say "math-verify does not import: add its wheels to ${WHEELS:-.whl}"; exit 1; }
say "$($PY -c 'import torch, transformers, trl; print(torch.__version__, transformers.__version__, trl.__version__)')"
R=outputs/r1_add_sub; Z=outputs/r1_zero_tiny; L=outputs/logs; rm -rf $L; mkdir -p $R $Z $L  # this call's logs only
INITS=${GRPO_INITS:-$([ -n "$ANCESTOR" ] && echo anc || echo sft)}
rm -f $L/.grpo_*_over  # grpo_INIT's training is over (or will not run): the R1-Zero GRPO stages wait for all of them
r1_over() { touch $L/.grpo_$1_over; }
r1_all_over() { local i; for i in $INITS; do [ -e $L/.grpo_${i}_over ] || return 1; done; }

train() {  # train NAME LOG WALL ARGS...: one stage on its wall-clock budget; a failure is said in one line
  local name=$1 log=$2 wall=$3; shift 3
  if WALL=$wall $PY benchmarks/train_wall.py "$@" > $log 2>&1; then
    say "$name: $(grep -E ' done:' $log | tail -1)"
  else
    say "$name FAILED ($(grep -E '^[A-Za-z_.]*(Error|Exception)' $log | tail -1 | cut -c1-160); log $log): its evaluation skipped"
    return 1
  fi
}
trained() { [ -f "$1/config.json" ]; }

zero() {  # one R1-Zero attempt: $1 name, then pretraining overrides (ZPRE_INIT: a pretrained base to start GRPO from)
  local name=$1; shift
  rm -rf $Z/$name
  if [ -n "$ZPRE_INIT" ]; then
    mkdir -p $Z/$name; cp -r $ZPRE_INIT $Z/$name/pretrain
  else
    TIME_COSINE=1 train "zero $name pretrain" $L/$name.pretrain.log ${ZPRE_WALL:-300} r1_zero_tiny pretrain \
      output_dir=$Z/$name/pretrain max_steps=100000 "$@" $ZPRE_ARGS || return
  fi
  $PY benchmarks/r1_zero_eval.py $Z/$name/pretrain $EVAL_ARGS --json $L/$name.before.json > $L/$name.before.log 2>&1
  say "zero $name base: $(tail -1 $L/$name.before.log | cut -c1-200)"
  [ "${ZGRPO_WALL:-140}" = 0 ] && return
  until r1_all_over; do sleep 2; done  # an R1 GRPO stage and two of these do not fit on one H200 together
  train "zero $name grpo" $L/$name.grpo.log ${ZGRPO_WALL:-140} r1_zero_tiny grpo grpo.init=$Z/$name/pretrain \
    output_dir=$Z/$name/grpo max_steps=100000 $ZGRPO_ARGS || return
  $PY benchmarks/r1_zero_eval.py $Z/$name/grpo $EVAL_ARGS --json $L/$name.after.json > $L/$name.after.log 2>&1
  say "zero $name done: $(tail -1 $L/$name.after.log | cut -c1-200)"
}
ZPIDS=""; ZNAMES=""
for attempt in ${ZERO_ATTEMPTS-zh_tagged035pct:0.0035}; do
  IFS=: read -r name tagged extra <<< "$attempt"
  zero $name pretrain.data.tagged_share=$tagged ${extra//,/ } &
  ZPIDS="$ZPIDS $!"; ZNAMES="$ZNAMES $name"
done

eval_now() {  # eval_now NAME: add_sub_eval.py on $R/NAME, then the embedded default's chat-app and hardest-bucket tests
  $PY benchmarks/add_sub_eval.py $R/$1 $EVAL_ARGS $R1_EVAL_ARGS --json $L/$1_eval.json > $L/$1_eval.log 2>&1
  if ! $PY -c "import gradio" 2>/dev/null; then  # the tests drive the app's responder, which needs Gradio
    echo "$R/$1 chat-app tests: not run (no gradio here; on the CPU: HF_DEEPSEEK_ADD_SUB_CHECKPOINT=DIR pytest" \
      "tests/test_checkpoint_add_sub.py)" >> $L/$1_eval.log
    return
  fi
  HF_DEEPSEEK_ADD_SUB_CHECKPOINT=$R/$1 $PY -m pytest -q -p no:cacheprovider tests/test_checkpoint_add_sub.py \
    -k "conversation or hardest" > $L/$1_app_tests.log 2>&1
  echo "$R/$1 chat-app tests: $(grep -E 'passed|failed|error' $L/$1_app_tests.log | tail -1)" >> $L/$1_eval.log
}
evaluate() {  # evaluate NAME: eval_now in the background, its pid appended to EPIDS
  trained $R/$1 || return
  eval_now $1 &
  EPIDS="$EPIDS $!"
}
grpo() {  # grpo INIT: GRPO from $R/INIT into $R/grpo_INIT, then its evaluation
  rm -rf $R/grpo_$1
  trained $R/$1 || { say "grpo_$1: no model at $R/$1 to start from"; r1_over $1; return; }
  train "grpo_$1" $L/grpo_$1.log ${GRPO_WALL:-150} r1_add_sub grpo grpo.init=$R/$1 output_dir=$R/grpo_$1 \
    max_steps=100000 per_device_train_batch_size=1024 $GRPO_ARGS
  local rc=$?; r1_over $1; [ $rc = 0 ] || return
  eval_now grpo_$1
}

EPIDS=""; GPIDS=""
[ "${GRPO_WALL:-150}" = 0 ] && for i in $INITS; do r1_over $i; done
if [ "${SFT_WALL:-210}" = 0 ]; then  # no SFT: GRPO from the cold-start model at SFT_INIT
  if [ -z "$SFT_INIT" ]; then rm -rf $R/sft $R/anc  # no R1 model this call (outputs/ may hold an older one)
  elif [ "$(realpath $SFT_INIT)" != "$(realpath -m $R/sft)" ]; then rm -rf $R/sft; cp -r $SFT_INIT $R/sft; fi
  [ -z "$SFT_INIT" ] && [ "${GRPO_WALL:-150}" != 0 ] && say "SFT_WALL=0 needs SFT_INIT: no R1 GRPO"
else
  SAVE=""  # with ANCESTOR, checkpoints to choose GRPO's starting point from
  [ -n "$ANCESTOR" ] && SAVE="save_strategy=steps save_steps=${SAVE_STEPS:-30} save_only_model=true"
  rm -rf $R/sft $R/anc
  TIME_COSINE=1 train sft $L/sft.log ${SFT_WALL:-210} r1_add_sub sft output_dir=$R/sft max_steps=100000 $SAVE $SFT_ARGS
fi
if [ "${GRPO_WALL:-150}" != 0 ] && [[ " $INITS " == *" sft "* ]]; then  # from the final model: no need to wait
  if [ "${GRPO_SERIAL:-0}" = 1 ]; then grpo sft; else grpo sft & GPIDS="$GPIDS $!"; fi
fi
if [ -n "$ANCESTOR" ] && trained $R/sft; then  # the checkpoint nearest ANCESTOR pass@1 (sub4 unless --bucket)
  ANC=$($PY benchmarks/pick_ancestor.py $R/sft --target $ANCESTOR $ANCESTOR_ARGS --json $L/ancestor.json 2> $L/ancestor.log)
  say "ancestor: $ANC ($(tr '\n' ' ' < $L/ancestor.log | grep -o 'checkpoint-[0-9]*: [a-z]*[0-9] [0-9/]*' | tr '\n' ' '))"
  rm -rf $R/anc && cp -r ${ANC:-$R/sft} $R/anc && rm -rf $R/anc/checkpoint-*
  evaluate anc
fi
evaluate sft
if [ "${GRPO_WALL:-150}" != 0 ] && [[ " $INITS " == *" anc "* ]]; then
  if [ "${GRPO_SERIAL:-0}" = 1 ]; then grpo anc; else grpo anc & GPIDS="$GPIDS $!"; fi
fi
[ -n "$GPIDS" ] && wait $GPIDS  # a bare `wait` would wait for the R1-Zero attempts too
for i in $INITS; do r1_over $i; done
[ -n "$EPIDS" ] && wait $EPIDS
MODELS="sft $([ -n "$ANCESTOR" ] && echo anc) $([ "${GRPO_WALL:-150}" != 0 ] && for i in $INITS; do echo grpo_$i; done)"
for m in $MODELS; do  # this call's R1 models (outputs/ may hold older ones)
  [ -f $L/${m}_eval.log ] && grep -h -v -i -E "warn|loading" $L/${m}_eval.log
done
[ -n "$ZPIDS" ] && wait $ZPIDS
for m in $MODELS; do [ -f $R/$m/metrics.csv ] && cp $R/$m/metrics.csv $L/${m}_metrics.csv; done
for d in $ZNAMES; do for s in pretrain grpo; do
  [ -f $Z/$d/$s/metrics.csv ] && cp $Z/$d/$s/metrics.csv $L/$d.$s.metrics.csv
done; done
rm -f $L/.grpo_*_over
tar czf $OUT/logs.tgz $L  # first: it comes back even if the call is cut while the models are archived
archive() { [[ " ${ARCHIVES-sft anc grpo zero} " == *" $1 "* ]]; }
SKIP=(--exclude='checkpoint-*' --exclude=reference_model --exclude=plots)
for m in $MODELS; do
  trained $R/$m && { archive $m || { [[ $m == grpo_* ]] && archive grpo; }; } && tar czf $OUT/$m.tgz "${SKIP[@]}" -C $R $m
done
for d in $ZNAMES; do  # the GRPO model alone: with the base's, one file would pass the device tool's 16 MiB
  archive zero && trained $Z/$d/grpo && tar czf $OUT/zero_$d.tgz "${SKIP[@]}" --exclude="$d/pretrain" -C $Z $d
done
ls -la $OUT
say "done"
