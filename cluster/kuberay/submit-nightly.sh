#!/usr/bin/env bash
# The nightly submitter (nightly-cronjob.yaml runs it in the distinf image): submits
#   distinf run $JOB_FILE --append-to $RUN_DIR
# to the RayCluster's Jobs API once per night, waits for it, and exits with the job's own exit code,
# so that the Kubernetes Job around it retries what a retry can fix and nothing else:
#   0  the run (or append) is complete
#   1  runtime failure (distinf's JobError, a lost node or driver, an unreachable head): retried;
#      the retry submits the same command, and --append-to finishes the failed append
#   2  configuration, data or model error (distinf exit 2): not retried (podFailurePolicy FailJob)
#   3  the Ray job was stopped by an operator (ray job stop): not retried
#
# Idempotent, as KubeRay's own submitter (`ray job status ID || ray job submit --submission-id ID`):
# every Ray job of a night has the submission id $SUBMISSION_PREFIX-$NIGHT-N (N = 1, 2, ... one per
# attempt). A (re)started submitter walks them in order: a job that succeeded ends the night, one
# that is pending or running is followed (never submitted twice), one that failed with exit 2 fails
# the night, one that failed otherwise is a spent attempt; the first id not yet used is submitted.
#
# `ray job submit` itself only says SUCCEEDED or FAILED (exit 0 or 1). The entrypoint,
# distinf-entrypoint.sh, therefore prints "distinf-exit-code=N" as its last line, and the exit code
# is read back from `ray job logs`.
# A job that failed without that line (driver killed, node lost) counts as a runtime failure (1).
#
# Environment: RAY_ADDRESS (http://HEAD-SVC:8265), RAY_AUTH_MODE/RAY_AUTH_TOKEN when the cluster
# uses token auth, RUN_DIR (the run directory, s3://...), JOB_FILE (default /app/jobs/nightly.yaml),
# DISTINF_ARGS (more arguments for distinf run, e.g. --set runtime.num_workers=16), NIGHT (default
# today's UTC date), SUBMISSION_PREFIX, MAX_ATTEMPTS (5), POLL_SECONDS (30), PENDING_DEADLINE (900 s
# a job may stay PENDING before it is stopped and counted as a runtime failure).
set -uo pipefail

: "${RAY_ADDRESS:?set RAY_ADDRESS to the Jobs API, e.g. http://distinf-head-svc:8265}"
: "${RUN_DIR:?set RUN_DIR to the nightly run directory, e.g. s3://bucket/distinf/nightly}"
JOB_FILE=${JOB_FILE:-/app/jobs/nightly.yaml}
DISTINF_ARGS=${DISTINF_ARGS:-}
NIGHT=${NIGHT:-$(date -u +%Y-%m-%d)}
SUBMISSION_PREFIX=${SUBMISSION_PREFIX:-distinf-nightly}
MAX_ATTEMPTS=${MAX_ATTEMPTS:-5}
POLL_SECONDS=${POLL_SECONDS:-30}
PENDING_DEADLINE=${PENDING_DEADLINE:-900}
RAY=${RAY:-ray}
ENTRYPOINT=${ENTRYPOINT:-/app/cluster/kuberay/distinf-entrypoint.sh}
MARKER=distinf-exit-code

log() { echo "submit-nightly: $*" >&2; }

# The Ray job's state as `ray job status` (Ray 2.60) words it; ABSENT if it does not answer for the id.
job_state() {
  local out
  out=$("$RAY" job status "$1" 2>&1) || { echo ABSENT; return; }
  case "$out" in
    *"Job '$1' succeeded"*) echo SUCCEEDED ;;
    *"Job '$1' failed"*) echo FAILED ;;
    *"Job '$1' was stopped"*) echo STOPPED ;;
    *"Status for job '$1': "*) sed -n "s/.*Status for job '$1': \([A-Z_]*\).*/\1/p" <<<"$out" | tail -n 1 ;;
    *) echo UNKNOWN ;;
  esac
}

# distinf's exit code, from the marker line the entrypoint prints last.
job_exit_code() {
  local code
  code=$("$RAY" job logs "$1" 2>/dev/null | sed -n "s/^$MARKER=\([0-9][0-9]*\)[[:space:]]*$/\1/p" | tail -n 1)
  echo "${code:-unknown}"
}

# The submitter's exit code for a finished Ray job.
outcome() {
  local state=$1 id=$2 code
  case "$state" in
    SUCCEEDED) log "$id succeeded"; return 0 ;;
    STOPPED) log "$id was stopped by an operator; not retried"; return 3 ;;
  esac
  code=$(job_exit_code "$id")
  if [[ $code == 2 ]]; then
    log "$id failed with exit code 2 (configuration, data or model error): not retried"
    return 2
  fi
  log "$id failed (exit code $code): a runtime failure, retried with the same command"
  return 1
}

# Follow a submitted job to its end (logs stream to this pod's output) and return outcome().
follow() {
  local id=$1 started state follower
  started=$(date +%s)
  "$RAY" job logs --follow "$id" & follower=$!
  while :; do
    state=$(job_state "$id")
    case "$state" in
      SUCCEEDED | FAILED | STOPPED) break ;;
      PENDING)
        if (($(date +%s) - started > PENDING_DEADLINE)); then
          log "$id still PENDING after ${PENDING_DEADLINE}s; stopping it (a runtime failure, retried)"
          "$RAY" job stop --no-wait "$id" >/dev/null 2>&1
          kill "$follower" 2>/dev/null; wait "$follower" 2>/dev/null
          return 1
        fi ;;
      ABSENT) log "$id is gone (head restarted?)"; kill "$follower" 2>/dev/null; wait "$follower" 2>/dev/null; return 1 ;;
    esac
    sleep "$POLL_SECONDS"
  done
  wait "$follower" 2>/dev/null
  outcome "$state" "$id"
}

# distinf-entrypoint.sh prints distinf's exit code last; retries are this Job's (backoffLimit).
# One word per argument: `ray job submit` quotes each (shlex.join) into the command Ray runs.
read -r -a extra <<<"$DISTINF_ARGS"
entrypoint=("$ENTRYPOINT" run "$JOB_FILE" --append-to "$RUN_DIR" --set "output.path=$RUN_DIR" "${extra[@]}")
command="${entrypoint[*]:1}"

for ((attempt = 1; attempt <= MAX_ATTEMPTS; attempt++)); do
  id="$SUBMISSION_PREFIX-$NIGHT-$attempt"
  state=$(job_state "$id")
  case "$state" in
    ABSENT)
      log "submitting $id: $command"
      "$RAY" job submit --submission-id "$id" --no-wait -- "${entrypoint[@]}" || {
        log "could not submit $id (head unreachable, or the id was taken meanwhile): retried"; exit 1; }
      follow "$id"; exit $? ;;
    SUCCEEDED) log "$id already succeeded"; exit 0 ;;
    STOPPED) outcome STOPPED "$id"; exit $? ;;
    FAILED)
      if [[ $(job_exit_code "$id") == 2 ]]; then outcome FAILED "$id"; exit 2; fi
      log "$id failed earlier (a runtime failure); the next attempt continues it" ;;
    *) log "$id is $state: following it, not submitting again"; follow "$id"; exit $? ;;
  esac
done
log "all $MAX_ATTEMPTS attempts of $NIGHT are spent; run the command by hand after looking at the logs"
exit 1
