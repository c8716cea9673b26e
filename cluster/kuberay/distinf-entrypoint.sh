#!/usr/bin/env bash
# The Ray job's entrypoint on a cluster (in the image at /app/cluster/kuberay/):
#   distinf-entrypoint.sh [--retries N] [--pause SECONDS] DISTINF-ARGS...
# runs `distinf DISTINF-ARGS`, runs it again after exit code 1 (a runtime failure: the same
# command continues, e.g. --append-to finishes a failed append) at most N times (default 0), waiting
# SECONDS (default 150: past runtime.lease_seconds, 120 s, after which a killed driver's lease
# expires), never after exit code 2 (configuration, data or model: no retry can fix it), and
# prints "distinf-exit-code=RC" as its last line before it exits with RC. A Ray job's status is only
# SUCCEEDED or FAILED; that line keeps distinf's code readable in `ray job logs`
# for people (the nightly submitter reads the Jobs API's driver_exit_code). One script, so that KubeRay's submitter, which pastes a RayJob's
# entrypoint into its own shell command, passes it on unchanged.
set -u
retries=0 pause=150
while (($#)); do
  case "$1" in
    --retries) retries=$2; shift 2 ;;
    --pause) pause=$2; shift 2 ;;
    *) break ;;
  esac
done
(($#)) || { echo "usage: $0 [--retries N] [--pause SECONDS] DISTINF-ARGS..." >&2; echo "distinf-exit-code=2"; exit 2; }

attempt=0
while :; do
  distinf "$@"
  rc=$?
  if ((rc != 1 || attempt >= retries)); then break; fi
  attempt=$((attempt + 1))
  echo "distinf-entrypoint: exit code 1 (runtime failure); retry $attempt of $retries in ${pause}s" >&2
  sleep "$pause"
done
echo "distinf-exit-code=$rc"
exit "$rc"
