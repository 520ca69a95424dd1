"""The SkyPilot task built from a launch request, checked with real sky objects on a seeded catalog (offline).

Feasibility on clouds without bucket mounts is tests/test_sky_feasibility.py; the run script under
SkyPilot's own wrapping is tests/test_sky_run_script.py."""
from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from sky_catalog import catalog_offers, seeded_runtime, sky_with_seeded_catalog

from contract.backend import LaunchRequest
from contract.spec import load_spec
from launch.sky_clouds import EnabledClouds
from launch.sky_store import MOUNT_POINT
from launch.sky_task import SkyTaskError, build_task, render_task_yaml, task_name
from orchestrator.quote import Option, Plan

sky = sky_with_seeded_catalog()


@pytest.fixture(autouse=True)
def _sky_runtime(monkeypatch):
    """SkyPilot's state and config for these tests live in the seeded runtime dir too."""
    monkeypatch.setenv("SKY_RUNTIME_DIR", seeded_runtime())
OFFERS = catalog_offers()
# What `sky check` enabled, for the tests that need SkyPilot to mount the checkpoint bucket.
AWS_GCP_LAMBDA = EnabledClouds(compute=frozenset({"aws", "gcp", "lambda"}), storage=frozenset({"aws", "gcp"}))


def offer(provider, region, instance_type):
    return next(o for o in OFFERS if (o.provider, o.region, o.instance_type) == (provider, region, instance_type))


def option(rank, provider, region, instance_type, spot, hours):
    o = offer(provider, region, instance_type)
    price = o.price(spot)
    return Option(rank=rank, offer=o, spot=spot, price_per_hour=price, micro_batch=4, grad_accum=8,
                  gradient_checkpointing=False, tokens_per_second=3000.0, memory_gb_per_gpu=20.0,
                  hours=hours, preemption_overhead_hours=0.0, expected_cost=price * Decimal(str(hours)))


def plan_of(*options):
    ranked = sorted(options, key=lambda o: o.expected_cost)
    return Plan(job="demo", model_name="tiny-llama", params=1, method="lora", total_tokens=10**6,
                options=tuple(ranked), rejected=(), managed=(), catalog_snapshot="bundled")


def request_of(spec, plan, job_id="demo-1", state=None):
    """What the orchestrator sends: the plan's options as placements, in the plan's order."""
    state = Path(state) if state is not None else spec.data_path().parent / "state"
    return LaunchRequest(job_id=job_id, spec=spec, node_spec=spec.node_spec(), run_dir=state / "runs" / job_id,
                         placements=tuple(o.placement for o in plan.options), env={"SPOTUNE_JOB_ID": job_id})


# Cheapest in expected cost is 8x A100 spot (fast), not the cheapest per hour (1x A100 on Lambda).
EIGHT_A100_SPOT = ("aws", "us-east-2", "p4d.24xlarge", True, 1.0)
ONE_A100_LAMBDA = ("lambda", "us-east-1", "gpu_1x_a100", False, 8.5)
ONE_A100_GCP_SPOT = ("gcp", "europe-west4", "a2-highgpu-1g", True, 8.5)


@pytest.fixture
def spec(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "hello"}\n')
    path = tmp_path / "spec.yaml"
    path.write_text("name: demo\nmodel: tiny-llama\nmethod: lora\ndata: {path: train.jsonl}\n")
    return load_spec(path)


@pytest.fixture
def plan():
    return plan_of(option(1, *EIGHT_A100_SPOT), option(2, *ONE_A100_LAMBDA), option(3, *ONE_A100_GCP_SPOT))


def test_dry_run_yaml_round_trips_through_sky_task(spec, plan):
    config = yaml.safe_load(render_task_yaml(request_of(spec, plan)))
    task = sky.Task.from_yaml_config(dict(config))
    again = task.to_yaml_config()
    for key in ("resources", "setup", "run", "workdir", "envs"):
        assert again[key] == config[key], key
    assert again["file_mounts"] == config["file_mounts"]
    assert isinstance(task.resources, list) and len(task.resources) == 3


def test_first_resource_is_the_planners_top_option_and_order_is_kept(spec, plan):
    task, skipped = build_task(request_of(spec, plan))
    assert skipped == []
    got = [(str(r.cloud).lower(), r.region, r.instance_type, r.use_spot) for r in task.resources]
    want = [(o.offer.provider, o.offer.region, o.offer.instance_type, o.spot) for o in plan.options]
    assert got == want
    first = task.resources[0]
    assert first.accelerators == {"A100": 8}
    assert first.job_recovery["strategy"] == "EAGER_NEXT_REGION"


def test_skypilot_retries_only_preemptions_and_counted_crashes_so_bad_input_ends_the_job(spec, plan):
    """SkyPilot restarts a job on a new cluster for an exit code in recover_on_exit_codes and, with
    max_restarts_on_errors 0, for no other: the run script turns a crash into 76 while the spec's
    restart budget lasts (it counts them itself), and bad input stays 2."""
    spec.sky.max_restarts_on_errors = 1
    task, _ = build_task(request_of(spec, plan))
    assert {(r.job_recovery["max_restarts_on_errors"], tuple(r.job_recovery["recover_on_exit_codes"]))
            for r in task.resources} == {(0, (75, 76))}
    assert task.envs["SPOTUNE_MAX_RESTARTS_ON_ERRORS"] == "1"


def test_options_are_capped_at_max_options_and_recovery_follows_the_spec(spec, plan):
    spec.sky.max_options = 2
    spec.sky.recovery_strategy = "FAILOVER"
    task, _ = build_task(request_of(spec, plan))
    assert len(task.resources) == 2
    assert {r.job_recovery["strategy"] for r in task.resources} == {"FAILOVER"}


def _keys(resources):
    return [(str(r.cloud).lower(), r.region, r.instance_type, r.use_spot) for r in resources]


def test_fallback_takes_two_regions_per_instance_type_then_the_next_offer(spec):
    lambda_regions = ("us-east-1", "us-west-1", "europe-central-1", "asia-south-1")
    plan = plan_of(*[option(i, "lambda", region, "gpu_1x_a100", False, 1.0) for i, region in enumerate(lambda_regions)],
                   option(5, *EIGHT_A100_SPOT), option(6, *ONE_A100_GCP_SPOT))
    task, skipped = build_task(request_of(spec, plan))
    assert skipped == []
    assert _keys(task.resources) == [("lambda", "us-east-1", "gpu_1x_a100", False),
                                     ("lambda", "us-west-1", "gpu_1x_a100", False),
                                     ("aws", "us-east-2", "p4d.24xlarge", True),
                                     ("gcp", "europe-west4", "a2-highgpu-1g", True)]


def test_real_8b_qlora_plan_falls_back_across_clouds_and_gpus_in_cost_order(tmp_path):
    """Lambda lists its cheapest GPU in 17 regions at one price: the 8 slots must not all go there."""
    from orchestrator.planner import make_plan

    path = tmp_path / "spec.yaml"
    path.write_text("name: big\nmodel: meta-llama/Llama-3.1-8B\nmethod: qlora\n"
                    "data: {examples: 20000, tokens_per_example: 512}\n")
    big = load_spec(path)
    plan = make_plan(big, OFFERS)
    task, _ = build_task(request_of(big, plan, "big-1", state=tmp_path))
    got = _keys(task.resources)
    plan_order = [(o.offer.provider, o.offer.region, o.offer.instance_type, o.spot) for o in plan.options]
    assert len(got) == big.sky.max_options == 8
    assert got[0] == plan_order[0]
    positions = [plan_order.index(k) for k in got]
    assert positions == sorted(positions)  # still cheapest expected cost first
    per_offer = {}
    for cloud, _, instance_type, spot in got:
        per_offer[(cloud, instance_type, spot)] = per_offer.get((cloud, instance_type, spot), 0) + 1
    assert max(per_offer.values()) == 2
    assert len(per_offer) >= 4 and len({cloud for cloud, *_ in got}) >= 3


def test_checkpoint_bucket_is_mounted_cached_and_the_run_is_keyed_by_the_spotune_job_id(spec, plan):
    """SKYPILOT_TASK_ID changes when the jobs controller restarts a job: a run dir keyed by it would
    start training again from step 0. The spotune job id is stable."""
    task, _ = build_task(request_of(spec, plan, "demo-20261129-ab12"), clouds=AWS_GCP_LAMBDA)
    storage = task.storage_mounts[MOUNT_POINT]
    assert storage.mode == sky.StorageMode.MOUNT_CACHED
    assert storage.name == "spotune-ckpt-demo-20261129-ab12" and storage.persistent
    assert list(storage.stores) == [sky.StoreType.S3]
    assert task.envs["SPOTUNE_STORE"] == "s3://spotune-ckpt-demo-20261129-ab12/demo-20261129-ab12"
    # The recipe's `finished` event names where the output is kept, not the node's disk.
    assert task.envs["SPOTUNE_OUTPUT_URL"] == "s3://spotune-ckpt-demo-20261129-ab12/demo-20261129-ab12/output"
    assert 'RUN_DIR="/ckpt/demo-20261129-ab12"' in task.run and "SKYPILOT_TASK_ID" not in task.run
    assert '--run-dir "$RUN_DIR" --checkpoint-dir "$CHECKPOINT_DIR"' in task.run
    assert 'CHECKPOINT_DIR="$RUN_DIR/checkpoints"' in task.run
    assert "pip install -q -e '.[train]'" in task.setup


def test_the_data_file_travels_in_a_folder_of_its_own(spec, plan):
    """SkyPilot's managed jobs copy a local folder to the node but mount a single file from a
    bucket (tests/test_sky_feasibility.py runs that translation): a folder works on every cloud."""
    task, _ = build_task(request_of(spec, plan))
    node_spec = yaml.safe_load(task.envs["SPOTUNE_SPEC_YAML"])
    assert node_spec["data"]["path"] == "/spotune-data/train.jsonl"
    folder = Path(task.file_mounts["/spotune-data"])
    assert [p.name for p in folder.iterdir()] == ["train.jsonl"]
    assert (folder / "train.jsonl").read_bytes() == spec.data_path().read_bytes()
    again, _ = build_task(request_of(spec, plan, "demo-2"))
    assert again.file_mounts["/spotune-data"] == str(folder)  # the same file ships the same folder


def test_a_spec_name_starting_with_a_digit_still_names_a_valid_cluster():
    from sky.jobs.utils import generate_managed_job_cluster_name
    from sky.utils import common_utils

    for job_id in ("7b-lora-20261129-ab12", "demo-20261129-ab12", "a..._b-20261129-ab12"):
        name = task_name(job_id)
        sky.Task(name=name)  # SkyPilot's task-name rule
        common_utils.check_cluster_name_is_valid(generate_managed_job_cluster_name(name, 42))
    assert task_name("7b-lora-20261129-ab12") == "job-7b-lora-20261129-ab12"
    assert task_name("demo-20261129-ab12") == "demo-20261129-ab12"


def test_the_node_gets_the_requests_node_spec_with_only_the_data_path_moved(spec, plan):
    """The node spec is the orchestrator's to write (e.g. the chosen option's micro-batch): the
    task ships it as given, not a spec re-derived here."""
    request = request_of(spec, plan)
    request.node_spec["batch"]["micro"] = 4
    task, _ = build_task(request)
    shipped = yaml.safe_load(task.envs["SPOTUNE_SPEC_YAML"])
    assert shipped == {**request.node_spec, "data": {**request.node_spec["data"], "path": "/spotune-data/train.jsonl"}}
    assert shipped["batch"]["micro"] == 4 and spec.batch.micro == "auto"
    assert request.node_spec["data"]["path"] == str(spec.data_path().resolve())  # the request is not changed


def test_a_checkpoint_url_is_mounted_as_the_existing_bucket_with_the_job_under_its_prefix(spec, plan):
    spec.checkpoint.url = "s3://my-ckpts/fine-tunes"
    task, _ = build_task(request_of(spec, plan), clouds=AWS_GCP_LAMBDA)
    assert task.storage_mounts[MOUNT_POINT].source == "s3://my-ckpts"
    assert task.envs["SPOTUNE_STORE"] == "s3://my-ckpts/fine-tunes/demo-1"
    assert 'RUN_DIR="/ckpt/fine-tunes/demo-1"' in task.run


def test_without_storage_enabled_in_sky_check_the_recipe_writes_the_store_itself(spec, plan):
    task, _ = build_task(request_of(spec, plan), clouds=EnabledClouds(frozenset({"aws", "gcp", "lambda"}), frozenset()))
    assert not task.storage_mounts
    assert 'CHECKPOINT_DIR="$SPOTUNE_STORE/checkpoints"' in task.run
    assert 'python -m launch.sky_node prepare "$SPOTUNE_STORE"' in task.run


def test_hf_token_value_never_appears_in_the_dry_run_yaml(spec, plan, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_do_not_leak_8d1f2c")
    text = render_task_yaml(request_of(spec, plan))
    assert "hf_do_not_leak_8d1f2c" not in text
    assert yaml.safe_load(text)["secrets"] == {"HF_TOKEN": None}


def test_secret_values_go_into_sky_secrets_not_envs(spec, plan):
    task, _ = build_task(request_of(spec, plan), secrets={"HF_TOKEN": "hf_x"}, clouds=AWS_GCP_LAMBDA)
    assert "HF_TOKEN" not in task.envs
    assert task.secrets["HF_TOKEN"].get_secret_value() == "hf_x"


def test_offers_skypilot_cannot_launch_are_skipped_with_the_reason(spec, plan):
    managed = option(1, *EIGHT_A100_SPOT)
    managed = Option(**{**managed.__dict__, "offer": managed.offer.__class__(
        **{**managed.offer.__dict__, "provider": "together"})})
    text = render_task_yaml(request_of(spec, plan_of(managed, option(2, *ONE_A100_LAMBDA))))
    assert "# skipped together/us-east-2 A100:8 spot: SkyPilot has no cloud named 'together'" in text
    with pytest.raises(SkyTaskError, match="no option in the plan can be launched through SkyPilot"):
        render_task_yaml(request_of(spec, plan_of(managed)))


def _optimize(task, monkeypatch):
    clouds = [sky.clouds.AWS(), sky.clouds.Lambda(), sky.clouds.GCP()]
    monkeypatch.setattr(sky.check, "get_cached_enabled_clouds_or_refresh", lambda *a, **k: clouds)
    monkeypatch.setattr(sky.check, "check_capability", lambda *a, **k: {})
    dag = sky.Dag()
    dag.add(task)
    sky.Optimizer.optimize(dag, quiet=True)
    return task.best_resources


def test_skypilot_optimizer_launches_the_planners_top_option_first(spec, plan, monkeypatch):
    config = yaml.safe_load(render_task_yaml(request_of(spec, plan)))
    task = sky.Task.from_yaml_config(config)
    best = _optimize(task, monkeypatch)
    top = plan.best
    assert (str(best.cloud).lower(), best.region, best.instance_type, best.use_spot) == (
        top.offer.provider, top.offer.region, top.offer.instance_type, top.spot)


def test_skypilot_optimizer_given_our_runtimes_prices_the_top_option_cheapest(spec, plan, monkeypatch):
    """Free to choose (any_of) and told each option's runtime, SkyPilot's own cost model over its
    own catalog picks the planner's top option, or one priced the same."""
    task, _ = build_task(request_of(spec, plan))
    hours = {(o.offer.provider, o.offer.region, o.offer.instance_type, o.spot): o.expected_hours for o in plan.options}
    task.set_resources(set(task.resources))
    task.set_time_estimator(lambda r: 3600 * hours[(str(r.cloud).lower(), r.region, r.instance_type, r.use_spot)])
    best = _optimize(task, monkeypatch)
    sky_cost = Decimal(str(best.get_cost(3600 * hours[(str(best.cloud).lower(), best.region, best.instance_type, best.use_spot)])))
    assert abs(sky_cost - plan.best.expected_cost) < Decimal("0.01")
    # Without our runtimes SkyPilot assumes one hour everywhere and picks the cheapest hourly
    # price instead, which is why the order is pinned in the launched task.
    task.set_time_estimator(None)
    task.time_estimator_func = None
    hourly = _optimize(task, monkeypatch)
    assert (str(hourly.cloud).lower(), hourly.instance_type) == ("gcp", "a2-highgpu-1g")


def test_with_the_real_planner_the_dry_run_launches_its_top_option_first(tmp_path, monkeypatch):
    """The planner over the same catalog files sky reads, on an 8B QLoRA job."""
    from orchestrator.planner import make_plan

    path = tmp_path / "spec.yaml"
    path.write_text("name: big\nmodel: meta-llama/Llama-3.1-8B\nmethod: qlora\n"
                    "data: {examples: 20000, tokens_per_example: 512}\n")
    big = load_spec(path)
    plan = make_plan(big, OFFERS)
    assert plan.best is not None
    config = yaml.safe_load(render_task_yaml(request_of(big, plan, "big-1", state=tmp_path)))
    task = sky.Task.from_yaml_config(config)
    first = task.resources[0]
    top = plan.best
    assert (str(first.cloud).lower(), first.region, first.instance_type, first.use_spot,
            first.accelerators) == (top.offer.provider, top.offer.region, top.offer.instance_type, top.spot,
                                    {top.offer.gpu: top.offer.gpu_count})
    best = _optimize(task, monkeypatch)
    assert (str(best.cloud).lower(), best.region, best.instance_type) == (
        top.offer.provider, top.offer.region, top.offer.instance_type)
    # Free to choose among the same options, told the planner's hours, SkyPilot's cost model
    # lands on the same price (several regions can tie: equally priced is the claim).
    hours = {(o.offer.provider, o.offer.region, o.offer.instance_type, o.spot): o.expected_hours for o in plan.options}
    task.set_resources(set(task.resources))
    task.set_time_estimator(lambda r: 3600 * hours[(str(r.cloud).lower(), r.region, r.instance_type, r.use_spot)])
    free = _optimize(task, monkeypatch)
    runtime = 3600 * hours[(str(free.cloud).lower(), free.region, free.instance_type, free.use_spot)]
    assert abs(Decimal(str(free.get_cost(runtime))) - top.expected_cost) < Decimal("0.01")


def test_run_scripts_are_valid_bash_and_end_with_their_status_not_an_exit():
    import subprocess

    from launch.sky_scripts import run_commands
    from launch.sky_store import JobStore

    for mounted in (True, False):
        script = run_commands(JobStore("s3://b/job-1", mounted))
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
        assert "torch.distributed.run" in script
        assert script.rstrip().splitlines()[-1] == "(exit $rc)"
        assert not [line for line in script.splitlines() if line.strip().startswith("exit")]


def test_the_event_log_tells_a_preemption_from_a_crash(tmp_path):
    import subprocess
    import sys

    from contract.events import EventLog

    log_path = tmp_path / "events.jsonl"
    log = EventLog(log_path, attempt=1)
    log.emit("start", resumed_from_step=None)
    log.emit("preempted", step=3, signal="SIGTERM")
    log.close()
    ask = [sys.executable, "-m", "contract.events", "ended-preempted", str(log_path)]
    assert subprocess.run(ask).returncode == 0
    log = EventLog(log_path, attempt=2)
    log.emit("error", message="boom", kind="crash")
    log.close()
    assert subprocess.run(ask).returncode == 1


def _nodes(placement, n):
    from dataclasses import replace

    return replace(placement, num_nodes=n, price_per_hour=placement.node_price_per_hour * n)


def test_a_placement_on_several_nodes_is_a_task_of_that_many_nodes_of_the_same_resources(spec, plan):
    """num_nodes goes in the task, not the resources: SkyPilot provisions that many instances of the
    chosen resource and runs setup and run on each (sky/task.py, num_nodes)."""
    one = build_task(request_of(spec, plan))[0]
    request = request_of(spec, plan)
    request = LaunchRequest(**{**request.__dict__, "placements": tuple(_nodes(p, 4) for p in request.placements)})
    config = yaml.safe_load(render_task_yaml(request))
    assert config["num_nodes"] == 4
    task = sky.Task.from_yaml_config(dict(config))  # SkyPilot's schema and validation
    assert task.num_nodes == 4 and task.to_yaml_config()["num_nodes"] == 4
    assert [r.to_yaml_config() for r in task.resources] == [r.to_yaml_config() for r in one.resources]
    assert task.get_required_cloud_features() >= {sky.clouds.CloudImplementationFeatures.MULTI_NODE}
    assert one.num_nodes == 1


def test_one_task_has_one_node_count_so_options_on_another_are_skipped_with_the_reason(spec, plan):
    placements = [o.placement for o in plan.options]
    mixed = (_nodes(placements[0], 2), placements[1], _nodes(placements[2], 2))
    request = request_of(spec, plan)
    task, skipped = build_task(LaunchRequest(**{**request.__dict__, "placements": mixed}))
    assert task.num_nodes == 2 and len(task.resources) == 2
    assert [(s.placement, s.reason) for s in skipped] == [(placements[1], "spans 1 node; this task runs on 2")]


def test_the_backend_prices_attempts_only_from_the_placements_its_task_runs(spec, plan, tmp_path, monkeypatch):
    from sky import global_user_state, skypilot_config
    from sky.clouds.cloud import CloudCapability

    from launch.skypilot import SkyPilotBackend

    workspace = skypilot_config.get_active_workspace()
    before = {c: [str(x) for x in global_user_state.get_cached_enabled_clouds(c, workspace)] for c in CloudCapability}
    global_user_state.set_enabled_clouds(["AWS", "GCP", "Lambda"], CloudCapability.COMPUTE, workspace)
    global_user_state.set_enabled_clouds(["AWS", "GCP"], CloudCapability.STORAGE, workspace)
    placements = [o.placement for o in plan.options]
    mixed = (_nodes(placements[0], 2), placements[1])
    request = request_of(spec, plan, state=tmp_path)
    request = LaunchRequest(**{**request.__dict__, "placements": mixed})
    backend = SkyPilotBackend(tmp_path)
    launched = []
    monkeypatch.setattr(backend.sdk, "request", lambda what, fn, task, **kw: launched.append(task) or ([7], None))
    try:
        external_id = backend.submit(request)
    finally:
        for capability, clouds in before.items():
            global_user_state.set_enabled_clouds(clouds, capability, workspace)
    assert launched[0].num_nodes == 2
    state = backend._load(external_id)
    assert [p["num_nodes"] for p in state["placements"]] == [2]
