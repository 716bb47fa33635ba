#!/usr/bin/env bash
# Remakes the saved runs the report's tests are built from (tests/correctness/test_report.py):
# real perf and correctness sessions of this suite on the tiny datasets, each recorded in a
# history of its own and exported. Run from the repository root: bash tests/report_runs/make.sh
set -euo pipefail
py=.venv/bin/python
out=tests/report_runs
tmp=$(mktemp -d)
export_last() {  # the latest session (a perf run, or outcomes only) of history $1, to $2
  id=$($py -c "import sys, sqlite3; print(sqlite3.connect(sys.argv[1]).execute(
    'SELECT session FROM sessions ORDER BY started DESC LIMIT 1').fetchone()[0])" "$1")
  $py -m fixtures.history --history "$1" export "$id" > "$2"
}
q=(-q -p no:cacheprovider)
# machine a (this one): two runs of every engine, for tables and trends
for i in 1 2; do
  IAB_HISTORY=$tmp/a$i.sqlite $py -m pytest "${q[@]}" -m perf --dataset tiny --rounds 3 \
    -k "denoise or warp or pipeline or fit_tensor" || true
  export_last "$tmp/a$i.sqlite" "$out/history-a$i.json"
done
# the fake engine (tests/fake_engine.py): an engine the report does not know, a step it
# declares unimplemented, and (IAB_FAKE_WRONG=1) a wrong answer
IAB_HISTORY=$tmp/a3.sqlite IAB_FAKE_WRONG=1 $py -m pytest "${q[@]}" -p tests.fake_engine \
  --engine reference --engine fake --dataset phantom-tiny -m perf --rounds 2 \
  -k "mean_b0 or denoise" tests/perf/test_perf.py || true
export_last "$tmp/a3.sqlite" "$out/history-a3-fake.json"
# a correctness session: outcomes only
IAB_HISTORY=$tmp/a4.sqlite $py -m pytest "${q[@]}" -n 2 tests/correctness/test_steps.py \
  --dataset tiny || true
export_last "$tmp/a4.sqlite" "$out/history-a4-correctness.json"
# "machine b": a run without Java (Spark skipped, with its reason) and without TensorFlow,
# its machine facts then relabelled as another machine's: the report keeps machines apart
IAB_HISTORY=$tmp/b1.sqlite JAVA_HOME=/nonexistent $py -m pytest "${q[@]}" -m perf \
  --dataset tiny --rounds 3 --engine reference --engine dask --engine spark -k pipeline || true
export_last "$tmp/b1.sqlite" "$tmp/b1.json"
$py - "$tmp/b1.json" "$out/history-b1.json" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
data["machine"] = {"cores": 8, "cpu": "Intel Xeon (relabelled)", "memory_gb": 64,
                   "node": "machine-b", "system": data["machine"]["system"]}
data.pop("machine_id", None)
json.dump(data, open(sys.argv[2], "w"), indent=1)
PY
# a sweep (two points) and a version comparison, from `make sweep` / `make versions` stores
$py -m fixtures.sweep subjects 1 2 --dataset phantom-tiny --engine reference --engine dask \
  --store "$tmp/sweeps" -- -k pipeline --rounds 2
i=0
for id in $($py -m fixtures.history --history "$tmp/sweeps/subjects.sqlite" list | cut -d' ' -f1); do
  i=$((i + 1)); $py -m fixtures.history --history "$tmp/sweeps/subjects.sqlite" export "$id" \
    > "$out/sweep-subjects-$i.json"
done
if [ -f .benchmarks/versions/dipy.sqlite ]; then
  i=0
  for id in $($py -m fixtures.history --history .benchmarks/versions/dipy.sqlite list | cut -d' ' -f1); do
    i=$((i + 1)); $py -m fixtures.history --history .benchmarks/versions/dipy.sqlite export "$id" \
      > "$out/versions-dipy-$i.json"
  done
fi
rm -rf "$tmp"
