#!/usr/bin/env bash
# The regimes of issue 5, each tuned with equal effort on a validation split and then compared
# with 5 paired seeds at both budgets:
#   label noise 40 % and 20 %, a 1000-image training set, and large batches.
# Usage: bash scripts/regimes.sh [REGIME ...]   (default: all four; outputs under runs/regimes/
# and reports/regimes/; resumable: finished runs are skipped).  About 25 min per regime on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
FM="python3 -m flatminima --threads 1"
RUNS=runs/regimes
REPORTS=reports/regimes
mkdir -p "$RUNS" "$REPORTS"

tune_all() {  # $1 regime preset name, $2 extra tune flags; two tunes at a time (one core each)
  # SGD's learning rate is tuned first and becomes the base learning rate of every arm that has
  # none of its own (rSGD, SAM; eSGD keeps its outer lr 1 and inner lr); then each other arm
  # gets its own 4-point grid of its coupling / radius at that learning rate.
  local r=$1 extra=$2 p=src/flatminima/presets/fashion-$1.yaml d=$RUNS/$1
  $FM tune --preset-file "$p" --optimizer sgd  --grid 'lr=0.01,0.02,0.05,0.1' $extra --out "$d/tune-sgd" --no-progress &
  $FM tune --preset-file "$p" --optimizer esgd --grid 'gamma=1e-3,1e-2,3e-2,1e-1' $extra --out "$d/tune-esgd" --no-progress
  wait
  local lr
  lr=$(python3 -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['sgd']['lr'])" "$d/tune-sgd/best.yaml")
  $FM tune --preset-file "$p" --optimizer rsgd --grid 'gamma=1e-2,1e-1,3e-1,1' --set lr=$lr $extra --out "$d/tune-rsgd" --no-progress &
  $FM tune --preset-file "$p" --optimizer sam  --grid 'rho=0.01,0.02,0.05,0.1' --set lr=$lr $extra --out "$d/tune-sam" --no-progress
  wait
  # the preset with every arm's best grid point merged in; SGD's lr becomes common.lr
  python3 - "$p" "$d" <<'PY'
import sys, yaml, pathlib
preset, d = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
cfg = yaml.safe_load(preset.read_text())
for arm in ("sgd", "esgd", "rsgd", "sam"):
    for a, kv in yaml.safe_load((d / f"tune-{arm}" / "best.yaml").read_text()).items():
        cfg.setdefault(a, {}).update(kv)
cfg["common"]["lr"] = cfg["sgd"].pop("lr")
(d / "tuned.yaml").write_text(f"# {preset} with the tuned values of {d}/tune-*\n"
                              + yaml.safe_dump(cfg, sort_keys=False))
PY
}

compare() {  # $1 regime, $2 preset file, $3 extra compare flags
  $FM compare --preset-file "$2" --seeds 5 --jobs 2 $3 --out "$REPORTS/$1" --no-progress
}

regimes=("$@")
[ ${#regimes[@]} -eq 0 ] && regimes=(label-noise40 small-train label-noise20 large-batch)
for r in "${regimes[@]}"; do
  echo "=== $r $(date +%T)"
  case $r in
    label-noise40|label-noise20)
      tune_all "$r" "--val-size 0.1"
      compare "$r" "$RUNS/$r/tuned.yaml" "--budget both" ;;
    small-train)
      tune_all "$r" "--val-size 200 --seeds 2"
      compare "$r" "$RUNS/$r/tuned.yaml" "--budget both" ;;
    large-batch)
      compare "$r" "src/flatminima/presets/fashion-large-batch.yaml" "--budget grad-evals" ;;
    *) echo "unknown regime '$r' (label-noise40, label-noise20, small-train, large-batch)" >&2; exit 2 ;;
  esac
done
echo "=== done $(date +%T)"
