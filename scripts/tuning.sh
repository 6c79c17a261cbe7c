#!/usr/bin/env bash
# The sweeps behind the defaults (docs/results/README.md, "How the defaults were chosen").
# Each run writes docs/results/tuning/<name>.json; `python scripts/tuning_table.py` prints
# the tables.
# GPT-J-6B/A100, InferCept mix, 2,000 jobs. About 5 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
out=docs/results/tuning
mkdir -p "$out"
run() { local name=$1; shift; astraea bench --jobs 2000 --out "$out/$name.json" "$@" > /dev/null; echo "$name" >&2; }

# Stateful-MLFQ levels and quotas
for levels in 2 4; do for quota in 2000 4000 8000 32000; do
  run "mlfq-L$levels-Q$quota" --policies astraea --qps 3,3.5,4 --seeds 0 \
      --set mlfq.num_levels=$levels --set mlfq.quota_base=$quota
done; done
# Pressure thresholds of the adaptive KV policy
for pair in 0.5:0.9 0.8:0.95 0.9:0.99 0.95:0.99; do
  run "kv-${pair/:/-}" --policies astraea --qps 1.5,2,3,3.5,4 --seeds 0-1 \
      --set kv.low_pressure=${pair%:*} --set kv.high_pressure=${pair#*:}
done
# Reclaim for blocked ready jobs (swap only, then with discards), prefill priority off
run reclaim-swap --policies astraea --qps 3,3.5,4 --seeds 0-1 --set kv.reclaim_for_ready_jobs=true
run reclaim-discard --policies astraea --qps 3,3.5,4 --seeds 0-1 --set kv.reclaim_for_ready_jobs=true \
    --set kv.reclaim_discards=true
run prefill-priority-off --policies astraea --qps 3,3.5,4 --seeds 0-1 --set mlfq.prioritize_prefill=false
# The peers' open choices, taken in their favour
for price in 0.001 0.01 0.1 1; do
  run "continuum-price-$price" --policies continuum --qps 2,3 --seeds 0-1 --set continuum.memory_price_s=$price
done
for bounds in 0.05/0.1/0.2/0.4/0.8/1.6/3.2 0.25/0.5/1/2/4/8/16 1/2/4/8/16/32/64; do
  run "plas-bounds-${bounds%%/*}" --policies autellix-plas --qps 2,2.5 --seeds 0-1 --set plas.boundaries_s=$bounds
done
for pre in true false; do
  run "plas-preemptive-$pre" --policies autellix-plas --qps 2,2.5 --seeds 0-1 --set plas.preemptive=$pre
done
