"""Model sizes come from the architecture: built-in table, local config.json, unknown names."""
import json

import pytest

from contract.errors import UserError
from orchestrator.architectures import LINEAR_MODULES, UnknownModelError, builtin_names, resolve_architecture


def test_parameter_counts_match_the_anchor_models():
    # The anchors' own counts (docs/anchors/h100-naive-baseline.json): 8.03e9 and 1.236e9.
    assert resolve_architecture("meta-llama/Llama-3.1-8B").params == pytest.approx(8.03e9, rel=0.001)
    assert resolve_architecture("meta-llama/Llama-3.2-1B").params == pytest.approx(1.236e9, rel=0.001)


@pytest.mark.parametrize("name, billions", [
    ("Llama-3.2-3B", 3.21), ("llama-3.1-70b", 70.55), ("Llama-3.3-70B-Instruct", 70.55),
    ("meta-llama/Llama-3.1-405B", 405.85), ("Qwen/Qwen2.5-0.5B", 0.494), ("qwen2.5-1.5b", 1.54),
    ("Qwen2.5-3B", 3.09), ("Qwen/Qwen2.5-7B", 7.62), ("Qwen2.5-14B", 14.77), ("Qwen2.5-32B", 32.76),
    ("Qwen2.5-72B", 72.71), ("mistral-7b", 7.25), ("google/gemma-2-2b", 2.61), ("gemma-2-9b", 9.24),
    ("gemma-2-27b", 27.23), ("phi-3-mini", 3.82), ("phi-3-small", 7.39), ("phi-3-medium", 13.96),
])
def test_builtin_table_covers_the_published_sizes(name, billions):
    # Published sizes from the model cards, to the precision of the computed figure.
    assert resolve_architecture(name).params / 1e9 == pytest.approx(billions, rel=0.01)


def test_names_are_case_insensitive_with_or_without_organisation():
    a = resolve_architecture("META-LLAMA/LLAMA-3.1-8B")
    assert a is resolve_architecture("llama-3.1-8b") is resolve_architecture("Llama-3.1-8B") is resolve_architecture("llama-8b")


def test_tiny_llama_mirrors_the_recipe_architecture():
    from recipes.tiny import ARCHITECTURE

    tiny = resolve_architecture("tiny-llama")
    assert (tiny.hidden, tiny.intermediate, tiny.layers, tiny.heads, tiny.kv_heads, tiny.vocab, tiny.tied_embeddings) == (
        ARCHITECTURE["hidden_size"], ARCHITECTURE["intermediate_size"], ARCHITECTURE["num_hidden_layers"],
        ARCHITECTURE["num_attention_heads"], ARCHITECTURE["num_key_value_heads"], ARCHITECTURE["vocab_size"],
        ARCHITECTURE["tie_word_embeddings"])


def test_tiny_llama_count_equals_the_built_model():
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    from recipes.tiny import ARCHITECTURE

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**ARCHITECTURE))
    assert resolve_architecture("tiny-llama").params == sum(p.numel() for p in model.parameters())


def test_local_config_json_is_read_from_a_directory_or_the_file(tmp_path):
    config = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
              "intermediate_size": 8192, "vocab_size": 128256, "tie_word_embeddings": True, "model_type": "llama"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    from_dir = resolve_architecture(str(tmp_path))
    assert from_dir.params == resolve_architecture("llama-3.2-1b").params
    assert resolve_architecture(str(tmp_path / "config.json")).params == from_dir.params


def test_config_json_missing_a_size_field_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(UserError, match="num_attention_heads"):
        resolve_architecture(str(tmp_path))


def test_unknown_model_is_one_line_naming_it_and_the_choices():
    with pytest.raises(UnknownModelError) as e:
        resolve_architecture("acme/NotAModel-3B")
    message = str(e.value)
    assert "acme/NotAModel-3B" in message and "Llama-3.1-8B" in message and "\n" not in message


def test_lora_params_count_r_times_in_plus_out_per_targeted_projection():
    llama = resolve_architecture("llama-3.2-1b")
    per_layer = 16 * ((2048 + 2048) * 2 + (2048 + 512) * 2 + (2048 + 8192) * 3)
    assert llama.lora_params(16, "all-linear") == 16 * per_layer
    assert llama.lora_params(16, ["q_proj", "v_proj"]) == 16 * 16 * ((2048 + 2048) + (2048 + 512))
    assert set(llama.projection_shapes()) == set(LINEAR_MODULES)


def test_every_builtin_resolves_by_its_own_name():
    for name in builtin_names():
        assert resolve_architecture(name).name == name
