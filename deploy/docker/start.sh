#!/usr/bin/env bash
# Start TorchServe in the foreground with token authorization on and the model API off.
# Refuses to start if the config (or this script) would switch either protection off.
set -euo pipefail

APP_DIR="${APP_DIR:-/opt/torchserve-cam}"
TS_CONFIG="${TS_CONFIG:-${APP_DIR}/config.properties}"
MODEL_STORE="${MODEL_STORE:-${APP_DIR}/model-store}"
# Writable working directory: TorchServe writes key_file.json (mode 0600) and its logs here.
TS_RUN_DIR="${TS_RUN_DIR:-/home/model-server/run}"

mkdir -p "${TS_RUN_DIR}/logs"
python "${APP_DIR}/deploy/config_check.py" "${TS_CONFIG}" "${BASH_SOURCE[0]}"

if ! compgen -G "${MODEL_STORE}/*.mar" > /dev/null; then
    echo "no .mar archive in ${MODEL_STORE}: build one (python -m model_store.build) or mount a model store" >&2
    exit 1
fi

cd "${TS_RUN_DIR}"
export LOG_LOCATION="${TS_RUN_DIR}/logs" METRICS_LOCATION="${TS_RUN_DIR}/logs"
exec torchserve --start --foreground --ncs \
    --ts-config "${TS_CONFIG}" \
    --model-store "${MODEL_STORE}" \
    --models all
