#!/usr/bin/env bash
# The TorchServe container's entrypoint: start TorchServe with token authorization on and the model API off,
# and stop it without losing a request.
# - Refuses to start if the config (or this script) would switch either protection off.
# - Clears what a previous run in the same run directory (an emptyDir survives container restarts) left
#   behind: the drain marker (readiness would stay false forever) and audit-unavailable-* reports.
# - On SIGTERM (docker stop, a pod deleted without preStop, tini forwarding it) it drains first, as
#   `make stop` does: no queued request and a barrier request per model answered (probe.py drain, at most
#   TS_STOP_GRACE_S seconds), then stops TorchServe and waits for it.
set -euo pipefail

APP_DIR="${APP_DIR:-/opt/torchserve-cam}"
TS_CONFIG="${TS_CONFIG:-${APP_DIR}/config.properties}"
MODEL_STORE="${MODEL_STORE:-${APP_DIR}/model-store}"
# Writable working directory: TorchServe writes key_file.json (mode 0600) and its logs here.
TS_RUN_DIR="${TS_RUN_DIR:-/home/model-server/run}"
export TS_KEY_FILE="${TS_KEY_FILE:-${TS_RUN_DIR}/key_file.json}"

mkdir -p "${TS_RUN_DIR}/logs"
python "${APP_DIR}/deploy/config_check.py" "${TS_CONFIG}" "${BASH_SOURCE[0]}"

if ! compgen -G "${MODEL_STORE}/*.mar" > /dev/null; then
    echo "no .mar archive in ${MODEL_STORE}: build one (python -m model_store.build) or mount a model store" >&2
    exit 1
fi

rm -f "$(dirname "${TS_KEY_FILE}")/draining" "${CAM_STATUS_DIR:-${TS_RUN_DIR}}"/audit-unavailable-*

cd "${TS_RUN_DIR}"
export LOG_LOCATION="${TS_RUN_DIR}/logs" METRICS_LOCATION="${TS_RUN_DIR}/logs"

stop_torchserve() {
    trap '' TERM INT
    echo "start.sh: draining before stopping TorchServe" >&2
    TS_DRAIN_DELAY_S="${TS_STOP_DRAIN_DELAY_S:-0}" TS_DRAIN_GRACE_S="${TS_STOP_GRACE_S:-40}" \
        python "${APP_DIR}/deploy/probe.py" drain || echo "start.sh: drain incomplete, stopping anyway" >&2
    torchserve --stop --foreground || kill -TERM "${ts_pid}" 2>/dev/null || true
    wait "${ts_pid}" || true
    exit 0
}
trap stop_torchserve TERM INT

torchserve --start --foreground --ncs \
    --ts-config "${TS_CONFIG}" \
    --model-store "${MODEL_STORE}" \
    --models all &
ts_pid=$!
set +e
# `wait` returns early when a trapped signal arrives; the trap then drains, stops TorchServe and exits.
wait "${ts_pid}"
exit $?
