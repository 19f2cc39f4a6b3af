#!/usr/bin/env bash
# pkd-cache's first run on a GPU machine (the H200 the device tool lends: python3 with torch, no internet), in one
# go of at most 420 s: install what that machine lacks from carried wheels, build the C extensions, a CUDA smoke of
# the CLI (sentence and token stores: dump, distill, eval, each checked against the CPU), the small tests, then the
# speed benchmarks on cuda (bench_lm_store.py, its GPT-2-small-shaped random teacher, bench_dump.py,
# bench_distill.py).
#
#   bash benchmarks/gpu_check.sh        # from the repo root, with .whl/ and .gpu/ carried, $OUT an empty folder
#
# .whl/: zarr, numcodecs, donfig, google-crc32c, datasets, dill, multiprocess (cp312 manylinux wheels).
# .gpu/: lm/teacher and lm/data (bench_lm_store's trained teacher; the first 20,000 lines of its corpus),
#        glue/SST-2 (for PKD_GLUE), minilm/ (MiniLM's config.json and tokenizer files alone, for PKD_MINILM_CONFIG:
#        its 90 MB of weights do not fit the 64 MiB that travels; speed does not depend on them).
# $OUT gets log.txt (everything), summary.txt (each step's exit status and seconds) and one file per benchmark.
# Making them in a fresh checkout (both folders are in .git/info/exclude; about 40 MiB together):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl zarr==3.1.6 numcodecs==0.16.6 \
#     donfig==0.8.1.post1 google-crc32c==1.9.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
#   mkdir -p .gpu/lm/data .gpu/glue .gpu/minilm && cp -r /work/lm/teacher .gpu/lm/ && for f in train heldout; do
#     head -n 20000 /work/lm/data/$f.txt > .gpu/lm/data/$f.txt; done && cp -r ../shared/glue/SST-2 .gpu/glue/
#   (cd "$(python -c 'from pkd_cache.testing import minilm_path; print(minilm_path())')" && cp config.json \
#     special_tokens_map.json tokenizer.json tokenizer_config.json vocab.txt "$OLDPWD/.gpu/minilm/")
#
# A dry run of every step, tiny and on the CPU, without the wheels or the C build (here, with a venv):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_SMALL=1 OUT=/tmp/gpu_check PATH=/work/venv/bin:$PATH bash benchmarks/gpu_check.sh
# Some steps only: GPU_CHECK_ONLY="install build_ext environment bench_lm_store" bash benchmarks/gpu_check.sh
#
# No `set -e`: each step runs under `timeout` (its own cap, or what is left of GPU_CHECK_BUDGET less the end's
# reserve), its failure is logged, and the next step runs.

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_PROGRESS_BARS=1 COLUMNS=160
DEVICE=${GPU_CHECK_DEVICE:-cuda}
SMALL=${GPU_CHECK_SMALL:-0}
BUDGET=${GPU_CHECK_BUDGET:-420}
ONLY=${GPU_CHECK_ONLY:-}  # the names of the steps to run, space-separated (default: all)
RESERVE=20  # seconds kept for the last step (nvidia-smi, the summary) and a killed step's 5 s of grace
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
LOG=$OUT/log.txt
GPU=$PWD/.gpu
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
START=$SECONDS
export DEVICE SMALL GPU WORK PKD_CACHE_HOME=$WORK/cache  # dumps' fine-tuned teachers, never ~/.cache

log() { echo "[$(date -u +%H:%M:%S) +$((SECONDS - START))s] $*" | tee -a "$LOG"; }

# step NAME CAP FILE COMMAND: COMMAND (a bash string) under timeout, its output into $LOG and, if FILE, $OUT/FILE
step() {
  local name=$1 cap=$2 file=$3 cmd=$4
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  local left=$((BUDGET - RESERVE - (SECONDS - START)))
  local t=$((cap < left ? cap : left)) t0=$SECONDS
  if ((t < 5)); then
    log "SKIP $name: the budget is spent"
    echo "$name skipped" >>"$OUT/summary.txt"
    return
  fi
  log "BEGIN $name (timeout ${t}s)"
  timeout -k 5 "$t" bash -c "$cmd" 2>&1 | tee -a "$LOG" ${file:+"$OUT/$file"}
  local rc=${PIPESTATUS[0]}
  log "END $name: exit $rc$( ((rc == 124 || rc == 137)) && echo ' (timed out)') in $((SECONDS - t0))s"
  echo "$name exit $rc $((SECONDS - t0))s" >>"$OUT/summary.txt"
}

log "gpu_check: device $DEVICE, small $SMALL, budget ${BUDGET}s, in $PWD"

# --- 0. install, build, look at the machine -----------------------------------------------------------------------
if [ "$SMALL" = 1 ]; then
  export PYTHONPATH=$PWD
  log "small run: no wheel install, no C build (this checkout's own builds, if any)"
else
  step install 60 "" "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && ls /tmp/site"
  export PYTHONPATH=/tmp/site:$PWD
  step build_ext 90 "" "python3 setup.py build_ext --inplace 2>&1 | tail -n 25; ls pkd_cache/store/_bits*.so \
    pkd_cache/teacher/_sampler*.so || echo 'C extensions NOT built: the numpy and torch fallbacks run'"
fi
step nvidia-smi 15 "" "nvidia-smi || echo 'nvidia-smi FAILED'; (git log -1 --oneline; git status --short) 2>/dev/null;
  nproc; free -g"
step environment 45 "" "python3 - <<'EOF'
import sys, time
t = time.perf_counter()
import numpy, torch, transformers
print('python', sys.version.split()[0], 'numpy', numpy.__version__, 'torch', torch.__version__, 'cuda',
      torch.version.cuda, 'transformers', transformers.__version__)
if torch.cuda.is_available():
    print('device', torch.cuda.get_device_name(), 'capability', torch.cuda.get_device_capability(), 'count',
          torch.cuda.device_count())
else:
    print('no CUDA device')
import pkd_cache, zarr, numcodecs, google_crc32c
print('import pkd_cache OK', pkd_cache.__version__, pkd_cache.__file__, 'zarr', zarr.__version__, 'numcodecs',
      numcodecs.__version__)
from pkd_cache.store import integrity
from pkd_cache.teacher import token_targets
try:
    from pkd_cache.store import _bits
    print('store/_bits.c: built', _bits.__file__)
except ImportError as e:
    print('store/_bits.c: not built:', e)
print('teacher/_sampler.c:', 'built, openmp' if token_targets._SAMPLER_OPENMP else
      'built, no openmp' if token_targets._sample_rows is not None else 'not built')
print(f'imports took {time.perf_counter() - t:.1f}s')
EOF"

# --- 1. CUDA smoke: the CLI on tiny random models, against the same commands on the CPU ---------------------------
cat >"$WORK/smoke.py" <<'EOF'
"""dump / distill / eval on cuda (in this process, through the CLI's app) of tiny random models, checked against the
CPU: the sentence store's logits and CLS, the token store's sample:16 targets, the LM student's perplexity."""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pkd_cache import open_store
from pkd_cache.store.token_stream import iter_token_batches
from pkd_cache.testing import cli_in_process, make_bert, make_causal_lm, synthetic_rows, write_jsonl, write_sst2

dev, d = os.environ["DEVICE"], Path(os.environ["WORK"]) / "smoke"
problems = []


def run(*args):
    t = time.perf_counter()
    p = cli_in_process(*args)
    print(f"--- pkd-cache {' '.join(map(str, args))}\nexit {p.returncode} in {time.perf_counter() - t:.1f}s")
    print("\n".join(p.stdout.rstrip().splitlines()[-12:]))
    if p.returncode:
        print(p.stderr.rstrip()[-4000:])
        problems.append(f"{args[0]} exited {p.returncode}")
    return p


def check(what, ok, detail):
    print(f"CHECK {what}: {'ok' if ok else 'FAILED'} ({detail})")
    if not ok:
        problems.append(what)


teacher = make_bert(d / "teacher", layers=4, head=True)
backbone = make_bert(d / "backbone", layers=4, head=False, seed=1)
data, lm = write_sst2(d / "SST-2", 320, 64), make_causal_lm(d / "lm", layers=2, hidden=32)
rows = [{"text": s} for s, _ in synthetic_rows(600, 3)]
train, held = write_jsonl(d / "train.jsonl", rows[:500]), write_jsonl(d / "heldout.jsonl", rows[500:])

# sentence level: dump on the device and on the CPU, distill (fp32 and bf16 autocast), eval
for where in dict.fromkeys((dev, "cpu")):  # the device, then the CPU (once, where they are one)
    run("dump", "--teacher", teacher, "--task", "sst2", "--data-dir", data, "--out", d / f"sst2-{where}.zarr",
        "--max-seq-length", 32, "--batch-size", 32, "--device", where)
try:
    a, b = (open_store(str(d / f"sst2-{w}.zarr")).read("train", 0, 320) for w in (dev, "cpu"))
    for name, tol in (("logits", 1e-3), ("cls", 2e-2)):
        diff = float(np.abs(a[name].astype(np.float32) - b[name].astype(np.float32)).max())
        check(f"sentence store {name}, {dev} against cpu", diff <= tol, f"max |diff| {diff:.2e}, tolerance {tol}")
except Exception as e:  # a failed dump above: already counted
    print("no comparison:", repr(e))
run("distill", "--store", d / f"sst2-{dev}.zarr", "--student-init", backbone, "--student-layers", 2, "--output-dir",
    d / "student", "--max-steps", 8, "--batch-size", 32, "--device", dev)
if dev != "cpu":
    run("distill", "--store", d / f"sst2-{dev}.zarr", "--student-init", backbone, "--student-layers", 2,
        "--output-dir", d / "student-bf16", "--max-steps", 4, "--bf16", "--device", dev)
run("eval", "--model", d / "student", "--task", "sst2", "--data-dir", data, "--device", dev)

# token level: dump --task lm --logits sample:16 on the device and on the CPU, distill, eval against the CPU's eval
for where in dict.fromkeys((dev, "cpu")):  # the device, then the CPU (once, where they are one)
    run("dump", "--teacher", lm, "--task", "lm", "--data-files", train, "--validation-file", held, "--max-seq-length",
        32, "--logits", "sample:16", "--out", d / f"lm-{where}.zarr", "--device", where)
try:
    got = [next(iter_token_batches(open_store(str(d / f"lm-{w}.zarr")), "train", 1 << 20, shuffle=False))
           for w in (dev, "cpu")]
    same = torch.equal(got[0]["input_ids"], got[1]["input_ids"])
    m = max(g["target_ids"].shape[-1] for g in got)  # ids, counts: [sequences, width, M], M the most unique ids
    ids, counts = ([torch.nn.functional.pad(g[k], (0, m - g[k].shape[-1])) for g in got]
                   for k in ("target_ids", "target_counts"))
    rows_equal = ((ids[0] == ids[1]) & (counts[0] == counts[1])).all(-1)  # [sequences, width]
    share = float(rows_equal[got[0]["attention_mask"].bool()].float().mean())
    check(f"token store sample:16 targets, {dev} against cpu", same and share >= 0.95,
          f"same tokens {same}; {share:.4f} of the tokens drew the same ids (the format allows a draw within "
          f"rounding of a CDF step to move)")
except Exception as e:
    print("no comparison:", repr(e))
run("distill", "--store", d / f"lm-{dev}.zarr", "--student-layers", 1, "--output-dir", d / "lm-student",
    "--max-steps", 8, "--device", dev)
if dev != "cpu":  # bf16 autocast, in the teacher's forward and in the student's training
    run("dump", "--teacher", lm, "--task", "lm", "--data-files", train, "--max-seq-length", 32, "--logits", "sample:16",
        "--out", d / "lm-bf16.zarr", "--precision", "bf16", "--device", dev)
    run("distill", "--store", d / f"lm-{dev}.zarr", "--student-layers", 1, "--output-dir", d / "lm-student-bf16",
        "--max-steps", 4, "--bf16", "--device", dev)
ppl = {}
for where in dict.fromkeys((dev, "cpu")):  # the device, then the CPU (once, where they are one)
    p = run("eval", "--model", d / "lm-student", "--task", "lm", "--data-files", held, "--device", where, "--json")
    if p.returncode == 0:
        ppl[where] = json.loads(p.stdout[p.stdout.index("{"):p.stdout.rindex("}") + 1])["perplexity"]
if len(ppl) == 2:
    check(f"LM student perplexity, {dev} against cpu", abs(ppl[dev] / ppl["cpu"] - 1) < 1e-3,
          f"{ppl[dev]:.5f} against {ppl['cpu']:.5f}")
if torch.cuda.is_available():
    print(f"cuda memory: peak {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB allocated in this process")
print("SMOKE", "OK" if not problems else "FAILED: " + "; ".join(problems))
sys.exit(1 if problems else 0)
EOF
step smoke 100 "" "python3 $WORK/smoke.py"

if [ "$SMALL" = 1 ]; then
  TESTS="tests/test_sparse_kd.py"
else
  TESTS="tests/test_sparse_kd.py tests/test_lm_head.py"
  TESTS+=" tests/test_nonfinite_loss.py::test_on_a_gpu_the_watch_adds_no_host_sync_per_step"  # the CUDA-only test
fi
step pytest 50 "" "python3 -m pytest -q -x -p no:cacheprovider -m 'not slow' $TESTS"

# --- 2. benchmarks ----------------------------------------------------------------------------------------------------
if [ "$SMALL" = 1 ]; then
  LM="--documents 300 --seq 64 --steps 3 --batch 8 --repeats 1"
  RANDOM_LM="--random-teacher 2x64 --vocab 8192 --documents 200 --seq 64 --batch 8 --repeats 1"
  DUMP="--examples 256 --b2-examples 256 --repeats 1 --batch-size 32"
  DISTILL="--steps 2 --warmup 1 --examples 128"
else
  LM="--documents 10000 --steps 200 --batch 32 --repeats 3"
  RANDOM_LM="--random-teacher 12x768 --vocab 32768 --student-layers 4 --documents 10000 --steps 150 --batch 32 --repeats 2"
  DUMP=""
  DISTILL=""
fi
step bench_lm_store 150 bench_lm_store.txt \
  "python3 benchmarks/bench_lm_store.py --teacher $GPU/lm/teacher --data $GPU/lm/data --device $DEVICE $LM"
step bench_lm_store_random 150 bench_lm_store_random.txt \
  "python3 benchmarks/bench_lm_store.py --teacher $GPU/lm/teacher --data $GPU/lm/data --device $DEVICE $RANDOM_LM"
export PKD_GLUE=$GPU/glue PKD_MINILM_CONFIG=$GPU/minilm
# bench_distill first: it is the short one, and bench_dump (B2: all of SST-2 train twice) takes what is left
step bench_distill 70 bench_distill.txt "python3 benchmarks/bench_distill.py --device $DEVICE $DISTILL"
step bench_dump 110 bench_dump.txt "python3 benchmarks/bench_dump.py --device $DEVICE $DUMP"

# --- 3. the end (every benchmark's process has ended: memory.used is what is left held, not their peak) -----------
RESERVE=0
step nvidia-smi-end 10 "" "nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv"
rm -rf "$WORK"
log "gpu_check done in $((SECONDS - START))s"
tee -a "$LOG" <"$OUT/summary.txt"
