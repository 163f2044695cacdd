#!/usr/bin/env bash
# One TPU VM worker's part of a pod run, detached from the ssh session that
# starts it (scripts/tpu_pod.py runs this on every worker):
#
#   bash scripts/pod_job.sh start CONFIG "OVERRIDES" STAGE...  start the stages, return at once
#   bash scripts/pod_job.sh status                             one line: worker N: STATE [STAGE [CODE TIME]]
#   bash scripts/pod_job.sh logs [LINES]                       the end of this worker's log
#
# STATE is running, done, failed (a stage exited non-zero: STAGE CODE, and
# the TIME it ended, in seconds since 1970, to tell which worker failed first),
# preempted (the stage saved its work at a preemption notice and exited with
# 75, PREEMPTED_EXIT_CODE: STAGE 75 TIME), stopped (the job died without an
# exit code: killed, out of memory, the machine taken) or none. Everything
# the stages print goes to runs/pod-job/log, which a dropped ssh connection
# does not end.
set -u
cd "$(dirname "$0")/.."
JOB=runs/pod-job
PREEMPTED=75  # pipeline/parallel/preemption.py's PREEMPTED_EXIT_CODE
# Cloud TPU tells a worker its number through the metadata server.
worker=${TPU_WORKER_ID:-$(curl -s -m 5 -H Metadata-Flavor:Google \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number 2>/dev/null || echo "?")}

running() { [ -f $JOB/pid ] && [ ! -f $JOB/exit_code ] && kill -0 "$(cat $JOB/pid)" 2>/dev/null; }

case "${1:-}" in
  start)
    shift
    if running; then echo "worker $worker: a job is running already ($(cat $JOB/stage))"; exit 1; fi
    mkdir -p $JOB
    rm -f $JOB/exit_code $JOB/failed_stage $JOB/failed_at $JOB/stage
    setsid nohup bash scripts/pod_job.sh run "$@" >> $JOB/log 2>&1 < /dev/null &
    echo $! > $JOB/pid
    echo "worker $worker: started ${*:3}"
    ;;
  run)
    config=$2; overrides=$3; shift 3
    echo "=== $(date -u +%FT%TZ) worker $worker: stages $*"
    for stage in "$@"; do
      echo "$stage" > $JOB/stage
      make "$stage" CONFIG="$config" REQUIREMENTS=requirements-tpu.txt ARGS="$overrides"
      code=$?
      # make exits with 2 whatever its recipe's code; it prints that code last.
      if [ $code -ne 0 ] && tail -n 3 $JOB/log | grep -qE "\] Error $PREEMPTED\$"; then code=$PREEMPTED; fi
      if [ $code -ne 0 ]; then
        echo "$stage" > $JOB/failed_stage
        date +%s.%N > $JOB/failed_at
        echo "=== $(date -u +%FT%TZ) worker $worker: $stage failed (exit $code)"
        echo $code > $JOB/exit_code
        exit $code
      fi
    done
    echo "=== $(date -u +%FT%TZ) worker $worker: done"
    echo 0 > $JOB/exit_code
    ;;
  status)
    if [ ! -f $JOB/pid ]; then echo "worker $worker: none"
    elif running; then echo "worker $worker: running $(cat $JOB/stage 2>/dev/null)"
    elif [ ! -f $JOB/exit_code ]; then echo "worker $worker: stopped $(cat $JOB/stage 2>/dev/null)"
    elif [ "$(cat $JOB/exit_code)" = 0 ]; then echo "worker $worker: done"
    elif [ "$(cat $JOB/exit_code)" = $PREEMPTED ]; then echo "worker $worker: preempted $(cat $JOB/failed_stage) $PREEMPTED $(cat $JOB/failed_at)"
    else echo "worker $worker: failed $(cat $JOB/failed_stage) $(cat $JOB/exit_code) $(cat $JOB/failed_at)"
    fi
    ;;
  logs)
    tail -n "${2:-40}" $JOB/log 2>/dev/null || echo "worker $worker: no log yet"
    ;;
  *)
    echo "usage: bash scripts/pod_job.sh start CONFIG OVERRIDES STAGE... | status | logs [LINES]" >&2
    exit 2
    ;;
esac
