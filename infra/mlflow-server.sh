#!/usr/bin/env bash
# Starts an MLflow tracking server for hyla runs, in the foreground.
#
#   bash infra/mlflow-server.sh                       # http://127.0.0.1:5000, state in ./runs/mlflow-server
#   MLFLOW_PORT=5001 MLFLOW_BACKEND_STORE_URI=postgresql://... \
#     MLFLOW_ARTIFACTS_DESTINATION=s3://bucket/mlflow bash infra/mlflow-server.sh
#
# Settings, all from the environment:
#   MLFLOW_HOST                   interface to bind; 127.0.0.1 unless set. The server has no
#                                 authentication: binding another interface is an opt-in, and
#                                 then set MLFLOW_SERVER_ALLOWED_HOSTS to the names clients use.
#   MLFLOW_PORT                   port (5000)
#   MLFLOW_WORKERS                server worker processes (1; raise it with a database server,
#                                 several processes writing one SQLite file lock it)
#   MLFLOW_BACKEND_STORE_URI      runs and metrics (sqlite:///<state>/mlflow.db)
#   MLFLOW_ARTIFACTS_DESTINATION  where the server stores artifacts it proxies (<state>/artifacts)
#   MLFLOW_SERVER_DIR             <state> for the two defaults above (./runs/mlflow-server)
#
# Training jobs then log with MLFLOW_TRACKING_URI=http://<host>:<port> (or tracking.uri=...).
# The script execs the server, so its pid is the server's: stop it with a signal to that pid
# (its uvicorn workers are children in the same process group).
set -euo pipefail

host=${MLFLOW_HOST:-127.0.0.1}
port=${MLFLOW_PORT:-5000}
workers=${MLFLOW_WORKERS:-1}

if [[ -z ${MLFLOW_BACKEND_STORE_URI:-} || -z ${MLFLOW_ARTIFACTS_DESTINATION:-} ]]; then
  state=${MLFLOW_SERVER_DIR:-runs/mlflow-server}
  mkdir -p "$state"
  state=$(cd "$state" && pwd)
fi
backend=${MLFLOW_BACKEND_STORE_URI:-sqlite:///$state/mlflow.db}
artifacts=${MLFLOW_ARTIFACTS_DESTINATION:-$state/artifacts}

case $host in
  127.* | localhost | ::1) ;;
  *) echo "mlflow-server: binding $host: MLflow has no authentication of its own; keep it" \
       "on a private network and set MLFLOW_SERVER_ALLOWED_HOSTS" >&2 ;;
esac

# Never run jobs (scorers, judges) inside the tracking server.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false

mlflow=mlflow
if ! command -v mlflow >/dev/null 2>&1; then
  mlflow="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/mlflow"  # the repository's venv
fi

exec "$mlflow" server --host "$host" --port "$port" --workers "$workers" \
  --backend-store-uri "$backend" --artifacts-destination "$artifacts"
