#!/usr/bin/env bash
# The MONAI Model Zoo's own ci/verify_bundle.py on this bundle, laid out as the zoo lays bundles out (issue 37).
#
#   bash benchmarks/model_zoo_verify.sh /path/to/model-zoo    # a clone of github.com/Project-MONAI/model-zoo
#
# Copies configs/, scripts/, docs/, LICENSE and README.md to <zoo>/models/cct_r_segmentation/, trains a model on a
# small phantom for 4 iterations (patch 32), publishes it as the zoo brings weights (large_files.yml with file://
# addresses, `python -m scripts.publishing.large_files`), puts the metadata schema offline (eval/schema.json, the
# copy in tests/data), adds the bundle to the zoo's exclude_verify_torchscript_list (SwinUNETR-2D cannot be
# scripted; a contributor does this in the same pull request), then runs verify_bundle.py in min and full modes.
# Results: benchmarks/results/model_zoo_verify.md.
set -uo pipefail
ZOO=$(cd "${1:?give the path of a model-zoo clone}" && pwd)
cd "$(dirname "$0")/.."
REPO=$(pwd); B=$ZOO/models/cct_r_segmentation; W=$(mktemp -d); T=$(mktemp -d)
rm -rf "$B"; mkdir -p "$B"
for d in configs scripts docs; do cp -r "$d" "$B/"; done
cp LICENSE README.md "$B/"
find "$B" -name __pycache__ -prune -exec rm -rf {} +
python -c "from scripts.data.phantom import ensure_phantom_dataset as e; e('$T/ph', n_labeled=2, n_unlabeled=2, n_validation=1, n_test=1, seed=3)"
python -m monai.bundle run training --config_file configs/train.yaml --bundle_root "$T" --datalist_file "$T/ph/datalist.json" \
  --num_iterations 4 --val_interval 2 --patch_size "[32,32]" --batch_size 4 --num_workers 0 --cache_num_workers 0 \
  --swin_feature_size 12 --registration_workers 1 --progress false > "$T/train.log" 2>&1 || { tail -5 "$T/train.log"; exit 1; }
cp "$T/models/model.pt" "$T/models/model_config.json" "$W/"
python -m scripts.publishing.large_files --url "file://$W" --models_dir "$W" --out "$B/large_files.yml"
mkdir -p "$B/eval" && cp tests/data/meta_schema_offline.json "$B/eval/schema.json"
cd "$ZOO/ci"
grep -q '"cct_r_segmentation"' bundle_custom_data.py || \
  sed -i 's/exclude_verify_torchscript_list = \[/exclude_verify_torchscript_list = [\n    "cct_r_segmentation",/' bundle_custom_data.py
for mode in min full; do
  echo "== python ci/verify_bundle.py -b cct_r_segmentation -p models -m $mode"
  PYTHONPATH="$REPO" python verify_bundle.py -b cct_r_segmentation -p ../models -m "$mode" 2>&1 \
    | grep -E "^(start|directory|version|metadata|properties|data shape|bundle|export)|Error" ; echo "exit status ${PIPESTATUS[0]}"
done
