#!/usr/bin/env bash
# Every check that needs a CUDA GPU, as one script with a time budget: the CUDA-only tests, the GPU rows of
# docs/benchmarks.md (labelling (a)-(d) for SalGAN and (a)-(c) for DeepGaze IIE, one to six worker processes,
# decoding on the GPU or the CPU, on the sample photos and on them enlarged to 640x480; whether the GPU decode
# overlaps the teacher; students eager and compiled; SACT's sparse path against its dense one; every
# student and teacher at batch 1 as FastSal's Figure 4 timed them; training from shards vs memory), whether
# two label runs give the same tars, and the torch.compile serving test.
#
#   OUT=/tmp/gpu BUDGET=420 bash bench/gpu_checks.sh        # from the repository root
#
# Each step runs under `timeout`, capped by what is left of BUDGET seconds, and appends its output to
# $OUT/log.txt (label_throughput's and device_decode's JSON lines also to $OUT/bench.jsonl; the other benches
# print theirs in the log). A step that runs out of time is reported and the
# next one runs. STEPS="tests label-salgan ..." runs only the steps named (same-tars-salgan runs both of
# SalGAN's runs). On a machine without webdataset/pycocotools installed, wheels in ./.whl are installed to
# /tmp/site first (pip download them elsewhere).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to a folder for the log}
BUDGET=${BUDGET:-420}
STEPS=${STEPS:-}
PY=${PY:-python3}
START=$(date +%s)
mkdir -p "$OUT"
LOG=$OUT/log.txt
J=$OUT/bench.jsonl
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi

step() {  # step NAME SECONDS CMD...
  local name=$1 cap=$2; shift 2
  if [ -n "$STEPS" ] && [[ " $STEPS " != *" $name "* ]] && [[ " $STEPS " != *" ${name%-[12]} "* ]]; then return; fi
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 20 ]; then echo "=== $name: SKIPPED (budget)" | tee -a "$LOG"; return; fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo "=== $name (cap ${cap}s, t=$(( $(date +%s) - START ))s)" | tee -a "$LOG"
  local t0=$(date +%s)
  timeout -k 5 "$cap" "$@" >>"$LOG" 2>&1
  echo "=== $name: rc=$? in $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; nproc
  $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"; } >>"$LOG" 2>&1

step tests 150 $PY -m pytest -q -p no:cacheprovider tests/test_students_cuda.py tests/test_devices.py tests/test_label.py \
  -k "cuda or sync or decoding_and_resizing or device_path_fails or quantised or resized_together or never_writes"

L="$PY bench/label_throughput.py --device cuda --weights random --json $J"
step label-salgan 90 $L --teacher salgan --images 4096 --naive-images 256 --batch-size 128 --shard-size 1024 \
  --runs teacher,worker,naive,null
step label-salgan-2proc 60 $L --teacher salgan --images 4096 --batch-size 128 --shard-size 1024 --runs worker --processes 2 --decode device
step label-salgan-3proc 70 $L --teacher salgan --images 6144 --batch-size 128 --shard-size 1024 --runs worker --processes 3 --decode device
# SalGAN with four to six workers sharing the GPU, decoding on the GPU and on the CPU, each with (a) in the same run;
# and whether the GPU decode overlaps the teacher at all
# (four 1024-image shards per worker, three with six, so that the first shard's start and the last one's end
# weigh less than with two; each worker gets as many shards as the others, as the bench hands them out in turn)
A="--teacher salgan --batch-size 128 --shard-size 1024 --runs teacher,worker"
step label-salgan-4proc 80 $L $A --images 16384 --processes 4 --decode device
step label-salgan-4proc-cpu 80 $L $A --images 16384 --processes 4 --decode cpu
step label-salgan-5proc-cpu 80 $L $A --images 20480 --processes 5 --decode cpu
step label-salgan-6proc-cpu 80 $L $A --images 18432 --processes 6 --decode cpu
# the same at COCO's usual size: the sample photos enlarged to 640x480 (the bundled ones are 300-480 px, half the
# pixels), where cpu-reduced decodes at 320x240 and the GPU and cpu decode whole
$PY - <<'EOF' >>"$LOG" 2>&1
import pathlib, cv2
out = pathlib.Path("/tmp/p640"); out.mkdir(exist_ok=True)
for p in sorted(pathlib.Path("samples/coco/val2017").glob("*.jpg")):
    cv2.imwrite(str(out / p.name), cv2.resize(cv2.imread(str(p)), (640, 480), interpolation=cv2.INTER_CUBIC),
                [cv2.IMWRITE_JPEG_QUALITY, 90])
EOF
step label-salgan-4proc-640 80 $L $A --images 16384 --processes 4 --decode device --photos /tmp/p640
step label-salgan-4proc-640-reduced 80 $L $A --images 16384 --processes 4 --decode cpu-reduced --photos /tmp/p640
step label-salgan-4proc-640-cpu 80 $L $A --images 16384 --processes 4 --decode cpu --photos /tmp/p640
step decode-overlap 60 $PY bench/device_decode.py --teacher salgan --images 4096 --batch-size 128 --json $J
step decode-overlap-own-stream 60 $PY bench/device_decode.py --teacher salgan --images 4096 --batch-size 128 \
  --stream own --json $J
step label-deepgaze-short 90 $L --teacher deepgaze --images 1024 --batch-size 64 --shard-size 256 --runs teacher,worker
step label-deepgaze 150 $L --teacher deepgaze --images 2048 --naive-images 128 --batch-size 64 --shard-size 256 \
  --runs teacher,worker,naive

step students 90 $PY bench/student_latency.py --device cuda --runtimes torch --large-batch 256 --iters 50 --large-iters 10
step students-compile 120 $PY bench/student_latency.py --device cuda --students fastsal_a --runtimes compile \
  --large-batch 256 --iters 50 --large-iters 10 --warmup 8

# SACT: does skipping units save time on the GPU? (dense-masked vs sparse, like for like, about half the
# unit-positions run; bench/sact_speed.py, batch 1, fp32)
step sact-speed 150 $PY bench/sact_speed.py --devices cuda --runs 21 --out "$OUT/sact_speed.jsonl"
# FastSal's Figure 4 on this GPU: batch 1, 100 timed passes at 192x256 in fp32, as the paper measured (its
# GTX 1080 Ti: FastSal (A) about 300 images/s); the students and the teachers they learn from
step profiles 150 bash -c 'for m in "student fastsal_a" "student fastsal_c" "student sact" "teacher salgan" \
    "teacher deepgaze"; do set -- $m; echo "--- $2"; '"$PY"' -m pipeline profile --$1 $2 --weights random \
    --device cuda --precision fp32 --batch-size 1 --iters 100 --image-size 192x256 \
    --out "'"$OUT"'/profile-$2.json" || echo "--- $2 failed"; done'

# training: the sample's train photos repeated to 4096, labelled by classic on the GPU
rm -rf /tmp/rep /tmp/trainlabels && mkdir -p /tmp/rep && SRC=( "$PWD"/samples/coco/train2017/*.jpg ) && \
  for i in $(seq 0 4095); do ln -s "${SRC[$(( i % ${#SRC[@]} ))]}" /tmp/rep/$(printf %08d "$i").jpg; done
step train-labels 60 $PY -m pipeline label folder --images /tmp/rep --teacher classic --out /tmp/trainlabels \
  --shard-size 512 --device cuda --executor local --io-threads 8 --no-progress --allow-outside-root
step train 100 $PY bench/train_throughput.py --device cuda --labels /tmp/trainlabels/classic/rep --batch-size 256 \
  --steps 12 --workers 8

# the same images labelled twice, in two processes: byte-identical tars?
for t in salgan deepgaze; do
  rm -rf "/tmp/same1/$t" "/tmp/same2/$t"  # (a run on a warm machine would resume an earlier one's and compare that)
  for k in 1 2; do
    step "same-tars-$t-$k" 60 $PY -m pipeline label coco --teacher "$t" --weights random --coco-root samples/coco \
      --split train2017 --out "/tmp/same$k" --shard-size 128 --device cuda --executor local --io-threads 8 --no-progress
  done
  [ -f "/tmp/same1/$t/train2017/labels.json" ] && [ -f "/tmp/same2/$t/train2017/labels.json" ] || continue
  $PY - "$t" >>"$LOG" 2>&1 <<'EOF'
import json, sys
t = sys.argv[1]
a, b = ([s["sha256"] for s in json.load(open(f"/tmp/same{k}/{t}/train2017/labels.json"))["shards"]] for k in (1, 2))
print(f"SAME TARS {t}: {'yes' if a == b else 'NO'}")
EOF
done

step compile-test 120 $PY -m pytest -q -p no:cacheprovider tests/test_serving.py -k compile
echo "=== total $(( $(date +%s) - START ))s" | tee -a "$LOG"
