"""Any Hugging Face model id: the architecture from its config.json (hub cache, or fetched with
huggingface_hub from a Hub on 127.0.0.1), instruct variants on their base, and every shipped spec plans."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from contract.spec import load_spec
from hub_server import FakeHub
from orchestrator.architectures import UnknownModelError, model_tokenizer, resolve_architecture
from orchestrator.catalog import load_managed_prices, load_offers
from orchestrator.planner import make_plan

REPO = Path(__file__).resolve().parents[1]
HUB_FIXTURE = REPO / "tests" / "fixtures" / "hub"
SHIPPED_SPECS = sorted([*(REPO / "recipes" / "configs").glob("*.yaml"), *(REPO / "examples").glob("*.yaml")])
QWEN_7B_PARAMS = 7_615_616_512   # Qwen2.5-7B's model card: 7.61B


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """An empty Hugging Face home for this test, offline (conftest sets HF_HUB_OFFLINE=1)."""
    home = tmp_path / "hf"
    (home / "hub").mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return home


@pytest.fixture
def hub_cache(hf_home):
    """The committed hub-cache fixture (Qwen/Qwen2.5-7B-Instruct's config.json) in HF_HOME/hub."""
    shutil.copytree(HUB_FIXTURE, hf_home / "hub", dirs_exist_ok=True)
    return hf_home / "hub"


def cache_model(hub: Path, repo_id: str, files: dict[str, str], revision: str = "f" * 40) -> Path:
    """A model in huggingface_hub's cache layout: models--Org--Name/refs/main -> snapshots/<rev>/."""
    root = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = root / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(revision)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    return snapshot


def test_an_instruct_model_resolves_offline_from_the_hub_cache(hub_cache):
    arch = resolve_architecture("Qwen/Qwen2.5-7B-Instruct")
    assert arch.name == "Qwen/Qwen2.5-7B-Instruct"          # read from the cached config.json, not the table
    assert (arch.hidden, arch.layers, arch.heads, arch.kv_heads, arch.vocab) == (3584, 28, 28, 4, 152064)
    assert arch.qkv_bias and not arch.tied_embeddings
    assert arch.params == QWEN_7B_PARAMS


def test_the_shipped_qwen_spec_plans_from_the_hub_cache(hub_cache):
    spec = load_spec(REPO / "recipes" / "configs" / "qwen2.5-7b-lora.yaml")
    plan = make_plan(spec, load_offers(include_sky=False), load_managed_prices())
    assert plan.model_name == "Qwen/Qwen2.5-7B-Instruct" and plan.params == QWEN_7B_PARAMS


@pytest.mark.parametrize("variant, base", [
    ("Qwen/Qwen2.5-3B-Instruct", "Qwen/Qwen2.5-3B"),
    ("google/gemma-2-9b-it", "google/gemma-2-9b"),
    ("meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-1B"),
    ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B"),
])
def test_without_the_hub_instruct_and_chat_variants_resolve_to_their_base(hf_home, variant, base):
    assert resolve_architecture(variant) == resolve_architecture(base)


def test_any_model_in_the_hub_cache_plans_and_a_config_there_wins_over_the_table(hf_home):
    config = {"model_type": "llama", "hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 16,
              "num_key_value_heads": 4, "intermediate_size": 4096, "vocab_size": 32000, "tie_word_embeddings": True}
    cache_model(hf_home / "hub", "acme/Wonder-0.2B", {"config.json": json.dumps(config)})
    assert resolve_architecture("acme/Wonder-0.2B").hidden == 1024
    # The same id as a table entry: the cached config.json is what is planned.
    cache_model(hf_home / "hub", "meta-llama/Llama-3.2-1B", {"config.json": json.dumps(config)})
    assert resolve_architecture("meta-llama/Llama-3.2-1B").layers == 8


def test_an_unknown_id_offline_says_why_and_names_the_choices(hf_home):
    with pytest.raises(UnknownModelError) as e:
        resolve_architecture("acme/Nothing-7B")
    message = str(e.value)
    assert "HF_HUB_OFFLINE" in message and "not in the hub cache" in message and "Qwen2.5-7B" in message
    assert "\n" not in message


def test_a_cached_tokenizer_is_found_beside_the_config(hf_home):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"hi": 0, "[UNK]": 1}, unk_token="[UNK]"))
    snapshot = cache_model(hf_home / "hub", "acme/Tok-1B", {"tokenizer_config.json": json.dumps({"eos_token": "[UNK]"})})
    tok.save(str(snapshot / "tokenizer.json"))
    found = model_tokenizer("acme/Tok-1B")
    assert found is not None and found.source == str(snapshot) and found.eos_token_id == 1
    assert model_tokenizer("acme/Not-Cached") is None


@pytest.mark.parametrize("spec_path", SHIPPED_SPECS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_spec_plans_offline_with_an_empty_hub_cache(hf_home, spec_path):
    plan = make_plan(load_spec(spec_path), load_offers(include_sky=False), load_managed_prices())
    assert plan.options and plan.total_tokens > 0


# --- through huggingface_hub's real download path, against a Hub on 127.0.0.1 -----------------

QWEN_CONFIG = next(HUB_FIXTURE.glob("models--Qwen--Qwen2.5-7B-Instruct/snapshots/*/config.json")).read_bytes()


def plan_online(spec: Path, hub: FakeHub, home: Path, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HOME": str(home), "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
                   "TRANSFORMERS_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", **env}
    if "HF_TOKEN" not in env:
        environment.pop("HF_TOKEN", None)   # a token on the machine running the tests must not leak in
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "plan", str(spec), "--json"], env=environment,
                          capture_output=True, text=True, timeout=120)


def spec_for(tmp_path: Path, model: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(f"name: hub\nmodel: {model}\nmethod: lora\ndata: {{examples: 100, tokens_per_example: 256}}\n"
                    f"seq_len: 256\n")
    return path


def test_a_model_not_cached_is_fetched_once_with_hf_hub_download_then_read_from_the_cache(tmp_path):
    with FakeHub({"acme/Qwen-Like-7B": {"config.json": QWEN_CONFIG}}) as hub:
        first = plan_online(spec_for(tmp_path, "acme/Qwen-Like-7B"), hub, tmp_path / "hf")
        assert first.returncode == 0, first.stderr
        assert json.loads(first.stdout)["model"] == {"name": "acme/Qwen-Like-7B", "params": QWEN_7B_PARAMS}
        assert any(path.endswith("/acme/Qwen-Like-7B/resolve/main/config.json") for _, path, _ in hub.requests)
        cached = list((tmp_path / "hf" / "hub" / "models--acme--Qwen-Like-7B" / "snapshots").glob("*/config.json"))
        assert len(cached) == 1
        asked = len(hub.requests)
        again = plan_online(spec_for(tmp_path, "acme/Qwen-Like-7B"), hub, tmp_path / "hf")
        assert again.returncode == 0 and len(hub.requests) == asked   # the cache answered; the Hub was not asked


def test_a_gated_model_is_fetched_with_hf_token_and_the_token_is_never_printed(tmp_path):
    token = "hf_test_secret_0123456789"
    with FakeHub({"acme/Gated-7B": {"config.json": QWEN_CONFIG}}, gated={"acme/Gated-7B": token}) as hub:
        refused = plan_online(spec_for(tmp_path, "acme/Gated-7B"), hub, tmp_path / "no-token")
        assert refused.returncode == 2 and refused.stdout == ""
        assert refused.stderr.count("\n") == 1 and "gated" in refused.stderr and "HF_TOKEN" in refused.stderr
        allowed = plan_online(spec_for(tmp_path, "acme/Gated-7B"), hub, tmp_path / "with-token", HF_TOKEN=token)
        assert allowed.returncode == 0, allowed.stderr
        assert hub.requests[-1][2] == f"Bearer {token}"
        assert token not in allowed.stdout + allowed.stderr + refused.stderr


def test_a_hub_that_cannot_be_reached_falls_back_to_the_table_and_says_so_for_unknown_ids(tmp_path):
    with FakeHub({}) as hub:
        url = hub.url
    # Nothing listens there any more: connection refused on 127.0.0.1, no other network.
    down = type("Down", (), {"url": url})()
    known = plan_online(spec_for(tmp_path, "meta-llama/Llama-3.1-8B"), down, tmp_path / "hf")
    assert known.returncode == 0, known.stderr
    assert json.loads(known.stdout)["model"]["name"] == "meta-llama/Llama-3.1-8B"
    unknown = plan_online(spec_for(tmp_path, "acme/Nothing-7B"), down, tmp_path / "hf")
    assert unknown.returncode == 2 and "cannot be reached" in unknown.stderr and "Traceback" not in unknown.stderr
