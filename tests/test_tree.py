"""Selection rules, split/combine and the parameter report."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import tree


def _params():
    return {
        "embed": {"embedding": jnp.ones((10, 4))},
        "layers_0": {
            "attn": {"q_proj": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)},
                     "v_proj": {"kernel": jnp.ones((4, 2))}},
            "mlp": {"up_proj": {"kernel": jnp.ones((4, 8))}},
        },
    }


def test_flatten_paths_are_slash_joined_and_unflatten_inverts():
    flat = tree.flatten(_params())
    assert "layers_0/attn/q_proj/kernel" in flat
    assert len(flat) == 5
    again = tree.flatten(tree.unflatten(flat))
    assert again.keys() == flat.keys()


def test_rules_fullmatch_and_first_match_wins():
    wide = jpeft.Rule(r".*/kernel", rank=2)
    narrow = jpeft.Rule(r".*/q_proj/kernel", rank=4)
    chosen = tree.assign(_params(), [narrow, r".*/(v|up)_proj/kernel"])
    assert chosen["layers_0/attn/q_proj/kernel"] is narrow
    assert set(chosen) == {"layers_0/attn/q_proj/kernel", "layers_0/attn/v_proj/kernel",
                           "layers_0/mlp/up_proj/kernel"}
    # fullmatch: a pattern matching only part of a path selects nothing.
    with pytest.raises(jpeft.RuleError):
        tree.assign(_params(), r"q_proj")
    # An earlier rule that takes every leaf leaves the later one unused: an error.
    with pytest.raises(jpeft.RuleError, match="matched no parameter"):
        tree.assign(_params(), [wide, narrow])


def test_unused_rule_error_names_rule_and_shows_real_paths():
    with pytest.raises(jpeft.RuleError) as info:
        tree.assign(_params(), [r".*/q_proj/kernel", r".*/qq_proj/kernel"])
    message = str(info.value)
    assert ".*/qq_proj/kernel" in message
    assert "layers_0/attn/q_proj/kernel" in message


def test_predicate_rules_see_path_and_leaf():
    chosen = tree.assign(_params(), lambda path, leaf: leaf.ndim == 1)
    assert list(chosen) == ["layers_0/attn/q_proj/bias"]


def test_bad_rules_are_clear_errors():
    with pytest.raises(jpeft.RuleError, match="not a valid regex"):
        jpeft.Rule(r"(unclosed")
    with pytest.raises(jpeft.RuleError, match="regex string or"):
        jpeft.Rule(42)
    with pytest.raises(jpeft.RuleError, match="no target rules"):
        tree.as_rules([])


def test_split_combine_round_trip_is_exact():
    params = jax.tree_util.tree_map(
        lambda x: jax.random.normal(jax.random.key(x.size), x.shape), _params())
    picked, rest = tree.split(params, r".*/kernel")
    assert all(p.endswith("kernel") for p in tree.flatten(picked))
    assert not any(p.endswith("kernel") for p in tree.flatten(rest))
    back = tree.combine(rest, picked)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert tree.flatten(tree.without(params, picked)).keys() == tree.flatten(rest).keys()


def test_param_report_counts_added_and_replaced_leaves():
    params = _params()
    total = 40 + 16 + 4 + 8 + 32
    lora = jpeft.lora(rank=2, alpha=4, targets=r".*/q_proj/kernel")
    report = jpeft.param_report(params, lora.init(jax.random.key(0), params))
    assert report.trainable == 4 * 2 + 2 * 4
    assert report.total == total + report.trainable
    assert report.trainable_bytes == report.trainable * 4
    full = jpeft.full()
    report = jpeft.param_report(params, full.init(jax.random.key(0), params))
    assert (report.trainable, report.total, report.frozen_bytes) == (total, total, 0)
    assert "trainable%: 100.0000" in str(report)
