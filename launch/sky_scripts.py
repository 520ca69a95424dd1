"""The setup and run scripts of a SkyPilot job: bash that runs on the node.

SkyPilot wraps `run` in its own script (sky/backends/task_codegen.py, build_task_bash_script):
it appends a flush that waits until a MOUNT_CACHED bucket has uploaded everything, then exits
with the status of the run's last command. So the run must END with its status, never `exit`
with it: an `exit` skips the flush, and on success the controller tears the cluster down while
the output is still uploading. The last line is `(exit $rc)`, which sets the status and goes on.

The recipe runs in the background so the spot-notice watcher (recipes/spot_notice.py) can be
told its pid; the shell traps SIGTERM (SkyPilot's cancel signals every process of the job), so
it waits for the recipe to checkpoint and exit rather than dying first.
"""
from __future__ import annotations

import shlex
from importlib import metadata

from contract.events import EVENTS_FILE
from launch.event_log import flush_command, mirror_command
from launch.sky_store import JobStore

NODE_SPEC_FILE = "$HOME/spotune-spec.yaml"
NODE_RUN_ROOT = "$HOME/spotune-run"  # the run dir of a job whose store is written directly
PIP_TRIES = 3


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
    SPOTUNE_SPEC_YAML, SPOTUNE_MAX_RESTARTS_ON_ERRORS) and, for a direct store, its credentials
    from SkyPilot secrets."""
    if store.mounted:
        where = [f'RUN_DIR="{store.node_dir}"', 'CHECKPOINT_DIR="$RUN_DIR/checkpoints"',
                 'RESTARTS="$RUN_DIR/crash-restarts"']
        prepare = []
        publish = []
    else:
        where = [f'RUN_DIR="{NODE_RUN_ROOT}/$SPOTUNE_JOB_ID"', 'CHECKPOINT_DIR="$SPOTUNE_STORE/checkpoints"',
                 'RESTARTS="$SPOTUNE_STORE/crash-restarts"']
        # A store that refuses the credentials is bad input (exit 2), found before the model downloads.
        prepare = ['if [ $rc -eq 0 ]; then python -m launch.sky_node prepare "$SPOTUNE_STORE"; rc=$?; fi']
        publish = ['  if [ $rc -eq 0 ]; then python -m launch.sky_node publish "$RUN_DIR/output" "$SPOTUNE_STORE/output" || rc=1; fi']
    recipe = f'-m recipes.sft "{NODE_SPEC_FILE}" --run-dir "$RUN_DIR" --checkpoint-dir "$CHECKPOINT_DIR"'
    return "\n".join([
        *where,
        "rc=0",
        "STARTED_AT=$(date +%s)",
        f'mkdir -p "$RUN_DIR" && printf "%s\\n" "$SPOTUNE_SPEC_YAML" > "{NODE_SPEC_FILE}" || rc=1',
        *prepare,
        # Progress reaches the backend through the job log: every event line, prefixed, for as long
        # as MIRROR lives. SkyPilot reads the job's output to its end before it reaps this shell,
        # so the mirror must not wait for the shell to go: it waits for MIRROR, ended below.
        '(trap "" TERM; exec tail -f /dev/null) &',
        "MIRROR=$!",
        mirror_command("$RUN_DIR", until_pid="$MIRROR"),
        "if [ $rc -eq 0 ]; then",
        # One process per GPU: torchrun where the node has several (DDP for LoRA/QLoRA, FSDP for full).
        '  if [ "${SKYPILOT_NUM_GPUS_PER_NODE:-1}" -gt 1 ]; then',
        f'    python -m torch.distributed.run --standalone --nproc-per-node "$SKYPILOT_NUM_GPUS_PER_NODE" {recipe} &',
        "  else",
        f"    python {recipe} &",
        "  fi",
        "  RECIPE_PID=$!",
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
        # The status SkyPilot acts on: 0, 75 recover, 76 retry a crash, 2 or 1 end the job.
        'code=$(python -m launch.sky_node exit-code --rc "$rc" --events "$RUN_DIR/' + EVENTS_FILE + '" --since "$STARTED_AT"'
        ' --restarts "$RESTARTS" --max-restarts "${SPOTUNE_MAX_RESTARTS_ON_ERRORS:-0}") && rc=$code',
        'kill -KILL "$MIRROR" 2>/dev/null; wait "$MIRROR" 2>/dev/null',
        flush_command("$RUN_DIR"),
        "(exit $rc)",
    ]) + "\n"
