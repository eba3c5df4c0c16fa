"""VeRA and OFT: identity at init (exactly), float64 numpy references, merge, gradients, layouts, 4-bit bases, errors."""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import ops, tree
from jpeft.layout import Layout

D, H = 24, 12
KERNELS = r".*/kernel"
X = jnp.asarray(np.random.default_rng(7).standard_normal((2, 3, D)), jnp.float32)


def tiny_params(seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape) / 5, jnp.float32)
    return {"q_proj": {"kernel": normal(D, D)}, "up_proj": {"kernel": normal(D, H)}, "norm": {"scale": jnp.ones((D,))}}


def tiny_forward(params, x):
    h = jnp.tanh(ops.linear(x, params["q_proj"]["kernel"])) * params["norm"]["scale"]
    return ops.linear(h, params["up_proj"]["kernel"])


forward = jax.jit(tiny_forward)
linear = jax.jit(ops.linear)

BUILD = {
    "vera": lambda **kw: jpeft.vera(**{"rank": 4, "targets": KERNELS, **kw}),
    "oft": lambda **kw: jpeft.oft(**{"block_size": 6, "targets": KERNELS, **kw}),
}
KINDS = tuple(BUILD)


def random_adapter(method, params, seed=1, scale=0.3):
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(method.init, jax.random.key(0), params)
    return jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), jnp.float32), shapes)


# ----------------------------------------------------------------------------- float64 references


def numpy_vera_delta(pair, f, in_size, out_size):
    """``dW`` as the Flax ``(I, O)`` matrix: the transpose of ``diag(lambda_b) B diag(lambda_d) A``."""
    a, b = np.asarray(pair.a, np.float64)[:, :in_size], np.asarray(pair.b, np.float64)[:out_size]
    lam_b, lam_d = np.asarray(f["lambda_b"], np.float64).reshape(-1), np.asarray(f["lambda_d"], np.float64)
    return (np.diag(lam_b) @ b @ np.diag(lam_d) @ a).T


def numpy_rotation(vec, block_size, terms):
    """One block's rotation: Cayley ``(I - Q)(I + Q)^-1`` (terms 0) or PEFT's Neumann sum, float64."""
    q = np.zeros((block_size, block_size))
    q[np.triu_indices(block_size, 1)] = np.asarray(vec, np.float64)
    q = q - q.T
    eye = np.eye(block_size)
    if terms == 0:
        return (eye - q) @ np.linalg.inv(eye + q)
    powers = [np.linalg.matrix_power(q, k) for k in range(terms + 1)]
    if terms <= 2:
        return eye + (2 * q if terms == 2 else 0)
    last = max(terms - 1, 3)   # PEFT's loop: the last power gets coefficient 1 (its 3-term case ends at Q^3)
    return eye + 2 * sum(powers[1:last]) + powers[last]


def numpy_oft_merged(w_IxO, vecs, terms):
    in_size = w_IxO.shape[0]
    size = int(round((1 + np.sqrt(1 + 8 * vecs.shape[-1])) / 2))
    n = in_size // size
    blocks = [numpy_rotation(vecs[min(i, len(vecs) - 1)], size, terms) for i in range(n)]
    rot = np.zeros((in_size, in_size))
    for i, r in enumerate(blocks):
        rot[i * size:(i + 1) * size, i * size:(i + 1) * size] = r
    return rot @ np.asarray(w_IxO, np.float64)


def reference_merged(kind, method, params, adapter, path, terms=5, in_size=None):
    """The merged kernel of ``path`` as the ``(I, O)`` matrix, float64."""
    w = np.asarray(tree.flatten(params)[path], np.float64)
    w = w.reshape(in_size or w.shape[0], -1)
    f = tree.flatten(adapter)
    f = {k.rsplit("/", 1)[1]: v for k, v in f.items() if k.startswith(path + "/")}
    if kind == "vera":
        pair = tree.flatten(method.apply(params, adapter))[path].projections
        return w + numpy_vera_delta(pair, f, w.shape[0], w.shape[1])
    return numpy_oft_merged(w, np.asarray(f["R"]), terms)


# ----------------------------------------------------------------------------- init, apply, merge


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_adapter_is_exactly_the_identity(kind):
    params = tiny_params()
    method = BUILD[kind]()
    adapter = method.init(jax.random.key(0), params)
    np.testing.assert_array_equal(forward(method.apply(params, adapter), X), forward(params, X))
    for a, b in zip(jax.tree.leaves(jax.jit(method.merge)(params, adapter)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    f = adapter["q_proj"]["kernel"]
    if kind == "vera":  # PEFT's init: lambda_b zero, lambda_d = d_initial
        assert {n: v.shape for n, v in f.items()} == {"lambda_b": (D,), "lambda_d": (4,)}
        assert not np.any(f["lambda_b"]) and np.all(np.asarray(f["lambda_d"]) == np.float32(0.1))
    else:               # 4 blocks of 6 inputs, 15 entries of each skew-symmetric block, all zero
        assert f["R"].shape == (4, 15) and not np.any(f["R"])


@pytest.mark.parametrize("kind, kw, terms", [
    ("vera", {}, None), ("vera", {"d_initial": 0.5, "projection_prng_key": 3}, None),
    ("oft", {}, 5), ("oft", {"use_cayley_neumann": False}, 0), ("oft", {"num_cayley_neumann_terms": 3}, 3),
    ("oft", {"block_size": 0, "r": 2, "block_share": True}, 5)])
def test_apply_and_merge_match_a_float64_reference(kind, kw, terms):
    params = tiny_params()
    method = BUILD[kind](**kw)
    adapter = random_adapter(method, params)
    merged = jax.jit(method.merge)(params, adapter)
    for path in ("q_proj/kernel", "up_proj/kernel"):
        want = reference_merged(kind, method, params, adapter, path, terms)
        np.testing.assert_allclose(tree.flatten(merged)[path], want, rtol=1e-5, atol=1e-5)
    if not kw or kw.get("block_share"):  # apply == merge through the model (other options: the same rotation code)
        np.testing.assert_allclose(forward(method.apply(params, adapter), X), forward(merged, X), rtol=1e-5,
                                   atol=1e-5)
    if kind == "oft" and terms == 0:  # the exact Cayley transform is orthogonal: the merged kernel keeps its norms
        w, m = np.asarray(params["q_proj"]["kernel"]), np.asarray(merged["q_proj"]["kernel"])
        np.testing.assert_allclose(np.linalg.norm(m, axis=0), np.linalg.norm(w, axis=0), rtol=1e-5)


def test_vera_projections_are_shared_sliced_and_deterministic():
    params = tiny_params()
    method = BUILD["vera"]()
    adapter = random_adapter(method, params)
    applied = method.apply(params, adapter)
    q, up = applied["q_proj"]["kernel"], applied["up_proj"]["kernel"]
    assert q.projections is up.projections          # one pair for all targets: A (r, max in), B (max out, r)
    assert q.projections.a.shape == (4, D) and q.projections.b.shape == (D, 4)
    assert jpeft.vera(rank=4, targets=KERNELS).apply(params, adapter)["q_proj"]["kernel"].projections == q.projections
    other = jpeft.vera(rank=4, targets=KERNELS, projection_prng_key=1).apply(params, adapter)["q_proj"]["kernel"]
    assert other.projections != q.projections
    bound = np.sqrt(6 / D)          # PEFT's kaiming-uniform bound (gain sqrt 2, fan-in = max in)
    assert 0.8 * bound < np.abs(q.projections.a).max() <= bound
    assert not any("proj" in p and "a" == p[-1] for p in tree.flatten(adapter))   # not in the adapter


def _weight_sized(fn, *args, shape) -> list[str]:
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            found.extend(str(eqn.primitive) for v in eqn.outvars if tuple(getattr(v.aval, "shape", ())) == shape)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)
    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


@pytest.mark.parametrize("kind", KINDS)
def test_neither_forms_a_weight_sized_array_in_a_train_step(kind):
    w, x = jnp.zeros((96, 160)), jnp.ones((4, 96))
    method = BUILD[kind](targets=r"w", **({"block_size": 8} if kind == "oft" else {}))
    adapter = jax.eval_shape(method.init, jax.random.key(0), {"w": w})
    loss = lambda a, w, x: jnp.sum(ops.linear(x, method.apply({"w": w}, a)["w"]) ** 2)
    assert _weight_sized(jax.value_and_grad(loss), adapter, w, x, shape=(96, 160)) == []


@pytest.mark.parametrize("kind", KINDS)
def test_multi_axis_kernels_flatten_inputs_and_outputs(kind):
    """A kernel (heads, head_dim, embed) used through ops.einsum is the matrix (heads*head_dim, embed)."""

    class Model:
        tied_tables = {}

        def layouts(self):
            return {"o/kernel": Layout("kernel", 0, 2), "q/kernel": Layout("kernel", 0, 1)}

    rng = np.random.default_rng(3)
    params = {"o": {"kernel": jnp.asarray(rng.standard_normal((4, 6, 12)) / 5, jnp.float32)},
              "q": {"kernel": jnp.asarray(rng.standard_normal((12, 2, 6)) / 5, jnp.float32)}}
    method = BUILD[kind](targets=r"(o|q)/kernel", model=Model(), **({"block_size": 4} if kind == "oft" else {}))
    adapter = random_adapter(method, params)
    if kind == "vera":
        assert adapter["q"]["kernel"]["lambda_b"].shape == (2, 6)
    applied = method.apply(params, adapter)
    einsum = jax.jit(ops.einsum, static_argnums=0)
    x = X[..., :24].reshape(2, 3, 4, 6)
    for path, subscripts, x_in, flat_in, flat_out in (("o/kernel", "btnh,nhd->btd", x, 24, 12),
                                                      ("q/kernel", "btd,dnh->btnh", X[..., :12], 12, 12)):
        y = einsum(subscripts, x_in, tree.flatten(applied)[path])
        want = np.asarray(x_in, np.float64).reshape(2, 3, flat_in) @ \
            reference_merged(kind, method, params, adapter, path, in_size=flat_in)
        np.testing.assert_allclose(np.asarray(y).reshape(2, 3, -1), want, rtol=1e-4, atol=1e-5)
    y_t = einsum("btnh,nhd->dbt", x, applied["o"]["kernel"])       # the result's axes in another order
    np.testing.assert_allclose(y_t, np.transpose(einsum("btnh,nhd->btd", x, applied["o"]["kernel"]), (2, 0, 1)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_stacked_layers_are_batch_axes(kind):
    w = jnp.stack([tiny_params(i)["up_proj"]["kernel"] for i in range(3)])
    method = BUILD[kind](targets=r"layers/kernel")
    adapter = random_adapter(method, {"layers": {"kernel": w}})
    merged = np.asarray(jax.jit(method.merge)({"layers": {"kernel": w}}, adapter)["layers"]["kernel"])
    applied = method.apply({"layers": {"kernel": w}}, adapter)["layers"]["kernel"]
    per_layer = jax.jit(lambda applied, x: jax.lax.map(lambda layer: ops.linear(x, layer), applied))  # as scan does
    np.testing.assert_allclose(per_layer(applied, X), np.einsum("btd,ldh->lbth", X, merged), rtol=1e-4, atol=1e-5)
    for i in range(3):
        layer = {"w": w[i]}
        own = {"w": {n: np.asarray(f)[i] for n, f in adapter["layers"]["kernel"].items()}}
        one = BUILD[kind](targets=r"w")
        np.testing.assert_allclose(merged[i], reference_merged(kind, one, layer, own, "w"), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- gradients, 4-bit bases


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_exist_only_for_the_adapter(kind):
    params = tiny_params()
    method = BUILD[kind]()
    adapter = random_adapter(method, params)
    grads = jax.jit(jax.grad(lambda a: jnp.mean(tiny_forward(method.apply(params, a), X) ** 2)))(adapter)
    assert jax.tree.structure(grads) == jax.tree.structure(adapter)      # the adapter's leaves, nothing else
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    if kind == "vera":   # at init only lambda_b moves the output, so only it has a gradient
        fresh = method.init(jax.random.key(0), params)
        g = jax.jit(jax.grad(lambda a: jnp.mean(tiny_forward(method.apply(params, a), X) ** 2)))(fresh)
        assert float(jnp.abs(g["q_proj"]["kernel"]["lambda_b"]).max()) > 0
        assert not np.any(g["q_proj"]["kernel"]["lambda_d"])


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_base_runs_unmerged(kind):
    from jpeft import quant

    params = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((64, 64)) / 8, jnp.float32)}
    qparams = quant.quantize(params, r"w", "nf4")
    method = BUILD[kind](targets=r"w", **({"block_size": 16} if kind == "oft" else {}))
    adapter = random_adapter(method, qparams)
    assert "float weight" in method.merge_blocker(qparams) and method.merge_blocker(params) is None
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 64)), jnp.float32)
    applied = jpeft.for_inference(method, qparams, adapter)["w"]
    assert isinstance(applied.base, quant.QuantizedArray)   # the base stays 4-bit
    dense = {"w": ops.as_array(qparams["w"])}
    want = np.asarray(x, np.float64) @ reference_merged(kind, method, dense, adapter, "w")
    np.testing.assert_allclose(linear(x, applied), want, rtol=1e-4, atol=1e-4)


def test_logical_axes_and_shardings_follow_the_weights():
    from jpeft import sharding
    from jpeft.models import llama

    model = llama.model(llama.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
                                          num_heads=4, num_kv_heads=2, scan_layers=True))
    params = model.abstract_params()
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    for kind in KINDS:
        method = BUILD[kind](targets=r".*/(q|o)_proj/kernel", model=model)
        adapter = jax.eval_shape(method.init, jax.random.key(0), params)
        axes = jpeft.layout.flatten_axes(sharding.adapter_axes(method, adapter, model.param_axes()))
        assert all(len(axes[p]) == leaf.ndim for p, leaf in tree.flatten(adapter).items())
        q = next(a for p, a in jpeft.layout.flatten_axes(model.param_axes()).items() if p.endswith("q_proj/kernel"))
        if kind == "vera":
            assert axes["layers/self_attn/q_proj/kernel/lambda_b"] == (q[0], *q[2:])   # the output axes
        specs = sharding.logical_specs(adapter, sharding.adapter_axes(method, adapter, model.param_axes()), mesh,
                                       sharding.load_rules("default"))
        assert jax.tree.structure(specs) == jax.tree.structure(adapter)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kind, kwargs, message", [
    ("vera", {"rank": 0}, "rank must be a positive integer"),
    ("vera", {"targets": jpeft.Rule(r".*", rank=2)}, "VeRA's rank is one for all targets"),
    ("vera", {"projections": (np.ones((2, 4)), np.ones((4, 2)))}, "have r=2, but rank is 4"),
    ("oft", {"r": 2}, "give exactly one of them non-zero"),
    ("oft", {"block_size": 0}, "give exactly one of them non-zero"),
    ("oft", {"coft": True}, "coft"),
    ("oft", {"targets": jpeft.Rule(r".*", rank=2)}, "OFT's block size is one for all targets"),
])
def test_bad_settings_are_clear_errors(kind, kwargs, message):
    with pytest.raises(ValueError, match=message):
        BUILD[kind](**kwargs)


def test_mismatches_are_clear_errors():
    params = tiny_params()
    small = jpeft.vera(rank=4, targets=KERNELS, projections=(np.ones((4, 8)), np.ones((8, 4))))
    adapter = jpeft.vera(rank=4, targets=KERNELS).init(jax.random.key(0), params)
    with pytest.raises(ValueError, match="smaller than the largest targeted weight"):
        small.apply(params, adapter)
    with pytest.raises(ValueError, match="OFT adapts kernels"):
        jpeft.oft(targets=r"norm/scale").init(jax.random.key(0), params)
    oft = jpeft.oft(block_size=6, targets=KERNELS)
    with pytest.raises(ValueError, match="OFT factors"):
        oft.apply(params, jpeft.oft(block_size=4, targets=KERNELS).init(jax.random.key(0), params))
    with pytest.warns(UserWarning, match="adjusted to 6"):   # PEFT's adjustment: 7 -> 6 or 8 for 24 inputs, the lower
        adjusted = jpeft.oft(block_size=7, targets=KERNELS).init(jax.random.key(0), params)
    assert adjusted["up_proj"]["kernel"]["R"].shape == (4, 15)


# ----------------------------------------------------------------------------- exact Cayley on stacked layers

_STACKED_EXACT_OFT = """
import jax, jax.numpy as jnp, numpy as np, jpeft
from jpeft.models import llama
from jpeft import stack
sizes = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
model, stacked_model = llama.model(llama.LlamaConfig(**sizes)), llama.model(llama.LlamaConfig(**sizes, scan_layers=True))
params = model.init(jax.random.key(0))
exact_oft = lambda m: jpeft.oft(block_size=8, targets=r".*/(q|k|v|down)_proj/kernel", use_cayley_neumann=False, model=m)
method, stacked_method = exact_oft(model), exact_oft(stacked_model)
rng = np.random.default_rng(1)
adapter = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype),
                       jax.eval_shape(method.init, jax.random.key(0), params))
tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
unrolled = jax.jit(lambda p, a: model.forward(method.apply(p, a), tokens)[0])(params, adapter)
stacked_params, stacked_adapter = (stack.stack_layers(t, sizes["num_layers"]) for t in (params, adapter))
run = lambda p, a: stacked_model.forward(stacked_method.apply(p, a), tokens)[0]
outs = [jax.jit(run)(stacked_params, stacked_adapter), run(stacked_params, stacked_adapter)]   # jitted, eager
print(max(float(np.abs(np.asarray(o) - np.asarray(unrolled)).max()) for o in outs))
"""


def test_exact_cayley_oft_on_stacked_layers_finishes_and_equals_unrolled(tmp_path):
    """The exact Cayley transform's solves inside the layers' scan hung jax 0.10.2 on CPU (eager and jit, about
    half the runs); they now run before the scan. A subprocess under a timeout, so a hang fails instead of waiting."""
    import os
    import subprocess
    import sys

    script = tmp_path / "stacked_exact_oft.py"
    script.write_text(_STACKED_EXACT_OFT)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(sys.path)}
    try:
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("exact-Cayley OFT on stacked layers did not finish in 240 s")
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) < 1e-4   # stacked (jit, eager) == unrolled (jit, eager)


def test_exact_cayley_solves_run_before_the_layer_scan():
    """No linear solve is left inside a stacked model's scan body: the rotations come in as data."""
    from jpeft.models import llama

    config = llama.LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                               scan_layers=True)
    model = llama.model(config)
    params = jax.eval_shape(model.init, jax.random.key(0))
    method = jpeft.oft(block_size=4, targets=r".*/(q|down)_proj/kernel", use_cayley_neumann=False, model=model)
    adapter = jax.eval_shape(method.init, jax.random.key(0), params)
    tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda p, a, t: model.forward(method.apply(p, a), t)[0])(params, adapter, tokens)

    def solves(jaxpr, inside_scan=False):
        """``(solves outside any scan, solves inside one)`` (``lu`` is the factorization jnp.linalg.solve runs)."""
        out = [0, 0]
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "lu":
                out[inside_scan] += 1
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                inner = solves(sub, inside_scan or eqn.primitive.name == "scan")
                out = [out[0] + inner[0], out[1] + inner[1]]
        return out

    outside, inside = solves(jaxpr.jaxpr)
    assert inside == 0 and outside == 2   # one batched solve per adapted weight, for all its layers
