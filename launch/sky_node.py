"""What the SkyPilot run script (launch/sky_task.py) asks of Python on the node. Torch-free.

    python -m launch.sky_node prepare STORE_URL
        The checkpoint store is reachable with the credentials given (a job's own bucket is
        created). Exit 0, or 2 when the credentials are refused (bad input: a retry cannot help),
        or 1 for anything else (counted as a crash).
    python -m launch.sky_node publish DIR URL
        Copy the finished output to the store, spotune-output.json (sizes and sha256) last, so a
        half-published output is never taken for a whole one.
    python -m launch.sky_node exit-code --rc RC --events FILE --since T --restarts PATH_OR_URL --max-restarts N
        Print the exit status SkyPilot should see for the recipe's exit status RC.

Exit statuses and what SkyPilot does with them. The task's job_recovery says
`max_restarts_on_errors: 0` and `recover_on_exit_codes: [75, 76]`: SkyPilot restarts a job on a
new cluster when its exit code is listed, whatever its restart counter says, and otherwise counts
the failure against max_restarts_on_errors (sky/jobs/recovery_strategy.py,
should_restart_on_failure). It has no code it never retries, so the run script decides:
- 0 finished;
- 75 preempted after a checkpoint (also when torchrun reported the recipe's 75 as 1: the event
  log says `preempted`): recover;
- 2 bad input, and the recipe's other final codes (74 disk full, 80 over budget, 81 diverged; also
  when torchrun hid them, from the events): end the job as failed, no new cluster, no reinstall,
  no model download;
- a crash: 76 while fewer than spec.sky.max_restarts_on_errors crashes were retried (the count is
  kept in the durable store, since a restart is a new node), then 1, which ends the job.
On several nodes only the head asks for this status (its rank 0 has the events, and one count per
crash); a worker ends 0 and leaves the job's status to the head (launch/sky_scripts.py says why).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Optional

from contract.events import (DIVERGED, ERROR, EXIT_BAD_INPUT, EXIT_CRASH, EXIT_DISK_FULL, EXIT_DIVERGED, EXIT_FINISHED,
                             EXIT_OVER_BUDGET, EXIT_PREEMPTED, FINAL_EXIT_CODES, OVER_BUDGET, PREEMPTED, read_jsonl)

EXIT_RETRY_AFTER_CRASH = 76  # a crash SkyPilot should retry on a new cluster (in recover_on_exit_codes)
RECOVER_ON_EXIT_CODES = (EXIT_PREEMPTED, EXIT_RETRY_AFTER_CRASH)
OUTPUT_MANIFEST = "spotune-output.json"


# --- exit status ---------------------------------------------------------------------------

# The events that end a run for good, as torchrun would hide them (it reports any worker failure as 1).
_FINAL_BY_EVENT = {(ERROR, "bad_input"): EXIT_BAD_INPUT, (ERROR, "disk_full"): EXIT_DISK_FULL,
                   (OVER_BUDGET, None): EXIT_OVER_BUDGET, (DIVERGED, None): EXIT_DIVERGED}


def exit_status(rc: int, events: list[dict], since: float, restarts: "RestartCount", max_restarts: int) -> int:
    """The status SkyPilot should see, from the recipe's exit status and the events it wrote since
    this run started (a resumed node may hold earlier attempts' events, which are not this run's)."""
    if rc == EXIT_FINISHED:
        return EXIT_FINISHED
    recent = [e for e in events if isinstance(e.get("time"), (int, float)) and e["time"] >= since]
    last = recent[-1] if recent else {}
    if rc == EXIT_PREEMPTED or last.get("event") == PREEMPTED:
        return EXIT_PREEMPTED
    if rc in FINAL_EXIT_CODES:
        return rc
    final = _FINAL_BY_EVENT.get((last.get("event"), last.get("kind") if last.get("event") == ERROR else None))
    if final is not None:
        return final
    done = restarts.read()
    if done >= max_restarts:
        return EXIT_CRASH
    restarts.write(done + 1)
    return EXIT_RETRY_AFTER_CRASH


class RestartCount:
    """An integer in a file of the durable store: a local path under the bucket mount, or a URL."""

    def __init__(self, where: str):
        self.where = where

    def read(self) -> int:
        try:
            if "://" in self.where:
                fs, path = _filesystem(self.where)
                text = fs.cat_file(path).decode() if fs.exists(path) else "0"
            else:
                p = Path(self.where)
                text = p.read_text() if p.exists() else "0"
            return max(int(text.strip() or 0), 0)
        except ValueError:
            return 0

    def write(self, n: int) -> None:
        if "://" in self.where:
            fs, path = _filesystem(self.where)
            fs.pipe_file(path, str(n).encode())
        else:
            Path(self.where).parent.mkdir(parents=True, exist_ok=True)
            Path(self.where).write_text(str(n))


# --- the store -----------------------------------------------------------------------------

def _filesystem(url: str):
    import fsspec

    # A fresh client: fsspec caches one per set of arguments, which would outlive a changed endpoint.
    return fsspec.core.url_to_fs(url, skip_instance_cache=True)


def prepare(url: str) -> int:
    """Make sure the store can be written: create the job's bucket if missing, write and remove a probe."""
    try:
        fs, path = _filesystem(url)
        fs.makedirs(path, exist_ok=True)
        probe = f"{path.rstrip('/')}/.spotune-write-probe"
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except PermissionError as e:
        print(f"error: checkpoint store {url}: access denied ({_one_line(e)}); check the credentials "
              "passed as SkyPilot secrets", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # a network error may pass: counted as a crash, retried within the limit
        print(f"error: checkpoint store {url}: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return EXIT_CRASH
    return 0


def publish(directory: Path, url: str) -> dict:
    """Upload every file under `directory` to `url`, then the manifest listing them. An earlier
    manifest is removed first, so a re-publish that dies midway leaves no manifest at all."""
    fs, root = _filesystem(url)
    root = root.rstrip("/")
    manifest_path = f"{root}/{OUTPUT_MANIFEST}"
    if fs.exists(manifest_path):
        fs.rm_file(manifest_path)
    files = []
    for local in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        relative = local.relative_to(directory).as_posix()
        fs.makedirs(f"{root}/{relative}".rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(local), f"{root}/{relative}")
        files.append({"path": relative, "bytes": local.stat().st_size, "sha256": _sha256(local)})
    manifest = {"files": files}
    fs.pipe_file(manifest_path, json.dumps(manifest, indent=1).encode())
    return manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


# --- command line --------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.sky_node", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare")
    p.add_argument("url")
    p = commands.add_parser("publish")
    p.add_argument("directory", type=Path)
    p.add_argument("url")
    p = commands.add_parser("exit-code")
    p.add_argument("--rc", type=int, required=True)
    p.add_argument("--events", type=Path, required=True)
    p.add_argument("--since", type=float, required=True)
    p.add_argument("--restarts", required=True)
    p.add_argument("--max-restarts", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        return prepare(args.url)
    if args.command == "publish":
        try:
            publish(args.directory, args.url)
        except Exception as e:
            print(f"error: publishing the output to {args.url}: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
            return EXIT_CRASH
        print(f"output published to {args.url}", file=sys.stderr)
        return 0
    try:
        code = exit_status(args.rc, read_jsonl(args.events), args.since, RestartCount(args.restarts), args.max_restarts)
    except Exception as e:  # only counting a crash touches the store: unreadable, the crash is final
        print(f"error: counting crash restarts in {args.restarts}: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        code = EXIT_CRASH
    print(code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
