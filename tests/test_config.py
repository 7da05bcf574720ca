"""dsquant.config.ModelConfig: one rule per hyper-parameter that configs spell several ways."""

from __future__ import annotations

import pytest

from dsq.dsquant.config import ModelConfig
from dsq.dsquant.errors import InputError

BASE = {"model_type": "llama", "hidden_size": 256, "num_attention_heads": 8, "num_hidden_layers": 4}


def test_head_dim_and_kv_heads():
    c = ModelConfig.from_dict(BASE)
    assert (c.head_dim, c.head_dim_given, c.n_kv_heads) == (32, False, 8)  # MHA when kv heads are not given
    c = ModelConfig.from_dict(dict(BASE, head_dim=64, num_key_value_heads=2))  # Qwen3 states a wider head
    assert (c.head_dim, c.head_dim_given, c.n_kv_heads) == (64, True, 2)
    assert ModelConfig.from_dict({"model_type": "llama"}).head_dim is None


def test_one_rope_merge_rule():
    assert ModelConfig.from_dict(BASE).rope == {"rope_theta": 10000.0, "rope_type": "default"}
    old = ModelConfig.from_dict(dict(BASE, rope_theta=5e5, rope_scaling={"type": "linear", "factor": 4.0})).rope
    assert old == {"type": "linear", "factor": 4.0, "rope_theta": 5e5, "rope_type": "linear"}
    both = ModelConfig.from_dict(dict(
        BASE, rope_scaling={"type": "yarn", "factor": 2.0, "beta_fast": 32},
        rope_parameters={"rope_type": "yarn", "factor": 40.0, "rope_theta": 1e4},
    )).rope
    # transformers 5's rope_parameters wins key by key; rope_scaling fills what it lacks
    assert (both["factor"], both["beta_fast"], both["rope_theta"], both["rope_type"]) == (40.0, 32, 1e4, "yarn")


def test_experts_and_moe_layers():
    v3 = ModelConfig.from_dict(dict(BASE, model_type="deepseek_v3", n_routed_experts=8, first_k_dense_replace=1,
                                    n_shared_experts=1, num_experts_per_tok=2))
    assert (v3.n_experts, v3.n_shared_experts) == (8, 1)
    assert [v3.is_moe_layer(i) for i in range(4)] == [False, True, True, True]
    q = ModelConfig.from_dict(dict(BASE, model_type="qwen3_moe", num_local_experts=8, mlp_only_layers=[2],
                                   decoder_sparse_step=1))
    assert q.n_experts == 8 and [q.is_moe_layer(i) for i in range(4)] == [True, True, False, True]
    q2 = ModelConfig.from_dict(dict(BASE, num_experts=4, decoder_sparse_step=2))
    assert [q2.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    assert not any(ModelConfig.from_dict(BASE).is_moe_layer(i) for i in range(4))


@pytest.mark.parametrize("bad", [{"num_key_value_heads": "2"}, {"head_dim": 0}, {"num_local_experts": 1.5},
                                 {"mlp_only_layers": ["a"]}, {"num_key_value_heads": 3}])
def test_schema_violations_name_the_key(bad):
    key = next(iter(bad))
    with pytest.raises(InputError, match=key):
        ModelConfig.from_dict(dict(BASE, **bad), "some/config.json")
