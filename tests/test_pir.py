"""Importance-ranked sparse fine-tuning: the selection against a float64 PyTorch reference, the sparse adapter."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft import checkpoint, tree
from jpeft.io import load_hf
from jpeft.methods import registry, sparse
from jpeft.models import llama

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=True, attn_implementation="eager")
BATCHES = [np.random.default_rng(i).integers(0, 97, size=(2, 10)).astype(np.int32) for i in range(3)]


def _xent(model):
    def loss(params, tokens):
        logits, _ = model.forward(params, tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()
    return loss


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A small random transformers Llama (float64 copy) and the same model loaded by jpeft (unrolled layers:
    the fastest to compile; the sparse adapter's test moves it to stacked layers)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("pir_llama")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) / p.shape[-1] ** 0.5)
    hf.save_pretrained(folder, safe_serialization=True)
    model, params = load_hf(folder)
    return hf.double(), model, params


def _reference_scores(hf, kind: str) -> dict[str, np.ndarray]:
    """float64 scores of every decoder kernel, jpeft's per-layer paths and (in, out) layout."""
    import torch

    totals = {}
    for tokens in BATCHES[:2]:
        hf.zero_grad()
        ids = torch.tensor(tokens, dtype=torch.long)
        hf(ids, labels=ids).loss.backward()  # mean next-token cross-entropy, as _xent
        for name, p in hf.named_parameters():
            if not name.endswith("proj.weight"):
                continue
            _, _, i, block, proj, _ = name.split(".")
            w, g = p.detach().numpy().T, p.grad.numpy().T
            term = np.abs(w * g) if kind == "weight_gradient" else g * g
            key = f"layers_{i}/{block}/{proj}/kernel"
            totals[key] = totals.get(key, 0.0) + term
    return totals


@pytest.mark.parametrize("kind", ["weight_gradient", pytest.param("fisher", marks=pytest.mark.slow)])
def test_selection_equals_a_float64_reference(hf_pair, kind):
    hf, model, params = hf_pair
    ref = _reference_scores(hf, kind)
    scores = sparse.importance(params, _xent(model), BATCHES, r".*/kernel", score=kind, num_batches=2, model=model)
    assert set(scores) == set(ref)
    paths = sorted(ref)
    flat64 = np.concatenate([ref[p].reshape(-1) for p in paths])
    np.testing.assert_allclose(np.concatenate([np.asarray(scores[p]).reshape(-1) for p in paths]), flat64,
                               rtol=2e-3, atol=1e-6 * flat64.max())
    order = np.argsort(-flat64, kind="stable")
    # A budget near 500 where the float64 ranking has a clear cut: the entries on either side of it are apart by
    # ten times more than the float32 scores' relative error at the top (the selection is then the reference's,
    # not a coin toss between near-ties).
    got = np.concatenate([np.asarray(scores[p]).reshape(-1) for p in paths])
    top_error = np.max(np.abs(got - flat64)[order[:600]] / flat64[order[:600]])
    ratios = flat64[order[399:600]] / flat64[order[400:601]]
    budget = 400 + int(np.argmax(ratios))
    assert ratios.max() - 1 > 10 * top_error, (ratios.max(), top_error)
    want = np.sort(order[:budget])
    np.testing.assert_array_equal(sparse.top_entries(scores, budget), want)
    method = jpeft.pir(budget=budget, score=kind, score_batches=2, model=model).training.prepare(params, _xent(model),
                                                                                        iter(BATCHES))
    np.testing.assert_array_equal(method.saved_form(method.init(None, params))["indices"], want)
    # Per tensor: each kernel keeps its share of the budget, its own top entries (float64 reference).
    per = sparse.top_entries(scores, budget, "per_tensor")
    sizes = [ref[p].size for p in paths]
    offsets = np.cumsum([0, *sizes])
    for p, n, off in zip(paths, sizes, offsets):
        mine = per[(per >= off) & (per < off + n)] - off
        assert abs(len(mine) - budget * n / sum(sizes)) < 1
        ranked = np.sort(ref[p].reshape(-1))[::-1]
        # The kept entries are the reference's top ones: none scores below any entry left out (up to float32).
        kept = ref[p].reshape(-1)[mine]
        if len(mine) < n:
            assert kept.min() >= ranked[len(mine)] * (1 - 1e-3), p
        np.testing.assert_allclose(np.sort(kept)[::-1], ranked[:len(mine)], rtol=1e-3, err_msg=p)


def _stacked(model, params):
    """The same model and weights with stacked layers (numpy stacking: nothing to compile)."""
    names = [f"layers_{i}" for i in range(model.num_layers)]
    stacked = {k: v for k, v in params.items() if k not in names}
    stacked["layers"] = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *[params[n] for n in names])
    return llama.model(dataclasses.replace(model.config, scan_layers=True)), stacked


def test_sparse_adapter_trains_only_its_entries_and_saves_restores_and_merges_exactly(hf_pair, tmp_path):
    _, model, params = hf_pair
    budget = 300
    method = jpeft.pir(budget=budget, model=model).training.prepare(params, _xent(model), iter(BATCHES))
    adapter = method.init(None, params)
    loss = lambda a: _xent(model)(method.apply(params, a), BATCHES[0])  # noqa: E731
    grads = jax.jit(jax.grad(loss))(adapter)
    assert jax.tree.structure(grads) == jax.tree.structure({"values": 0}) and grads["values"].shape == (budget,)
    assert float(jnp.abs(grads["values"]).min()) > 0  # every chosen entry matters to the loss
    state = optax.adam(1e-3).init(adapter)
    assert sum(x.nbytes for x in jax.tree.leaves(state)) == 2 * 4 * budget + 4

    trained = {"values": jnp.asarray(np.random.default_rng(0).standard_normal(budget), jnp.float32)}
    saved = method.saved_form(trained)
    assert saved["indices"].dtype == jnp.int32 and saved["indices"].shape == (budget,)
    # merge against numpy: the candidates laid end to end (sorted per-layer paths), each += its value.
    indices, values = np.asarray(saved["indices"]), np.asarray(trained["values"])
    kernels = sorted(p for p in tree.flatten(params) if p.endswith("/kernel"))
    want = {p: np.array(tree.flatten(params)[p]) for p in kernels}
    sizes = np.cumsum([0] + [want[p].size for p in kernels])
    for i, v in zip(indices, values):
        t = np.searchsorted(sizes, i, side="right") - 1
        want[kernels[t]].reshape(-1)[i - sizes[t]] += v
    merged = tree.flatten(method.merge(params, trained))
    for path in kernels:
        np.testing.assert_array_equal(merged[path], want[path], err_msg=path)

    checkpoint.save_adapter(tmp_path / "pir", saved, metadata={"method": "pir"})
    unprepared = jpeft.pir(budget=budget, model=model)  # a new process: no scores, the indices come from the file
    like = jax.eval_shape(lambda p: unprepared.saved_form(unprepared.init(None, p)), params)
    restored, _ = checkpoint.restore_adapter(tmp_path / "pir", like=like, method="pir")
    for path, leaf in tree.flatten(unprepared.merge(params, restored)).items():
        np.testing.assert_array_equal(leaf, merged[path], err_msg=path)
    with pytest.raises(ValueError, match="has not chosen its entries"):
        unprepared.apply(params, trained)
    # The same adapter fits the model with stacked layers (positions count per-layer paths), with its indices
    # as given or traced inside jit (another code path to the same weights).
    scanned, stacked = _stacked(model, params)
    on_stack = jpeft.pir(budget=budget, model=scanned)
    for got in (on_stack.merge(stacked, restored), jax.jit(on_stack.merge)(stacked, restored)):
        for i in range(2):
            np.testing.assert_allclose(got["layers"]["mlp"]["down_proj"]["kernel"][i],
                                       want[f"layers_{i}/mlp/down_proj/kernel"], rtol=0, atol=1e-6)


def test_saved_bytes_grow_with_the_budget(hf_pair, tmp_path):
    _, model, params = hf_pair

    def saved_bytes(budget):
        method = jpeft.pir(budget=budget, model=model).training.prepare(params, _xent(model), iter(BATCHES))
        saved = method.saved_form({"values": jax.random.normal(jax.random.key(0), (budget,))})
        folder = tmp_path / f"b{budget}"
        checkpoint.save_adapter(folder, saved, metadata={"method": "pir"})
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)

    small, large = saved_bytes(1000), saved_bytes(5000)
    # 4,000 more entries of 4-byte values and 4-byte indices: ~32 KB more (stored compressed, indices sorted).
    assert 0.5 * 8 * 4000 < large - small < 1.25 * 8 * 4000, (small, large)


def test_pir_settings_are_checked(hf_pair):
    _, model, params = hf_pair
    with pytest.raises(registry.SettingsMappingError, match="must be a positive integer") as info:
        registry.validate("pir", {"budget": 0})
    assert info.value.setting == "budget"
    with pytest.raises(registry.SettingsMappingError, match="'taylor' must be one of 'weight_gradient', 'fisher'"):
        registry.check_settings("pir", {"score": "taylor"})
    with pytest.raises(registry.SettingsMappingError, match="must be one of 'global', 'per_tensor'"):
        registry.check_settings("pir", {"allocation": "layer"})
    with pytest.raises(jpeft.errors.SettingError, match=r"budget is more than the [\d,]+ entries the targets select"):
        jpeft.pir(budget=10**7, model=model).training.prepare(params, _xent(model), iter(BATCHES))
    with pytest.raises(jpeft.RuleError, match="matched no parameter"):
        jpeft.pir(targets=r".*/kernal", model=model).init(None, params)
