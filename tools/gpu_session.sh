#!/usr/bin/env bash
# One time-boxed call on a GPU: the GPU suite (tools/gpu_suite.py) and the accuracy study
# at convergence (tools/bench_accuracy.py, BENCHMARKS.md), the two GPU jobs of BENCHMARKS.md.
#
#   bash tools/gpu_session.sh OUT [SECONDS]        # SECONDS: the whole session's wall budget (560)
#   SUITE=0 RULES="auglocal dgl bp" SEEDS=1 EPOCHS=15 JOBS=3 bash tools/gpu_session.sh OUT 570
#
# The study's runs are chosen by RULES (auglocal bp infopro dgl), SEEDS (0 1), EPOCHS (10), JOBS (4)
# and THREADS (2) per run; SUITE=0 leaves the GPU suite out and gives the study the whole budget (a
# session that finishes runs of the study at convergence, which a CPU would take hours over).
#
# The device tool sends the working tree and nothing else, so Fashion-MNIST travels as the carried,
# git-ignored folder .fmnist/ (the four .gz files of Debian's dataset-fashion-mnist), read through
# data.root; make it once with
#   mkdir -p .fmnist && cp /usr/share/datasets/fashion-mnist/*.gz .fmnist/ && echo /.fmnist/ >> .git/info/exclude
# and name it in the call's carry. Order, chosen so every figure is measured as it would be alone:
# 1. gpu_suite --sections memory (allocator peaks of its own process: other processes on the card do
#    not change them) beside the accuracy study, STUDY_S seconds at most (default 390); the study is
#    then stopped: finished runs are in its results.json, the others' per-epoch metrics are kept;
# 2. gpu_suite --sections speed compiled alone (step times), in the time left.
# Every PACK_EVERY seconds (20) the study's folder, checkpoints left out, is packed into
# OUT/accuracy.tgz, so a call cut short still brings back every finished epoch. When the study is
# stopped, the last.pt of each run it did not finish comes back too (CKPT=1, the default with
# SUITE=0): tarred and split into OUT/checkpoints.tar.part-aa, -ab, ... (parts of 15 MiB, for
# transfers that limit a file's size), so the run resumes on another machine:
#   cat OUT/checkpoints.tar.part-* | tar xf - -C runs/STUDY      # then the same bench_accuracy command
# On the H200 an epoch of a local rule took 30-35 s with three runs at once, bp's 20 s: 15 epochs of
# three runs, about 9 minutes. The Python is $PYTHON (default python3, the device's); FMNIST names
# another folder holding the four .gz files.
set -u
OUT=${1:?usage: bash tools/gpu_session.sh OUT [SECONDS]}
TOTAL=${2:-560}
SUITE=${SUITE:-1}
if [ "$SUITE" = 0 ]; then STUDY_S=${STUDY_S:-$((TOTAL - 45))}; CKPT=${CKPT:-1}; else STUDY_S=${STUDY_S:-390}; CKPT=${CKPT:-0}; fi
read -r -a RULES <<< "${RULES:-auglocal bp infopro dgl}"
read -r -a SEEDS <<< "${SEEDS:-0 1}"
PY=${PYTHON:-python3}
STUDY=${STUDY_DIR:-/tmp/accuracy}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PACK_EVERY=${PACK_EVERY:-20}
if [ -z "${FMNIST:-}" ]; then
    FMNIST=$PWD/.fmnist
    [ -d "$FMNIST" ] || FMNIST=/usr/share/datasets/fashion-mnist
fi
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
    echo "gpu_session.sh: no Fashion-MNIST in .fmnist/ or $FMNIST; copy Debian's dataset-fashion-mnist files into .fmnist/ and carry it" >&2
    exit 2
fi
mkdir -p "$OUT" "$STUDY"

pack() {  # atomically: a half-written archive never replaces the last whole one
    tar czf "$OUT/accuracy.tgz.part" -C "$STUDY" --exclude='*.pt' . 2>/dev/null && mv "$OUT/accuracy.tgz.part" "$OUT/accuracy.tgz"
}
left() { echo $((TOTAL - SECONDS)); }

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
$PY -c "import sys, torch, torchvision, timm; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, \
'torchvision', torchvision.__version__, 'timm', timm.__version__, torch.cuda.get_device_name(0))" || exit 1

# channels_last as in the CPU study (BENCHMARKS.md "Accuracy at convergence"): same recipe, same settings
STUDY_ARGS=(--recipe recipes/fashion_mnist_resnet32.yaml --rules "${RULES[@]}" --seeds "${SEEDS[@]}"
            --set epochs="${EPOCHS:-10}" --set data.val_split=5000 --set channels_last=true
            --set data.root="$FMNIST" --set data.num_workers=1
            --jobs "${JOBS:-4}" --threads "${THREADS:-2}" --out "$STUDY")
setsid $PY tools/bench_accuracy.py "${STUDY_ARGS[@]}" > "$STUDY/study.out" 2> "$STUDY/study.err" &
study=$!
memory=
if [ "$SUITE" != 0 ]; then
    setsid $PY tools/gpu_suite.py --sections memory --budget-s $((STUDY_S - 20)) --out "$OUT/memory" > "$OUT/memory.log" 2>&1 &
    memory=$!
fi

while kill -0 "$study" 2>/dev/null && [ "$SECONDS" -lt "$STUDY_S" ]; do
    sleep "$PACK_EVERY"
    pack
    for log in "$STUDY"/*/train.log; do  # each run's last progress line
        [ -f "$log" ] && echo "[$SECONDS s] $(basename "$(dirname "$log")"): $(tail -n 1 "$log" | cut -c1-100)"
    done
done
if kill -0 "$study" 2>/dev/null; then
    echo "[$SECONDS s] study stopped at its share of the time; unfinished runs keep their epochs so far"
    kill -- -"$study" 2>/dev/null
fi
wait "$study"
echo "study exit status $?"
if [ -n "$memory" ]; then
    wait "$memory"
    echo "memory section exit status $?"
fi
$PY tools/bench_accuracy.py "${STUDY_ARGS[@]}" --status > "$STUDY/status.txt" 2>&1
cat "$STUDY/study.out" "$STUDY/status.txt"
pack
if [ "$CKPT" = 1 ]; then  # the unfinished runs' last.pt (a finished run has its summary.json)
    unfinished=()
    for last in "$STUDY"/*/last.pt; do
        [ -f "$last" ] && [ ! -f "$(dirname "$last")/summary.json" ] && unfinished+=("$(basename "$(dirname "$last")")/last.pt")
    done
    if [ "${#unfinished[@]}" -gt 0 ]; then
        tar cf - -C "$STUDY" "${unfinished[@]}" | split -b 15m - "$OUT/checkpoints.tar.part-"
        echo "checkpoints of unfinished runs: ${unfinished[*]} in $(ls "$OUT"/checkpoints.tar.part-* | wc -l) part(s)"
    fi
fi

budget=$(( $(left) - 15 ))
if [ "$SUITE" = 0 ]; then
    echo "GPU suite left out (SUITE=0)"
elif [ "$budget" -ge 60 ]; then
    $PY tools/gpu_suite.py --sections speed compiled --budget-s "$budget" --out "$OUT/speed" > "$OUT/speed.log" 2>&1
    echo "speed sections exit status $?"
    cat "$OUT/speed/gpu_suite.md" 2>/dev/null
else
    echo "speed sections skipped: $(left) s left"
fi
cat "$OUT/memory/gpu_suite.md" 2>/dev/null
echo "session done in $SECONDS s"
