"""Weighted combination of LoRA adapters, checked against Hugging Face PEFT's ``add_weighted_adapter``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.io.hf import load_hf
from jpeft.io.peft import module_of, save_peft
from jpeft.methods.combine import combine_adapters, merge_tensors

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils import merge_utils  # noqa: E402


def random_adapter(method, params, seed, std=0.3):
    """Every factor random (numpy: no random-number program to compile)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(method.init, jax.random.key(0), params)
    return jax.tree.map(lambda x: jnp.asarray(std * rng.normal(size=x.shape), x.dtype), shapes)


SETTINGS = {
    "a": dict(rank=4, alpha=8, targets=[r".*/(q|v)_proj/kernel", r"embed_tokens/embedding"]),
    "b": dict(rank=4, alpha=6, use_rslora=True, targets=r".*/(q|k|up)_proj/kernel"),
    "c": dict(rank=2, alpha=3, targets=r".*/(v|up)_proj/kernel"),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama in both libraries and three LoRA adapters: a, b (rank 4) and c (rank 2), loaded into PEFT."""
    torch.manual_seed(0)
    # Every projection a 32 x 32 matrix: combining compiles once per combination type for all of them.
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    base = tmp_path_factory.mktemp("base")
    transformers.LlamaForCausalLM(config).save_pretrained(base, safe_serialization=True)
    model, params = load_hf(base)
    methods = {name: jpeft.lora(**settings, model=model) for name, settings in SETTINGS.items()}
    adapters = {n: (m, random_adapter(m, params, 10 + i)) for i, (n, m) in enumerate(methods.items())}
    torch_model = transformers.LlamaForCausalLM.from_pretrained(base).eval()
    for i, (name, (method, adapter)) in enumerate(adapters.items()):
        folder = tmp_path_factory.mktemp(f"adapter_{name}")
        save_peft(folder, model, method, params, adapter)
        if i == 0:
            torch_model = peft.PeftModel.from_pretrained(torch_model, folder, adapter_name=name)
        else:
            torch_model.load_adapter(folder, adapter_name=name)
    return model, params, adapters, torch_model


def peft_deltas(torch_model, name):
    """``{module: delta weight}`` of PEFT adapter ``name`` (torch layout: Linear (out, in), Embedding (vocab, dim))."""
    out = {}
    for module_name, module in torch_model.named_modules():
        if isinstance(module, LoraLayer) and (name in module.lora_A or name in module.lora_embedding_A):
            out[module_name.removeprefix("base_model.model.")] = module.get_delta_weight(name).detach().numpy()
    return out


def jpeft_deltas(model, params, method, adapter):
    out = {}
    for path, leaf in jpeft.tree.flatten(method.apply(params, adapter)).items():
        if isinstance(leaf, jpeft.LoraWeight):
            delta = np.asarray(leaf.scale * leaf.delta())
            out[module_of(model, path)] = delta if model.layouts()[path].kind == "table" else delta.T
    return out


CASES = [  # (combination_type, adapters, weights, options): every type, each option at least once
    ("linear", "ab", [0.7, -0.4], {}),
    ("ties", "ab", [1.0, 0.6], {"density": 0.5, "majority_sign_method": "frequency"}),
    ("magnitude_prune", "ab", [1.0, -0.6], {"density": 0.3}),
    ("dare_linear", "ab", [0.5, 1.2], {"density": 1.0, "key": jax.random.key(0)}),  # DARE's random masks: see below
    ("dare_ties", "ab", [0.5, 1.2], {"density": 1.0, "key": jax.random.key(0)}),
    ("cat", "abc", [0.8, 1.0, 1.5], {}),  # ranks 4, 4 and 2: exactly the weighted sum
    ("svd", "abc", [0.8, 1.0, -1.5], {}),  # rank 4 (the largest): a truncation
    ("ties_svd", "ab", [1.0, 0.6], {"density": 0.5, "svd_rank": 6, "svd_clamp": 0.95}),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_combination_equals_peft(setup, case):
    model, params, adapters, torch_model = setup
    combination_type, names, weights, options = case
    name = f"mix_{CASES.index(case)}"
    peft_options = {k: v for k, v in options.items() if k != "key"}
    with pytest.warns(UserWarning) if options.get("density") == 1.0 else _nothing():
        torch_model.add_weighted_adapter(list(names), weights, name, combination_type=combination_type, **peft_options)
    want = peft_deltas(torch_model, name)
    method, adapter = combine_adapters(params, [adapters[n] for n in names], weights, combination_type,
                                       model=model, **options)
    got = jpeft_deltas(model, params, method, adapter)
    assert sorted(got) == sorted(want) and got
    for module in want:
        scale = np.abs(want[module]).max()
        np.testing.assert_allclose(got[module], want[module], rtol=1e-4, atol=2e-5 * scale, err_msg=module)
    ranks = {int(leaf.a.shape[-1]) for leaf in jpeft.tree.flatten(method.apply(params, adapter)).values()
             if isinstance(leaf, jpeft.LoraWeight)}
    if combination_type.endswith("svd"):
        assert ranks == {options.get("svd_rank", 4)}
    elif combination_type != "cat":
        assert ranks == {4}


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize(  # the sign method is only used by ties and dare_ties
    "combination, sign_method",
    [("linear", "total"), ("magnitude_prune", "total"), ("dare_linear", "total"),
     ("ties", "total"), ("ties", "frequency"), ("dare_ties", "total"), ("dare_ties", "frequency")],
)
def test_merge_tensors_equals_peft_merge_utils(combination, sign_method, monkeypatch):
    """Tensor by tensor against PEFT's own functions; DARE's keep-masks are the ones PEFT drew."""
    rng = np.random.default_rng(3)
    tensors = [rng.normal(size=(5, 7)).astype(np.float32) for _ in range(3)]
    weights = [0.7, -1.3, 0.4]
    drawn = []
    real_bernoulli = torch.bernoulli

    def recording_bernoulli(p, *args, **kwargs):
        mask = real_bernoulli(p, *args, **kwargs)
        drawn.append(mask.numpy().copy())
        return mask

    monkeypatch.setattr(torch, "bernoulli", recording_bernoulli)
    peft_fn = getattr(merge_utils, combination if combination != "linear" else "task_arithmetic")
    kwargs = {} if combination == "linear" else {"density": 0.6}
    if combination in ("ties", "dare_ties"):
        kwargs["majority_sign_method"] = sign_method
    want = peft_fn([torch.tensor(t) for t in tensors], torch.tensor(weights), **kwargs).numpy()
    got = merge_tensors(tensors, weights, combination, masks=drawn or None, **kwargs)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_stacked_layers_combine_layer_by_layer(setup):
    """Pruning counts one layer's tensor at a time, as PEFT's per-module view does."""
    model, params, adapters, _ = setup
    stacked_model = model.replace(scan_layers=True)
    stacked = jpeft.stack.stack_layers(params, 2)
    pairs = [(jpeft.lora(**SETTINGS[n], model=stacked_model), jpeft.stack.stack_layers(adapters[n][1], 2))
             for n in "ab"]
    options = dict(density=0.5, majority_sign_method="frequency", model=None)  # as a case above: compiled once
    method, adapter = combine_adapters(stacked, pairs, [1.0, 0.6], "ties", **options)
    want_method, want_adapter = combine_adapters(params, [adapters["a"], adapters["b"]], [1.0, 0.6], "ties", **options)
    got = jpeft.stack.unstack_layers(adapter, 2)
    for path, leaf in jpeft.tree.flatten(want_adapter).items():
        np.testing.assert_allclose(jpeft.tree.flatten(got)[path], leaf, rtol=1e-6, atol=1e-7, err_msg=path)


def test_dare_masks_and_bank(setup):
    model, params, adapters, _ = setup
    # DARE keeps each entry with probability density and rescales it by 1 / density; a key makes it reproducible.
    dare = lambda seed: np.asarray(merge_tensors([jnp.ones((200, 50))], [1.0], "dare_linear", density=0.25,
                                                 key=jax.random.key(seed)))
    kept = dare(1)
    assert set(np.unique(kept)) == {0.0, 4.0} and 0.22 < (kept > 0).mean() < 0.28
    np.testing.assert_array_equal(dare(1), kept)
    assert (dare(2) != kept).any()
    # A bank adds the combination as a new adapter, which works like any LoRA adapter: cat merges to exactly the
    # weighted sum of the three.
    bank = jpeft.AdapterBank({n: adapters[n] for n in "abc"})
    bigger = bank.add_weighted(params, "abc", list("abc"), [0.8, 1.0, 1.5], "cat", model=model)
    assert bigger.names == ("a", "abc", "b", "c") and bigger["abc"][0].name == "lora"
    want = params
    for name, weight in zip("abc", [0.8, 1.0, 1.5]):
        method, adapter = adapters[name]
        want = method.merge(want, _scaled(adapter, weight))
    want = jpeft.tree.flatten(want)
    for path, got in jpeft.tree.flatten(bigger.merge(params, "abc")).items():
        np.testing.assert_allclose(got, want[path], rtol=1e-5, atol=1e-6, err_msg=path)


def _scaled(adapter, weight):
    """A LoRA adapter whose delta is ``weight`` times the original's (its ``b`` factors scaled)."""
    flat = jpeft.tree.flatten(adapter)
    return jpeft.tree.unflatten({path: leaf * weight if path.endswith("/b") else leaf for path, leaf in flat.items()})


def test_bad_input_is_one_clear_error(setup):
    _, params, adapters, _ = setup
    ab = [adapters["a"], adapters["b"]]
    with pytest.raises(ValueError, match="1 weights for 2 adapters"):
        combine_adapters(params, ab, [1.0], "linear")
    with pytest.raises(ValueError, match="weights must be finite numbers, got nan"):
        combine_adapters(params, ab, [1.0, float("nan")], "linear")
    with pytest.raises(ValueError, match="needs density="):
        combine_adapters(params, ab, [1.0, 1.0], "ties")
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        combine_adapters(params, ab, [1.0, 1.0], "ties", density=1.5)
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        combine_adapters(params, ab, [1.0, 1.0], "magnitude_prune", density=0)
    with pytest.raises(ValueError, match="density applies to"):
        combine_adapters(params, ab, [1.0, 1.0], "cat", density=0.5)
    with pytest.raises(ValueError, match="must be one of"):
        combine_adapters(params, ab, [1.0, 1.0], "average")
    with pytest.raises(ValueError, match="give key="):
        combine_adapters(params, ab, [1.0, 1.0], "dare_linear", density=0.5)
    with pytest.raises(ValueError, match=r"ranks \[2, 4\] at '.*v_proj/kernel'; 'linear' .* use 'cat' or 'svd'"):
        combine_adapters(params, [adapters["a"], adapters["c"]], [1.0, 1.0], "linear")
    with pytest.raises(ValueError, match="svd_rank 40 is larger than the weight"):
        combine_adapters(params, ab, [1.0, 1.0], "svd", svd_rank=40)
    ia3 = jpeft.ia3()
    with pytest.raises(ValueError, match="adapter 1 \\(ia3\\) is not a LoRA adapter"):
        combine_adapters(params, [adapters["a"], (ia3, ia3.init(None, params))], [1.0, 1.0], "cat")
    small = jax.eval_shape(jpeft.models.llama.model(jpeft.models.llama.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=48, num_layers=2, num_heads=4)).init, jax.random.key(0))
    with pytest.raises(ValueError, match="adapter 0 \\(lora\\) does not fit these parameters"):
        combine_adapters(small, ab, [1.0, 1.0], "cat")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_rebased_adapters_are_refused_with_the_conversion(init):
    """A PiSSA / OLoRA adapter goes with its residual base; over the original one it would combine into another model."""
    params = {"dense": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(6, 5)), jnp.float32)}}
    rebased = jpeft.lora(rank=2, targets=r"dense/kernel", init=init)
    plain = jpeft.lora(rank=2, targets=r"dense/kernel")
    adapters = {"p": (rebased, rebased.init(jax.random.key(0), params)), "q": (plain, random_adapter(plain, params, 1))}
    with pytest.raises(ValueError, match=r"combine_adapters: adapter 'p'.*rebased.*as_plain_lora"):
        combine_adapters(params, adapters, [1.0, 1.0], "cat")
