#!/usr/bin/env bash
# Issue 13's acceptance figures: site adaptation (`training.adapt`) scored by the evaluation
# harness (`app.evaluate`) on the labelled synthetic scene, against the model it started from.
#
#   bash scripts/evaluate_adaptation.sh DIR [--seeds "0 1 2"] [--budget MINUTES] [--no-scratch]
#
# DIR is a folder of scripts/evaluate_linking.sh (it provides DIR/runs/tiny/best.pt, a ViT-Tiny
# trained on synthetic re-id data, and the labelled scene DIR/scene); run that first (or set
# SOURCE=checkpoint SCENE=folder). Steps (each skipped when its output exists, so reruns resume):
#   1. keyreid-watch on the scene with the source checkpoint -> DIR/adapt/source.{db,json}; the
#      source with the site's camera statistics only (training.adapt --rounds 0) -> statistics.*
#   2. per seed: training.adapt --db source.db --from SOURCE --seed S -> DIR/adapt/seed-S/adapted.pt,
#      then keyreid-watch on the scene with it -> DIR/adapt/adapted-S.{db,json}
#   3. unless --no-scratch: the same from scratch: keyreid-watch with the untrained default
#      encoder -> untrained.{db,json}; training.adapt from it without --from (seed 0) ->
#      scratch/adapted.pt -> scratch.{db,json}
#   4. the table: IDF1, HOTA, cross-camera mAP / R1 and link precision / recall, mean ± std over
#      the seeds, with the selection signal and the separation (AUC) before and after.
# The adaptation is transductive, as on a real site: it learns from the scene's own tracklets and
# is scored on the same scene (identities are never seen by it). Not part of the test suite.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[[ $# -ge 1 ]] || { sed -n 2,21p "${BASH_SOURCE[0]}"; exit 2; }
DIR=$(realpath -m "$1"); shift
SEEDS="0 1 2"; BUDGET=5; SCRATCH=1
while [[ $# -gt 0 ]]; do
  case $1 in
    --seeds) SEEDS=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --no-scratch) SCRATCH=0; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-$REPO/.venv/bin/python}
SOURCE=${SOURCE:-$DIR/runs/tiny/best.pt}
SCENE=${SCENE:-$DIR/scene}
[[ -f $SOURCE ]] || { echo "no source checkpoint $SOURCE: run scripts/evaluate_linking.sh $DIR first" >&2; exit 1; }
[[ -f $SCENE/scene.json ]] || { echo "no labelled scene in $SCENE" >&2; exit 1; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} YOLO_OFFLINE=1 YOLO_AUTOINSTALL=0 HF_HUB_OFFLINE=1
OUT=$DIR/adapt
mkdir -p "$OUT/logs"
stamp() { echo "[$(date +%T)] $*"; }
timed() {  # timed NAME CMD...: run, log to $OUT/logs/NAME.log, record wall seconds
  local name=$1; shift; local t0=$SECONDS
  stamp "$name: $*"
  "$@" >"$OUT/logs/$name.log" 2>&1 || { echo "$name failed, see $OUT/logs/$name.log" >&2; tail -n 20 "$OUT/logs/$name.log" >&2; exit 1; }
  echo "$name $((SECONDS - t0))" >>"$OUT/logs/wall_seconds.txt"
  stamp "$name: done in $((SECONDS - t0)) s"
}
cams_with() {  # cams_with CHECKPOINT|untrained: the scene's cams.yaml with that encoder, beside it
  local target=$SCENE/cams-adapt-$(basename "$(dirname "$1")")-$(basename "$1" .pt).yaml  # relative sources
  { cat "$SCENE/cams.yaml"
    [[ $1 == untrained ]] || echo "reid: {checkpoint: $1}"; } >"$target"
  echo "$target"
}
watch_and_score() {  # watch_and_score NAME CAMS_YAML: OUT/NAME.db and OUT/NAME.json
  local name=$1 cams=$2
  if [[ ! -f $OUT/$name.json ]]; then
    rm -f "$OUT/$name.db" "$OUT/$name.db-wal" "$OUT/$name.db-shm"
    (cd "$REPO" && timed "watch-$name" "$PY" -m app.watcher.watch --cameras "$cams" \
        --db "sqlite:///$OUT/$name.db" --start-over)
    (cd "$REPO" && timed "evaluate-$name" "$PY" -m app.evaluate --db "sqlite:///$OUT/$name.db" \
        --truth "$SCENE" --json "$OUT/$name.json")
  fi
}

watch_and_score source "$(cams_with "$SOURCE")"
# the source's weights with this site's camera statistics only (no training): attribution
if [[ ! -f $OUT/statistics/adapted.pt ]]; then
  (cd "$REPO" && timed adapt-statistics "$PY" -m training.adapt --db "sqlite:///$OUT/source.db" \
      --from "$SOURCE" --out "$OUT/statistics" --rounds 0 --no-progress)
fi
watch_and_score statistics "$(cams_with "$OUT/statistics/adapted.pt")"
for seed in $SEEDS; do
  if [[ ! -f $OUT/seed-$seed/adapted.pt ]]; then
    (cd "$REPO" && timed "adapt-$seed" "$PY" -m training.adapt --db "sqlite:///$OUT/source.db" \
        --from "$SOURCE" --out "$OUT/seed-$seed" --seed "$seed" --budget "$BUDGET" --no-progress)
  fi
  watch_and_score "adapted-$seed" "$(cams_with "$OUT/seed-$seed/adapted.pt")"
done
if (( SCRATCH )); then
  watch_and_score untrained "$(cams_with untrained)"
  if [[ ! -f $OUT/scratch/adapted.pt ]]; then
    (cd "$REPO" && timed adapt-scratch "$PY" -m training.adapt --db "sqlite:///$OUT/untrained.db" \
        --out "$OUT/scratch" --seed 0 --budget "$BUDGET" --no-progress)
  fi
  watch_and_score scratch "$(cams_with "$OUT/scratch/adapted.pt")"
fi

"$PY" - "$OUT" "$SEEDS" <<'EOF'
import json, sys
from pathlib import Path

import numpy as np

out, seeds = Path(sys.argv[1]), sys.argv[2].split()


def load(name):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def figures(report):
    cross = report["cross_camera_links"]
    return {"IDF1": report["tracking"]["idf1"], "HOTA": report["tracking"]["hota"],
            "cross-camera mAP": report["retrieval_map"], "cross-camera R1": report["rank1"],
            "cross-camera link precision": cross["precision"], "cross-camera link recall": cross["recall"],
            "identities": report["identities"]}


def cell(values, key):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    scale = 1 if key == "identities" else 100
    if len(values) == 1:
        return f"{scale * values[0]:.1f}" if scale == 100 else f"{values[0]:.0f}"
    return f"{scale * np.mean(values):.1f} ± {scale * np.std(values, ddof=1):.1f}"


rows = []
source, untrained = load("source"), load("untrained")
adapted = [load(f"adapted-{s}") for s in seeds]
adapted = [a for a in adapted if a is not None]
columns = [("source (synthetic-trained)", [source] if source else [])]
if load("statistics"):
    columns.append(("its weights + the site's camera statistics (--rounds 0)", [load("statistics")]))
columns.append((f"adapted from it ({len(adapted)} seeds)", adapted))
if untrained:
    columns.append(("untrained", [untrained]))
if load("scratch"):
    columns.append(("adapted from scratch", [load("scratch")]))
keys = list(figures(source or adapted[0]))
print("\n| | " + " | ".join(name for name, _ in columns) + " |")
print("|---|" + "---:|" * len(columns))
for key in keys:
    print(f"| {key} | " + " | ".join(cell([figures(r)[key] for r in reports], key) for _, reports in columns) + " |")
print()
for name in [f"seed-{s}" for s in seeds] + ["scratch"]:
    path = out / name / "results.json"
    if path.exists():
        r = json.loads(path.read_text())
        print(f"{name}: selected {r['selected']}; held-out cross-camera matches "
              f"{100 * r['before']['score']:.1f}% -> {100 * r['after']['score']:.1f}%; within-camera AUC "
              f"{r['before']['within_camera_auc']:.3f} -> {r['after']['within_camera_auc']:.3f}; rounds "
              + ", ".join(f"{x['round']}: {x['mining']['identities']} ids / {x['mining']['associated_tracklets']} "
                          f"tracklets" for x in r["per_round"]))
EOF
