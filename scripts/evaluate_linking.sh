#!/usr/bin/env bash
# Issue 9's acceptance figures: the watcher's identities scored before vs after the calibrated
# linker, on the labelled synthetic scene, with a tiny encoder trained on synthetic data (CPU).
#
#   bash scripts/evaluate_linking.sh DIR [--untrained] [--demo]
#
# Steps (each skipped when its output already exists in DIR, so a rerun resumes):
#   1. train keyreid_vit_tiny on synthetic re-id data (identities from seed $TRAIN_SEED, not the
#      scene's) -> DIR/runs/tiny/best.pt; its validation mAP is printed at the end
#   2. the labelled scene (training.scene, seed $SCENE_SEED) -> DIR/scene, and
#      DIR/scene/cams-trained.yaml = the scene's cams.yaml + `reid: {checkpoint: best.pt}`
#   3. keyreid-watch on that scene into DIR/{after,before}-trained.db: "after" is this checkout,
#      "before" a git worktree of $BEFORE_REV (the last commit with the fixed-threshold linker
#      app/linking.py) at DIR/before, removed at exit; both scored with `app.evaluate`
#   --untrained: step 3 also with the untrained default encoder (the scene's own cams.yaml)
#   --demo: the README's demo (examples/cams.yaml, untrained) into DIR/demo-{after,before}.db
#
# Threads: every process is held to one thread per stage (shared machines). Run time measured
# 2026-12-01 on the project's 2 CPU cores shared with 3 other engineers (load 4-12): training
# 18 min (25 epochs), scene 8 min (44 people, 180 s; 14.5 min for 240 s), each watcher run on
# the scene 8-12 min (two at once), each evaluation ~10 s, the demo 2-6 min per tree: about
# 60 min for steps 1-3, ~85 min with --untrained --demo. Steps run one after another here.
# Why 44 people in 180 s: the calibrated linker links nothing before it has 50 impostor labels
# (same-camera tracklets that overlap in time); 36 people in 240 s gave only 48.
# Not part of the test suite (scripts/test.sh does not run it).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[[ $# -ge 1 ]] || { sed -n 2,25p "${BASH_SOURCE[0]}"; exit 2; }
DIR=$(realpath -m "$1"); shift
UNTRAINED=0; DEMO=0
for arg in "$@"; do
  case $arg in --untrained) UNTRAINED=1 ;; --demo) DEMO=1 ;;
    *) echo "unknown option $arg" >&2; exit 2 ;; esac
done

PY=${PYTHON:-$REPO/.venv/bin/python}
BEFORE_REV=${BEFORE_REV:-303ddfe~1}
TRAIN_SEED=${TRAIN_SEED:-11}; TRAIN_IDS=${TRAIN_IDS:-128}; EPOCHS=${EPOCHS:-25}
SCENE_PEOPLE=${SCENE_PEOPLE:-44}; SCENE_SECONDS=${SCENE_SECONDS:-180}
SCENE_CAMERAS=${SCENE_CAMERAS:-3}; SCENE_SEED=${SCENE_SEED:-1}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=0 HF_HUB_OFFLINE=1
mkdir -p "$DIR/logs"
LOGS=$DIR/logs
stamp() { echo "[$(date +%T)] $*"; }
timed() {  # timed NAME CMD...: run, log to $LOGS/NAME.log, record wall seconds
  local name=$1; shift; local t0=$SECONDS
  stamp "$name: $*"
  "$@" >"$LOGS/$name.log" 2>&1 || { echo "$name failed, see $LOGS/$name.log" >&2; tail -n 20 "$LOGS/$name.log" >&2; exit 1; }
  echo "$name $((SECONDS - t0))" >>"$LOGS/wall_seconds.txt"
  stamp "$name: done in $((SECONDS - t0)) s"
}

# 1. the tiny encoder
CKPT=$DIR/runs/tiny/best.pt
if [[ ! -f $CKPT ]]; then
  (cd "$REPO" && timed train "$PY" -m training.train --dataset synthetic \
      --root "$DIR/data/synthetic-s$TRAIN_SEED" --dataset-opt seed=$TRAIN_SEED num_ids=$TRAIN_IDS \
      --model keyreid_vit_tiny --model-opt depth=4 'img_size=[128,64]' --optimizer adamw \
      --lr 3e-4 --epochs $EPOCHS --warmup 1 --workers 1 --no-progress --out "$DIR/runs/tiny")
fi

# 2. the labelled scene
SCENE=$DIR/scene
if [[ ! -f $SCENE/scene.json ]]; then
  (cd "$REPO" && timed scene "$PY" -m training.scene --out "$SCENE" --people $SCENE_PEOPLE \
      --seconds $SCENE_SECONDS --cameras $SCENE_CAMERAS --seed $SCENE_SEED)
fi
{ cat "$SCENE/cams.yaml"; echo "reid: {checkpoint: $CKPT}"; } >"$SCENE/cams-trained.yaml"

# 3. before and after, same scene, same checkpoint, fresh databases
if [[ ! -d $DIR/before ]]; then
  git -C "$REPO" worktree add --detach "$DIR/before" "$BEFORE_REV" >/dev/null
  trap 'git -C "$REPO" worktree remove --force "$DIR/before" 2>/dev/null || true' EXIT
fi

watcher_module() {  # the watcher's module in a tree (app/watch.py before app/ was split)
  if [[ -f $1/app/watch.py ]]; then echo app.watch; else echo app.watcher.watch; fi
}

watch_and_score() {  # watch_and_score TREE NAME CAMS_YAML: DIR/NAME.db and DIR/NAME.json
  local tree=$1 name=$2 cams=$3 tree_dir=$REPO
  [[ $tree == before ]] && tree_dir=$DIR/before
  if [[ ! -f $DIR/$name.json ]]; then
    rm -f "$DIR/$name.db" "$DIR/$name.db-wal" "$DIR/$name.db-shm"
    (cd "$tree_dir" && export PYTHONPATH=$tree_dir && timed "watch-$name" "$PY" -m "$(watcher_module "$tree_dir")" \
        --cameras "$cams" --db "sqlite:///$DIR/$name.db")
    (cd "$tree_dir" && export PYTHONPATH=$tree_dir && timed "evaluate-$name" "$PY" -m app.evaluate \
        --db "sqlite:///$DIR/$name.db" --truth "$SCENE" --json "$DIR/$name.json")
  fi
}
watch_and_score after after-trained "$SCENE/cams-trained.yaml"
watch_and_score before before-trained "$SCENE/cams-trained.yaml"
if (( UNTRAINED )); then
  watch_and_score after after-untrained "$SCENE/cams.yaml"
  watch_and_score before before-untrained "$SCENE/cams.yaml"
fi

# 4. the README's demo (untrained encoder; no truth: links and separation only)
if (( DEMO )); then
  for tree in after before; do
    tree_dir=$REPO; [[ $tree == before ]] && tree_dir=$DIR/before
    if [[ ! -f $DIR/demo-$tree.db ]]; then
      (cd "$tree_dir" && export PYTHONPATH=$tree_dir && timed "demo-$tree" "$PY" -m "$(watcher_module "$tree_dir")" \
          --cameras "$tree_dir/examples/cams.yaml" --db "sqlite:///$DIR/demo-$tree.db")
    fi
  done
fi

# the tables
"$PY" - "$DIR" <<'EOF'
import json, sqlite3, sys
from pathlib import Path

d = Path(sys.argv[1])
res = json.loads((d / "runs/tiny/results.json").read_text()) if (d / "runs/tiny/results.json").exists() else {}
print("\nencoder:", d / "runs/tiny/best.pt", "| validation:", res.get("best_val") or res.get("val"),
      "| test:", res.get("test"))


def pct(v):
    return "n/a" if v is None else f"{100 * v:.1f}"


def summary_lines(name):
    log = d / "logs" / f"watch-{name}.log"
    if not log.exists():
        return []
    return [l.strip() for l in log.read_text().splitlines()
            if l.startswith("run ") or l.strip().startswith("linker:")]


for model in ("trained", "untrained"):
    runs = [(t, json.loads((d / f"{t}-{model}.json").read_text()))
            for t in ("before", "after") if (d / f"{t}-{model}.json").exists()]
    if not runs:
        continue
    rows = [("IDF1", lambda r: pct(r["tracking"]["idf1"])),
            ("HOTA", lambda r: pct(r["tracking"]["hota"])),
            ("cross-camera retrieval mAP", lambda r: pct(r["retrieval_map"])),
            ("cross-camera retrieval R1", lambda r: pct(r["rank1"])),
            ("cross-camera link precision", lambda r: pct(r["cross_camera_links"]["precision"])),
            ("cross-camera link recall", lambda r: pct(r["cross_camera_links"]["recall"])),
            ("cross-camera pairs linked (correct / true)", lambda r: "{predicted_pairs} ({correct_pairs} / {truth_pairs})".format(**r["cross_camera_links"])),
            ("within-camera link precision", lambda r: pct(r["within_camera_links"]["precision"])),
            ("within-camera link recall", lambda r: pct(r["within_camera_links"]["recall"])),
            ("within-camera pairs linked (correct / true)", lambda r: "{predicted_pairs} ({correct_pairs} / {truth_pairs})".format(**r["within_camera_links"])),
            ("tracklets (matched to a person)", lambda r: f"{r['tracklets']} ({r['matched_tracklets']})"),
            ("identities (truth people)", lambda r: f"{r['identities']} ({r['truth_people']})")]
    print(f"\n### {model} encoder\n")
    print("| | " + " | ".join(t for t, _ in runs) + " |")
    print("|---|" + "---:|" * len(runs))
    for label, get in rows:
        print(f"| {label} | " + " | ".join(get(r) for _, r in runs) + " |")
    for t, _ in runs:
        for line in summary_lines(f"{t}-{model}"):
            print(f"  {t}: {line}")

for t in ("after", "before"):
    db = d / f"demo-{t}.db"
    if not db.exists():
        continue
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    tracklets = con.execute("SELECT count(*) FROM tracklets").fetchone()[0]
    rows = con.execute("SELECT identity_id, camera_id FROM tracklets WHERE identity_id IS NOT NULL").fetchall()
    by_id = {}
    for ident, cam in rows:
        by_id.setdefault(ident, []).append(cam)
    cross = sum(1 for cams in by_id.values() for i in range(len(cams)) for j in range(i) if cams[i] != cams[j])
    within = sum(1 for cams in by_id.values() for i in range(len(cams)) for j in range(i) if cams[i] == cams[j])
    joined = sum(len(c) for c in by_id.values() if len(c) > 1)
    cols = [r[1] for r in con.execute("PRAGMA table_info(runs)")]
    calib = con.execute("SELECT calibration FROM runs ORDER BY id DESC LIMIT 1").fetchone()[0] if "calibration" in cols else None
    print(f"\ndemo ({t}): {tracklets} tracklets, {len(by_id)} identities, {joined} tracklets in "
          f"multi-tracklet identities, linked pairs: {cross} cross-camera, {within} within-camera")
    for line in summary_lines(f"demo-{t}"):
        print(f"  {line}")
    if calib:
        c = {k: v for k, v in json.loads(calib).items() if not k.endswith("_samples")}
        print("  runs.calibration:", json.dumps(c))
EOF
# how the linker's free labels (same-tracklet halves, same-camera overlaps) compare with the
# true cross-camera pairs it has to decide (descriptors are the linker's, not its decisions)
cat >"$DIR/truepairs.py" <<'PYEOF'
"""True cross-camera pair distances (truth-matched tracklets) vs the linker's free labels."""
import json, sys
import numpy as np
from app.evaluate import _load_tracklets, _match_people, read_truth
from storage import open_repository
from storage.similarity import distances

db, truth_dir = sys.argv[1], sys.argv[2]
truth = read_truth(truth_dir)
with open_repository(db, readonly=True) as repo:
    ts = _load_tracklets(repo, None, None)
    cal = [r.calibration for r in repo.list_runs()][-1] if hasattr(repo.list_runs()[0], "calibration") else None
_match_people(ts, truth, 0.5)
ts = [t for t in ts if t.person is not None and t.descriptor is not None]
v = np.stack([t.descriptor for t in ts]); d = distances(v, v)
same, diff = [], []
for i in range(len(ts)):
    for j in range(i):
        if ts[i].camera != ts[j].camera:
            (same if ts[i].person == ts[j].person else diff).append(d[i, j])
same, diff = np.array(same), np.array(diff)
auc = float(((same[:, None] < diff[None]).sum() + 0.5 * (same[:, None] == diff[None]).sum()) / (len(same) * len(diff)))
print(f"true cross-camera pairs: same {len(same)} median {np.median(same):.3f} | different {len(diff)} median {np.median(diff):.3f} "
      f"p1 {np.percentile(diff, 1):.3f} | AUC {auc:.3f}")
for q in (0.1, 1.0):
    thr = np.percentile(diff, q)
    print(f"  below the {q}th percentile of different-person distances ({thr:.3f}): "
          f"{(same < thr).sum()} of {len(same)} same-person pairs")
if cal:
    c = json.loads(cal) if isinstance(cal, str) else cal
    g, im = np.array(c["genuine_samples"]), np.array(c["impostor_samples"])
    print(f"free labels: genuine {len(g)} median {np.median(g):.3f} | impostor {len(im)} median {np.median(im):.3f} p5 {np.percentile(im, 5):.3f}")
PYEOF
for model in trained untrained; do
  [[ -f $DIR/after-$model.db ]] || continue
  echo; echo "$model encoder, $DIR/after-$model.db:"
  (cd "$REPO" && PYTHONPATH=$REPO "$PY" "$DIR/truepairs.py" "sqlite:///$DIR/after-$model.db" "$SCENE")
done
echo; cat "$LOGS/wall_seconds.txt" 2>/dev/null | sed 's/^/wall s: /'
