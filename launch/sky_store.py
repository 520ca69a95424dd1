"""Where a SkyPilot job keeps what must outlive its nodes: `<checkpoint url>/<spotune job id>/`.

    <store>/checkpoints/     the recipe's checkpoints (each committed by its manifest)
    <store>/output/          the trained adapter or weights (direct: spotune-output.json written last)
    <store>/events.jsonl     mounted: the run dir is the store; direct: the recipe keeps a copy
                             in checkpoints/ (recipes/object_store.py) so a new node numbers on
    <store>/crash-restarts   how many crashes the run script has retried (launch/sky_node.py)

The store is keyed by the spotune job id, never by SKYPILOT_TASK_ID, which changes when the jobs
controller restarts a job: a key that changes would start training again from step 0.

The node reaches the store in one of two ways, chosen per task because SkyPilot mounts storage per
task, not per resource:
- mounted: SkyPilot mounts the bucket MOUNT_CACHED at /ckpt and uploads what the recipe writes
  there; its flush after the run completes the upload before the job counts as succeeded. Every
  cloud in the task must support STORAGE_MOUNTING, and the store's cloud must be enabled for
  storage in `sky check` (SkyPilot creates and mounts the bucket through it).
- direct: the recipe writes its checkpoints to the URL itself (fsspec), and the run script
  publishes the output there. RunPod, Vast and Verda cannot mount a bucket, so their tasks go this
  way; the store's credentials reach the node as SkyPilot secrets, never as envs or YAML. Only S3
  (or an S3-compatible store through AWS_ENDPOINT_URL) is written directly: a GCS key would have
  to travel as a file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional

MOUNT_POINT = "/ckpt"
# The secrets a direct write needs, by URL scheme (boto's own variable names).
DIRECT_CREDENTIALS: dict[str, tuple[str, ...]] = {"s3": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
# The cloud whose storage `sky check` must enable for SkyPilot to create and mount the bucket.
STORE_CLOUD = {"s3": "aws", "gs": "gcp"}
_BUCKET_PREFIX = "spotune-ckpt-"


def default_bucket(job_id: str) -> str:
    """One bucket per job, named from its id and valid on S3 and GCS (3-63 of [a-z0-9-]). A long
    job name is shortened in the middle: the date and hex suffix that make the id unique stay."""
    slug = re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]+", "-", job_id.lower())).strip("-")
    room = 63 - len(_BUCKET_PREFIX)
    if len(slug) > room:
        name, _, unique = slug.rpartition("-")
        name, _, day = name.rpartition("-")
        tail = f"-{day}-{unique}"
        slug = name[:room - len(tail)].rstrip("-") + tail
    return _BUCKET_PREFIX + slug


def base_url(spec, job_id: str) -> str:
    """checkpoint.url, else the job's own bucket."""
    return spec.checkpoint.url or f"s3://{default_bucket(job_id)}"


def scheme_of(url: str) -> str:
    return url.split("://", 1)[0]


@dataclass(frozen=True)
class JobStore:
    url: str          # s3://bucket[/prefix]/<job id>
    mounted: bool

    @classmethod
    def of(cls, spec, job_id: str, mounted: bool) -> "JobStore":
        return cls(f"{base_url(spec, job_id)}/{job_id}", mounted)

    @property
    def scheme(self) -> str:
        return scheme_of(self.url)

    @property
    def bucket(self) -> str:
        return self.url.split("://", 1)[1].split("/", 1)[0]

    @property
    def key(self) -> str:
        """The path inside the bucket: [prefix/]<job id>."""
        return self.url.split("://", 1)[1].split("/", 1)[1]

    @property
    def bucket_url(self) -> str:
        return f"{self.scheme}://{self.bucket}"

    @property
    def node_dir(self) -> str:
        """Where the node sees the store: a path under the mount, or the URL itself."""
        return f"{MOUNT_POINT}/{self.key}" if self.mounted else self.url

    @property
    def output_url(self) -> str:
        return f"{self.url}/output"


def direct_write_problem(spec, environ: Mapping[str, str]) -> Optional[str]:
    """Why the recipe could not write its checkpoints to the store directly from a node of any
    cloud, or None: the store's credentials must be listed in sky.secrets and set here."""
    url = base_url(spec, "job")
    scheme = scheme_of(url)
    needed = DIRECT_CREDENTIALS.get(scheme)
    if needed is None:
        return (f"only s3:// checkpoints can be written from a node that cannot mount them "
                f"(checkpoint.url is {scheme}://)")
    unlisted = [n for n in needed if n not in spec.sky.secrets]
    unset = [n for n in needed if not environ.get(n)]
    if unlisted or unset:
        parts = []
        if unlisted:
            parts.append(f"list {', '.join(unlisted)} in sky.secrets")
        if unset:
            parts.append(f"set {', '.join(unset)} here")
        return (f"to write checkpoints to {scheme}:// from it, {' and '.join(parts)} "
                "(they reach the node as SkyPilot secrets)")
    return None
