"""The setup and run scripts of a SkyPilot job: bash that runs on the node.

SkyPilot wraps `run` in its own script (sky/backends/task_codegen.py, build_task_bash_script):
it appends a flush that waits until a MOUNT_CACHED bucket has uploaded everything, then exits
with the status of the run's last command. So the run must END with its status, never `exit`
with it: an `exit` skips the flush, and on success the controller tears the cluster down while
the output is still uploading. The last line is `(exit $rc)`, which sets the status and goes on.

The recipe runs in the background so the spot-notice watcher (recipes/spot_notice.py) can be
told its pid; the shell traps SIGTERM (SkyPilot's cancel signals every process of the job), so
it waits for the recipe to checkpoint and exit rather than dying first.

Several nodes (the task's num_nodes): SkyPilot runs this same script on every node at once, with
SKYPILOT_NODE_RANK (0 on the head), SKYPILOT_NODE_IPS (one per line, the head first),
SKYPILOT_NUM_NODES and SKYPILOT_NUM_GPUS_PER_NODE (sky/backends/task_codegen.py, add_task). Each
node starts torchrun for its own GPUs (one process on a CPU node), rendezvousing at the head's
first address on port $SPOTUNE_RDZV_PORT (default RENDEZVOUS_PORT). The rendezvous is torchrun's
static one (--node-rank with --master-addr/--master-port): it makes node rank 0 hold global rank 0,
the rank that alone writes the events, the checkpoints and the output (recipes/trainer.py). c10d
would not: it ignores --node-rank and numbers the nodes by sorted host name and pid
(torch/distributed/run.py, "node_rank is only used for static rdzv_backend";
torch/distributed/elastic/rendezvous/dynamic_rendezvous.py, _mark_rendezvous_complete), so rank 0
could land on a worker whose events no one mirrors and whose output no one publishes.

SkyPilot ends the whole job as soon as any node's run exits non-zero: it force-cancels the other
nodes (their code reads 137) and the job's exit codes, one per node, decide recovery (any code in
recover_on_exit_codes recovers; sky/backends/task_codegen.py get_or_fail, sky/jobs/recovery_strategy.py
should_restart_on_failure). Only the head can tell a preemption from a crash from bad input (its
rank 0 has the events), so only the head mirrors the events, publishes the output, counts crash
restarts and speaks for the job; a worker ends 0 whatever its torchrun said and leaves the verdict
to the head, whose ranks fail with it (a lost peer breaks every collective). A preempted node takes
the cluster out of UP, and SkyPilot then recovers the whole job on a new cluster whatever the exit
codes (sky/jobs/controller.py reads the cluster's status before any exit code); the head's rank 0 resumes it from the last complete checkpoint in the store and broadcasts it.
"""
from __future__ import annotations

import shlex
from importlib import metadata

from contract.events import EVENTS_FILE
from launch.event_log import flush_command, mirror_command
from launch.sky_store import JobStore

NODE_SPEC_FILE = "$HOME/spotune-spec.yaml"
NODE_RUN_ROOT = "$HOME/spotune-run"  # the run dir of a job whose store is written directly, and of a worker node
PIP_TRIES = 3
RENDEZVOUS_PORT = 29500  # torchrun's own default; $SPOTUNE_RDZV_PORT overrides it


def _torch_pin() -> str:
    """torch as tested here, without the local build tag: PyPI's Linux wheel of that version is the
    CUDA build. Unpinned (the train extra's range) when this machine has no torch."""
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return ""
    return f"torch=={version.split('+')[0]}"


def setup_commands() -> str:
    """Install this checkout with the `train` extra, retrying a package index that blips: a setup
    that fails ends the job (FAILED_SETUP is not retried, see launch/sky_node.py)."""
    torch_pin = _torch_pin()
    lines = ["set -e",
             f'retry() {{ for i in $(seq {PIP_TRIES}); do "$@" && return 0; echo "retrying: $*"; sleep 20; done; return 1; }}',
             "retry python -m pip install -q --upgrade pip"]
    if torch_pin:
        lines.append(f"retry python -m pip install -q {shlex.quote(torch_pin)}")
    lines.append("retry python -m pip install -q -e '.[train]'")
    return "\n".join(lines) + "\n"


def run_commands(store: JobStore) -> str:
    """The run script. Its values come from the task's envs (SPOTUNE_JOB_ID, SPOTUNE_STORE,
    SPOTUNE_SPEC_YAML, SPOTUNE_MAX_RESTARTS_ON_ERRORS), SkyPilot's SKYPILOT_* variables and, for a
    direct store, its credentials from SkyPilot secrets."""
    if store.mounted:
        where = [f'RUN_DIR="{store.node_dir}"', 'CHECKPOINT_DIR="$RUN_DIR/checkpoints"',
                 'RESTARTS="$RUN_DIR/crash-restarts"']
        prepare = []
        publish = []
    else:
        where = [f'RUN_DIR="{NODE_RUN_ROOT}/$SPOTUNE_JOB_ID"', 'CHECKPOINT_DIR="$SPOTUNE_STORE/checkpoints"',
                 'RESTARTS="$SPOTUNE_STORE/crash-restarts"']
        # A store that refuses the credentials is bad input (exit 2), found before the model downloads.
        prepare = ['if [ $rc -eq 0 ] && [ $HEAD -eq 1 ]; then python -m launch.sky_node prepare "$SPOTUNE_STORE"; rc=$?; fi']
        publish = ['  if [ $rc -eq 0 ] && [ $HEAD -eq 1 ]; then python -m launch.sky_node publish "$RUN_DIR/output" "$SPOTUNE_STORE/output" || rc=1; fi']
    # A worker's ranks write nothing (rank 0 alone does): a run dir of its own keeps them off the
    # head's, which a mounted store shares with every node. Its checkpoint dir stays the store's.
    worker_dir = [f'[ $HEAD -eq 1 ] || RUN_DIR="{NODE_RUN_ROOT}/$SPOTUNE_JOB_ID"'] if store.mounted else []
    recipe = f'-m recipes.sft "{NODE_SPEC_FILE}" --run-dir "$RUN_DIR" --checkpoint-dir "$CHECKPOINT_DIR"'
    return "\n".join([
        'NODE_RANK="${SKYPILOT_NODE_RANK:-0}"',
        'NUM_NODES="${SKYPILOT_NUM_NODES:-1}"',
        'HEAD=0; [ "$NODE_RANK" = 0 ] && HEAD=1',
        *where,
        *worker_dir,
        "rc=0",
        "STARTED_AT=$(date +%s)",
        f'mkdir -p "$RUN_DIR" && printf "%s\\n" "$SPOTUNE_SPEC_YAML" > "{NODE_SPEC_FILE}" || rc=1',
        *prepare,
        "trap : TERM",
        "MIRROR=",
        "if [ $HEAD -eq 1 ]; then",
        # Progress reaches the backend through the job log: every event line, prefixed, for as long
        # as MIRROR lives. SkyPilot reads the job's output to its end before it reaps this shell,
        # so the mirror must not wait for the shell to go: it waits for MIRROR, ended below.
        '  (trap "" TERM; exec tail -f /dev/null) &',
        "  MIRROR=$!",
        mirror_command("$RUN_DIR", until_pid="$MIRROR"),
        "fi",
        "if [ $rc -eq 0 ]; then",
        # One process per GPU (DDP for LoRA/QLoRA, FSDP for full), one on a node without GPUs.
        '  if [ "$NUM_NODES" -gt 1 ]; then',
        '    HEAD_IP=$(printf "%s\\n" "$SKYPILOT_NODE_IPS" | head -n 1)',
        '    NPROC="${SKYPILOT_NUM_GPUS_PER_NODE:-0}"; [ "$NPROC" -ge 1 ] || NPROC=1',
        '    python -m torch.distributed.run --nnodes "$NUM_NODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC"'
        f' --master-addr "$HEAD_IP" --master-port "${{SPOTUNE_RDZV_PORT:-{RENDEZVOUS_PORT}}}" {recipe} &',
        '  elif [ "${SKYPILOT_NUM_GPUS_PER_NODE:-1}" -gt 1 ]; then',
        f'    python -m torch.distributed.run --standalone --nproc-per-node "$SKYPILOT_NUM_GPUS_PER_NODE" {recipe} &',
        "  else",
        f"    python {recipe} &",
        "  fi",
        "  RECIPE_PID=$!",
        # Every node watches its own instance: a notice on any node stops every rank (the recipe's
        # stop vote), rank 0 checkpoints, and the head reports the preemption.
        '  python -m recipes.spot_notice --pid "$RECIPE_PID" &',
        "  NOTICE_PID=$!",
        # A trapped SIGTERM ends `wait` early (status 143) while the recipe still checkpoints: wait
        # again while it lives; bash keeps a finished background job's status for a later `wait`.
        '  wait "$RECIPE_PID"',
        '  while kill -0 "$RECIPE_PID" 2>/dev/null; do wait "$RECIPE_PID"; done',
        '  wait "$RECIPE_PID"; rc=$?',
        '  kill "$NOTICE_PID" 2>/dev/null',
        *publish,
        "fi",
        "if [ $HEAD -eq 1 ]; then",
        # The status SkyPilot acts on: 0, 75 recover, 76 retry a crash, 2 or 1 end the job.
        '  code=$(python -m launch.sky_node exit-code --rc "$rc" --events "$RUN_DIR/' + EVENTS_FILE + '" --since "$STARTED_AT"'
        ' --restarts "$RESTARTS" --max-restarts "${SPOTUNE_MAX_RESTARTS_ON_ERRORS:-0}") && rc=$code',
        '  kill -KILL "$MIRROR" 2>/dev/null; wait "$MIRROR" 2>/dev/null',
        "  " + flush_command("$RUN_DIR"),
        "else",
        # A worker's non-zero status would end the job before the head's is known (see above).
        '  echo "spotune: node $NODE_RANK: the recipe exited $rc; the head node reports the job\'s status"',
        "  rc=0",
        "fi",
        "(exit $rc)",
    ]) + "\n"
