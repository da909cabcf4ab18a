#!/bin/bash
# Trains and evaluates the candidate embedded default (recipe r1_add_sub: cold-start SFT, then GRPO, on 1- to 4-digit addition and subtraction) and runs R1-Zero in miniature
# (recipe r1_zero_tiny, three pretraining mixes: no tags, 0.2% and 2% of documents with the R1 tags) side by side on one GPU, each stage on a wall-clock budget
# (benchmarks/train_wall.py); then greedy pass@1 of the SFT ancestor and the GRPO model on every add_sub bucket and
# on first vs second turns (benchmarks/add_sub_eval.py), and of the R1-Zero base and GRPO models on held-out 4-digit
# sums (benchmarks/r1_zero_eval.py). On the GPU machine, from the repo root, with $OUT set:
#   bash benchmarks/r1_add_sub_gpu.sh
# Env: SFT_WALL (s, default 210), GRPO_WALL (150), ZPRE_WALL (150), ZGRPO_WALL (210); ZERO_ATTEMPTS, the R1-Zero
# attempts as NAME:TAGGED_SHARE[:KEY=VALUE,...] words, the optional third part that attempt's own pretraining overrides
# (default the three above; empty for none); WHEELS, a folder of wheels to
# install when `import trl, datasets` fails (default .whl); SFT_ARGS, GRPO_ARGS, ZPRE_ARGS, ZGRPO_ARGS: more overrides
# and EVAL_ARGS more evaluation options (a CPU smoke test: small data and `--limit 4`). A stage is skipped with its
# WALL at 0: SFT_WALL=0 starts GRPO from the model at SFT_INIT, GRPO_WALL=0 stops after the cold start, ZGRPO_WALL=0
# after the R1-Zero bases; ZPRE_INIT gives a pretrained R1-Zero base instead of pretraining one. ANCESTOR=0.88: the
# cold start saves checkpoints (SAVE_STEPS, default 30) and GRPO starts from the one nearest 88% on sub4
# (benchmarks/pick_ancestor.py, options in ANCESTOR_ARGS; $OUT/anc.tgz), so that GRPO has room to show its gain.
# Writes $OUT/logs.tgz first (logs, metrics.csv, evaluation JSON), then one model an archive (each ~14 MB, under the
# device tool's 16 MiB a file; 64 MiB in all): $OUT/sft.tgz, $OUT/anc.tgz (with ANCESTOR), $OUT/grpo.tgz and
# $OUT/zero_NAME.tgz (an R1-Zero attempt's GRPO model; its base's evaluation and curves are in logs.tgz); ARCHIVES
# names the model archives to write (default "sft anc grpo zero"; leave some out to stay under 64 MiB).
START=$(date +%s)
say() { echo "[$(( $(date +%s) - START ))s] $*"; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export TORCHINDUCTOR_COMPILE_THREADS=2 OMP_NUM_THREADS=2
OUT=${OUT:?set OUT}
if ! python3 -c "import trl, datasets, math_verify.parser" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site ${WHEELS:-.whl}/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
# math-verify scores the answers (it needs latex2sympy2_extended and antlr4-python3-runtime): fail now, not after training
python3 -c "import math_verify.parser" || { say "math-verify does not import: add its wheels to ${WHEELS:-.whl}"; exit 1; }
say "$(python3 -c 'import torch, transformers, trl; print(torch.__version__, transformers.__version__, trl.__version__)')"
R=outputs/r1_add_sub; Z=outputs/r1_zero_tiny; L=outputs/logs; mkdir -p $R $Z $L

zero() {  # one R1-Zero attempt: $1 name, then pretraining overrides (ZPRE_INIT: a pretrained base to start GRPO from)
  local name=$1; shift
  if [ -n "$ZPRE_INIT" ]; then
    mkdir -p $Z/$name; cp -r $ZPRE_INIT $Z/$name/pretrain
  else
    WALL=${ZPRE_WALL:-150} TIME_COSINE=1 python3 benchmarks/train_wall.py r1_zero_tiny pretrain \
      output_dir=$Z/$name/pretrain max_steps=100000 "$@" $ZPRE_ARGS > $L/$name.pretrain.log 2>&1
  fi
  python3 benchmarks/r1_zero_eval.py $Z/$name/pretrain $EVAL_ARGS --json $L/$name.before.json > $L/$name.before.log 2>&1
  say "zero $name base: $(tail -1 $L/$name.before.log | cut -c1-200)"
  [ "${ZGRPO_WALL:-210}" = 0 ] && return
  WALL=${ZGRPO_WALL:-210} python3 benchmarks/train_wall.py r1_zero_tiny grpo grpo.init=$Z/$name/pretrain \
    output_dir=$Z/$name/grpo max_steps=100000 $ZGRPO_ARGS > $L/$name.grpo.log 2>&1
  python3 benchmarks/r1_zero_eval.py $Z/$name/grpo $EVAL_ARGS --json $L/$name.after.json > $L/$name.after.log 2>&1
  say "zero $name done: $(tail -1 $L/$name.after.log | cut -c1-200)"
}
ZPIDS=""
for attempt in ${ZERO_ATTEMPTS-z1_plain:0.0 z2_tagged02pct:0.002 z3_tagged2pct:0.02}; do
  IFS=: read -r name tagged extra <<< "$attempt"
  zero $name pretrain.data.tagged_share=$tagged ${extra//,/ } &
  ZPIDS="$ZPIDS $!"
done

if [ "${SFT_WALL:-210}" = 0 ]; then  # no SFT: GRPO from the cold-start model at SFT_INIT
  mkdir -p $R; cp -r ${SFT_INIT:?SFT_WALL=0 needs SFT_INIT} $R/sft
else
  SAVE=""  # with ANCESTOR, checkpoints to choose GRPO's starting point from
  [ -n "$ANCESTOR" ] && SAVE="save_strategy=steps save_steps=${SAVE_STEPS:-30} save_only_model=true"
  WALL=${SFT_WALL:-210} TIME_COSINE=1 python3 benchmarks/train_wall.py r1_add_sub sft output_dir=$R/sft max_steps=100000 \
    $SAVE $SFT_ARGS > $L/sft.log 2>&1
  say "sft: $(grep -E 'done|Error' $L/sft.log | tail -2)"
fi
if [ -n "$ANCESTOR" ]; then  # GRPO from the checkpoint nearest ANCESTOR pass@1 on sub4, not from the final model
  ANC=$(python3 benchmarks/pick_ancestor.py $R/sft --target $ANCESTOR $ANCESTOR_ARGS --json $L/ancestor.json 2> $L/ancestor.log)
  say "ancestor: $ANC ($(tr '\n' ' ' < $L/ancestor.log | grep -o 'checkpoint-[0-9]*: [a-z]*[0-9] [0-9/]*' | tr '\n' ' '))"
  rm -rf $R/anc && cp -r ${ANC:-$R/sft} $R/anc && GRPO_INIT=$R/anc
  python3 benchmarks/add_sub_eval.py $R/anc $EVAL_ARGS --json $L/anc_eval.json > $L/anc_eval.log 2>&1 &
  AP=$!
fi
python3 benchmarks/add_sub_eval.py $R/sft $EVAL_ARGS --json $L/sft_eval.json > $L/sft_eval.log 2>&1 &
EP=$!
if [ "${GRPO_WALL:-150}" != 0 ]; then
  WALL=${GRPO_WALL:-150} python3 benchmarks/train_wall.py r1_add_sub grpo grpo.init=${GRPO_INIT:-$R/sft} \
    output_dir=$R/grpo max_steps=100000 per_device_train_batch_size=1024 $GRPO_ARGS > $L/grpo.log 2>&1
  say "grpo: $(grep -E 'done|Error' $L/grpo.log | tail -2)"
  python3 benchmarks/add_sub_eval.py $R/grpo $EVAL_ARGS --json $L/grpo_eval.json > $L/grpo_eval.log 2>&1
fi
wait $EP $AP
cat $L/sft_eval.log $L/anc_eval.log $L/grpo_eval.log 2>/dev/null | grep -v -i -E "warn|loading"
wait $ZPIDS
cp $R/sft/metrics.csv $L/sft_metrics.csv; cp $R/grpo/metrics.csv $L/grpo_metrics.csv
for d in $Z/*/*; do cp $d/metrics.csv $L/$(basename $(dirname $d)).$(basename $d).metrics.csv 2>/dev/null; done
tar czf $OUT/logs.tgz $L  # first: it comes back even if the call is cut while the models are archived
archive() { [[ " ${ARCHIVES-sft anc grpo zero} " == *" $1 "* ]]; }
SKIP=(--exclude='checkpoint-*' --exclude=reference_model --exclude=plots)  # anc may be a copy of sft, checkpoints and all
for m in sft anc grpo; do archive $m && [ -d $R/$m ] && tar czf $OUT/$m.tgz "${SKIP[@]}" -C $R $m; done
for d in $Z/*; do  # the GRPO model alone: with the base's, one file would pass the device tool's 16 MiB
  archive zero && [ -d $d ] && tar czf $OUT/zero_$(basename $d).tgz "${SKIP[@]}" --exclude="$(basename $d)/pretrain" -C $Z $(basename $d)
done
ls -la $OUT
say "done"
