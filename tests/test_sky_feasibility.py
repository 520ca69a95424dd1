"""Launch only what can launch: SkyPilot's own checks on every placement, with `sky check`'s
enabled clouds seeded through sky.global_user_state (offline, on real catalog excerpts).

The cheapest offers of these plans are on RunPod and Vast, which cannot mount a bucket
(sky/clouds/runpod.py, vast.py): the task must not ask them to, and must still run there."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from sky_catalog import catalog_offers, other_offers, seeded_runtime, sky_with_seeded_catalog

from contract.backend import LaunchRequest
from contract.spec import load_spec
from launch.sky_feasibility import feasible
from launch.sky_task import render_task_yaml

sky = sky_with_seeded_catalog()
OFFERS = catalog_offers() + other_offers("runpod", "vast")
STORE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "do-not-leak-3f9a"}


@pytest.fixture(autouse=True)
def _sky_runtime(monkeypatch):
    monkeypatch.setenv("SKY_RUNTIME_DIR", seeded_runtime())


@pytest.fixture
def enabled(monkeypatch):
    """`sky check` as SkyPilot records it, restored afterwards (other tests read the same state)."""
    from sky import global_user_state, skypilot_config
    from sky.clouds.cloud import CloudCapability

    workspace = skypilot_config.get_active_workspace()
    before = {c: [str(x) for x in global_user_state.get_cached_enabled_clouds(c, workspace)] for c in CloudCapability}

    def enable(compute, storage=("AWS", "GCP")):
        global_user_state.set_enabled_clouds(list(compute), CloudCapability.COMPUTE, workspace)
        global_user_state.set_enabled_clouds(list(storage), CloudCapability.STORAGE, workspace)

    yield enable
    for capability, clouds in before.items():
        global_user_state.set_enabled_clouds(clouds, capability, workspace)


def write_spec(tmp_path: Path, secrets=("HF_TOKEN",), **extra) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(f'{{"instruction": "Say hi {i}", "output": "hello there, friend"}}\n' for i in range(50)))
    raw = {"name": "8b-qlora", "model": "meta-llama/Llama-3.1-8B", "method": "qlora", "seq_len": 512,
           "data": {"path": "train.jsonl", "examples": 20000, "tokens_per_example": 512},
           "sky": {"secrets": list(secrets)}, **extra}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "spec.yaml"


def plan_for(spec):
    from orchestrator.planner import make_plan

    return make_plan(spec, OFFERS)


def request_for(spec, placements, tmp_path, job_id="8b-qlora-20261129-ab12"):
    return LaunchRequest(job_id=job_id, spec=spec, node_spec=spec.node_spec(), run_dir=tmp_path / "runs" / job_id,
                         placements=tuple(placements), env={"SPOTUNE_JOB_ID": job_id})


def every_resource_can_run(task) -> list[str]:
    """SkyPilot's own verdict on each resource of the task: the problems, if any."""
    problems = []
    for r in task.resources:
        try:
            r.cloud.check_features_are_supported(r, task.get_required_cloud_features() | r.get_required_cloud_features())
        except sky.exceptions.NotSupportedError as e:
            problems.append(f"{r}: {e}")
    return problems


def test_the_cheapest_offers_on_runpod_and_vast_launch_with_checkpoints_written_by_the_recipe(tmp_path, enabled):
    enabled(["AWS", "GCP", "Lambda", "RunPod", "Vast"])
    spec = load_spec(write_spec(tmp_path, secrets=("HF_TOKEN", *STORE_CREDENTIALS)))
    plan = plan_for(spec)
    assert {plan.options[0].offer.provider, plan.options[1].offer.provider} <= {"runpod", "vast"}

    verdict = feasible(spec, [o.placement for o in plan.options], environ=STORE_CREDENTIALS)
    assert verdict.launchable[0] == plan.options[0].placement and not verdict.rejected

    text = render_task_yaml(request_for(spec, verdict.launchable, tmp_path))
    task = sky.Task.from_yaml_config(yaml.safe_load(text))  # SkyPilot's schema and task validation
    assert {str(r.cloud) for r in task.resources} >= {"RunPod", "Vast"}
    assert (str(task.resources[0].cloud).lower(), task.resources[0].instance_type) == (
        plan.options[0].offer.provider, plan.options[0].offer.instance_type)
    assert task.get_required_cloud_features() == set()
    assert every_resource_can_run(task) == []
    assert not task.storage_mounts and 'CHECKPOINT_DIR="$SPOTUNE_STORE/checkpoints"' in task.run
    assert yaml.safe_load(text)["secrets"] == {"HF_TOKEN": None, "AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}
    assert STORE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in text


def test_skypilots_own_upload_translation_asks_no_cloud_to_mount_anything(tmp_path, enabled, monkeypatch):
    """A managed job's local workdir and file mounts are rewritten on launch
    (sky/utils/controller_utils.py, maybe_translate_local_file_mounts_and_sync_up): folders are
    copied, a single file would be mounted. The upload itself is the only part replaced."""
    from sky.utils import controller_utils

    enabled(["AWS", "GCP", "Lambda", "RunPod", "Vast"])
    spec = load_spec(write_spec(tmp_path, secrets=("HF_TOKEN", *STORE_CREDENTIALS)))
    verdict = feasible(spec, [o.placement for o in plan_for(spec).options], environ=STORE_CREDENTIALS)
    text = render_task_yaml(request_for(spec, verdict.launchable, tmp_path))

    class Uploaded(Exception):
        pass

    def translated_features(config) -> set:
        task = sky.Task.from_yaml_config(config)
        seen = {}

        def upload(self):  # the cloud API call: record what SkyPilot would mount, then stop
            seen["features"] = self.get_required_cloud_features()
            seen["modes"] = {path: storage.mode.value for path, storage in self.storage_mounts.items()}
            raise Uploaded

        monkeypatch.setattr(sky.Task, "sync_storage_mounts", upload)
        with pytest.raises(Uploaded):
            controller_utils.maybe_translate_local_file_mounts_and_sync_up(task, "jobs")
        return seen

    ours = translated_features(yaml.safe_load(text))
    assert set(ours["modes"].values()) == {"COPY"} and ours["features"] == set()
    single_file = yaml.safe_load(text)
    single_file["file_mounts"] = {"/spotune-data/train.jsonl": str(tmp_path / "train.jsonl")}
    assert sky.clouds.CloudImplementationFeatures.STORAGE_MOUNTING in translated_features(single_file)["features"]


def test_without_the_stores_credentials_runpod_and_vast_are_rejected_and_the_rest_mount_the_bucket(tmp_path, enabled):
    enabled(["AWS", "GCP", "Lambda", "RunPod", "Vast"])
    spec = load_spec(write_spec(tmp_path))
    plan = plan_for(spec)
    verdict = feasible(spec, [o.placement for o in plan.options], environ={})
    refused = {p.provider for p, _ in verdict.rejected}
    assert refused == {"runpod", "vast"}
    reasons = {reason for _, reason in verdict.rejected}
    assert "Vast cannot mount a bucket; to write checkpoints to s3:// from it, list AWS_ACCESS_KEY_ID, " \
           "AWS_SECRET_ACCESS_KEY in sky.secrets and set AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY here " \
           "(they reach the node as SkyPilot secrets)" in reasons
    assert {p.provider for p in verdict.launchable} <= {"aws", "gcp", "lambda"}

    task = sky.Task.from_yaml_config(yaml.safe_load(render_task_yaml(request_for(spec, verdict.launchable, tmp_path))))
    assert task.get_required_cloud_features() == {sky.clouds.CloudImplementationFeatures.STORAGE_MOUNTING}
    assert every_resource_can_run(task) == []


def test_clouds_sky_check_did_not_enable_are_rejected(tmp_path, enabled):
    enabled(["AWS", "GCP"])
    spec = load_spec(write_spec(tmp_path, secrets=("HF_TOKEN", *STORE_CREDENTIALS)))
    verdict = feasible(spec, [o.placement for o in plan_for(spec).options], environ=STORE_CREDENTIALS)
    assert {p.provider for p in verdict.launchable} <= {"aws", "gcp"} and verdict.launchable
    reasons = {p.provider: reason for p, reason in verdict.rejected}
    assert reasons["runpod"] == "RunPod is not enabled in SkyPilot (run `sky check runpod`)"
    assert reasons["lambda"] == "Lambda is not enabled in SkyPilot (run `sky check lambda`)"


def test_skypilots_own_feature_check_refuses_spot_on_lambda(tmp_path, enabled):
    from contract.placement import Placement

    enabled(["AWS", "GCP", "Lambda"])
    spec = load_spec(write_spec(tmp_path))
    lambda_spot = Placement("lambda", "us-east-1", "A100", 1, True, plan_for(spec).options[0].price_per_hour, "gpu_1x_a100")
    (placement, reason), = feasible(spec, [lambda_spot], environ={}).rejected
    assert reason == "Lambda cannot run it: spot_instance: Spot instances are not supported in Lambda."


def test_an_offer_skypilots_catalog_does_not_list_in_that_region_is_rejected(tmp_path, enabled):
    """sky.Resources builds for it; only pricing it fails, so the optimizer's own check is asked."""
    from contract.placement import Placement

    enabled(["AWS", "GCP"])
    spec = load_spec(write_spec(tmp_path))
    price = plan_for(spec).options[0].price_per_hour
    elsewhere = Placement("aws", "eu-north-1", "A10G", 1, True, price, "g5.xlarge")
    listed = Placement("aws", "us-east-1", "A10G", 1, True, price, "g5.xlarge")
    verdict = feasible(spec, [elsewhere, listed], environ={})
    assert verdict.launchable == (listed,)
    (_, reason), = verdict.rejected
    assert reason.startswith("not in SkyPilot's AWS catalog")


@pytest.mark.parametrize("compute, storage, why", [
    ([], ["AWS"], "SkyPilot has no cloud enabled: run `sky check`"),
    (["AWS", "RunPod"], [], "SkyPilot's managed jobs upload the code and data through a bucket"),
])
def test_nothing_launches_without_a_cloud_or_without_object_storage(tmp_path, enabled, compute, storage, why):
    enabled(compute, storage)
    spec = load_spec(write_spec(tmp_path, secrets=("HF_TOKEN", *STORE_CREDENTIALS)))
    verdict = feasible(spec, [o.placement for o in plan_for(spec).options[:5]], environ=STORE_CREDENTIALS)
    assert verdict.launchable == () and len(verdict.rejected) == 5
    assert all(reason.startswith(why) for _, reason in verdict.rejected)


def test_a_gcs_store_is_mounted_but_never_written_from_a_cloud_without_mounts(tmp_path, enabled):
    enabled(["AWS", "GCP", "RunPod", "Vast"], storage=["GCP"])
    spec = load_spec(write_spec(tmp_path, secrets=("HF_TOKEN", *STORE_CREDENTIALS),
                                checkpoint={"url": "gs://my-ckpts/runs"}))
    verdict = feasible(spec, [o.placement for o in plan_for(spec).options], environ=STORE_CREDENTIALS)
    assert {p.provider for p in verdict.launchable} <= {"aws", "gcp"} and verdict.launchable
    assert {reason for p, reason in verdict.rejected if p.provider == "runpod"} == {
        "RunPod cannot mount a bucket; only s3:// checkpoints can be written from a node that cannot mount them "
        "(checkpoint.url is gs://)"}
    task = sky.Task.from_yaml_config(yaml.safe_load(render_task_yaml(request_for(spec, verdict.launchable, tmp_path))))
    assert task.storage_mounts["/ckpt"].source == "gs://my-ckpts"
    assert every_resource_can_run(task) == []


def test_the_backend_answers_on_the_protocol_from_skypilots_own_state(tmp_path, enabled, monkeypatch):
    from launch.skypilot import SkyPilotBackend

    enabled(["AWS", "GCP", "Lambda", "RunPod", "Vast"])
    for name, value in STORE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    spec = load_spec(write_spec(tmp_path, secrets=("HF_TOKEN", *STORE_CREDENTIALS)))
    plan = plan_for(spec)
    verdict = SkyPilotBackend(tmp_path).feasible(spec, [o.placement for o in plan.options])
    assert verdict.launchable == tuple(o.placement for o in plan.options)


def _on_nodes(placement, n):
    from dataclasses import replace

    return replace(placement, num_nodes=n, price_per_hour=placement.node_price_per_hour * n)


def test_several_nodes_on_a_cloud_without_multi_node_are_rejected_with_skypilots_reason(tmp_path, enabled):
    """MULTI_NODE is a cloud feature (sky/clouds/cloud.py, CloudImplementationFeatures): RunPod and Vast
    list it in _CLOUD_UNSUPPORTED_FEATURES, AWS does not. The same offers on one node still launch."""
    from sky.utils import registry

    enabled(["AWS", "GCP", "Lambda", "RunPod", "Vast"])
    spec = load_spec(write_spec(tmp_path, secrets=("HF_TOKEN", *STORE_CREDENTIALS)))
    options = plan_for(spec).options
    single = {o.offer.provider: o.placement for o in reversed(options)}  # the cheapest of each cloud
    two_nodes = [_on_nodes(single[cloud], 2) for cloud in ("runpod", "vast", "aws")]

    verdict = feasible(spec, two_nodes, environ=STORE_CREDENTIALS)
    assert [p.provider for p in verdict.launchable] == ["aws"] and verdict.launchable[0].num_nodes == 2
    reasons = {p.provider: reason for p, reason in verdict.rejected}
    for cloud, name in (("runpod", "RunPod"), ("vast", "Vast")):
        skypilots_own = registry.CLOUD_REGISTRY.from_str(cloud)._CLOUD_UNSUPPORTED_FEATURES[
            sky.clouds.CloudImplementationFeatures.MULTI_NODE]
        assert reasons[cloud] == f"{name} cannot run it on 2 nodes: multi-node: {' '.join(skypilots_own.split())}"
    one_node = feasible(spec, [single["runpod"], single["vast"]], environ=STORE_CREDENTIALS)
    assert one_node.rejected == ()


def test_a_multi_node_task_asks_skypilot_for_multi_node_and_every_resource_can_give_it(tmp_path, enabled):
    enabled(["AWS", "GCP", "Lambda", "RunPod", "Vast"])
    spec = load_spec(write_spec(tmp_path, secrets=("HF_TOKEN", *STORE_CREDENTIALS)))
    options = plan_for(spec).options
    placements = [_on_nodes(o.placement, 2) for o in options]  # the cheapest are on RunPod and Vast
    text = render_task_yaml(request_for(spec, placements, tmp_path))
    task = sky.Task.from_yaml_config(yaml.safe_load(text))
    assert task.num_nodes == 2
    assert sky.clouds.CloudImplementationFeatures.MULTI_NODE in task.get_required_cloud_features()
    assert task.resources and every_resource_can_run(task) == []
    assert not {str(r.cloud) for r in task.resources} & {"RunPod", "Vast"}
    assert "cannot run it on 2 nodes: multi-node:" in text  # the cheap RunPod/Vast offers, skipped with the reason
