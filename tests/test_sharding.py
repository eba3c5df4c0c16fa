"""Sharding on 8 simulated CPU devices (tests/conftest.py): same numbers as one device, 1/n memory.

Data parallel, FSDP, tensor parallel and FSDP x tensor must give the loss and LoRA
gradients of an unsharded run; frozen weights (plain and quantized) must be split
across devices; LoRA factors must follow their weights (golden file); bad meshes,
rules and shapes must fail before compiling, naming the parameter and the axis.
"""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import jpeft
from jpeft import quant, sharding, tree
from jpeft.models import llama
from train import placement

GOLDEN = pathlib.Path(__file__).parent / "golden" / "lora_adapter_specs.json"
TARGETS = r".*/(q|k|v|o|gate|up|down)_proj/kernel|embed_tokens/embedding|lm_head/kernel"
CONFIG = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=4, num_kv_heads=2, scan_layers=True)
METHOD = jpeft.lora(rank=4, alpha=8, targets=TARGETS)

MESHES = {  # name: (mesh shape, rule table, devices that split each weight)
    "data": ({"data": -1, "fsdp": 1, "tensor": 1}, "default", 1),
    "fsdp": ({"data": 1, "fsdp": -1, "tensor": 1}, "fsdp", 8),
    "tensor": ({"data": 1, "fsdp": 1, "tensor": -1}, "default", 8),
    "fsdp_x_tensor": ({"data": 2, "fsdp": 2, "tensor": 2}, "default", 4),
}


def host_values(abstract, seed, scale=0.1):
    """Random numpy arrays of these shapes: cheap (CPU compiles of random initializers are slow),
    and for adapters every factor is non-zero (a fresh adapter has B == 0, which hides bugs)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (scale * rng.standard_normal(x.shape)).astype(np.float32), abstract)


def model_and_adapter(config, method):
    """(params, adapter, batch) as host arrays."""
    abstract_params = jax.eval_shape(llama.model(config).init, jax.random.key(0))
    params = host_values(abstract_params, seed=0, scale=0.05)
    adapter = host_values(jax.eval_shape(method.init, jax.random.key(1), abstract_params), seed=1)
    tokens_BxT = np.random.default_rng(2).integers(0, config.vocab_size, (8, 17), dtype=np.int32)
    return params, adapter, {"tokens_BxT": tokens_BxT}


def make_loss(config, method):
    def loss_fn(adapter, frozen, batch):
        tokens_BxT = batch["tokens_BxT"]
        logits_BxTxV, _ = llama.forward(method.apply(frozen, adapter), config, tokens_BxT[:, :-1])
        logp_BxTxV = jax.nn.log_softmax(logits_BxTxV)
        return -jnp.mean(jnp.take_along_axis(logp_BxTxV, tokens_BxT[:, 1:, None], axis=-1)), logits_BxTxV
    return loss_fn


def assert_trees_close(actual, expected, rtol=1e-5):
    """Elementwise rtol, plus an atol of rtol x the leaf's largest value (for entries near zero)."""
    for path, want in tree.flatten(expected).items():
        got, want = np.asarray(tree.flatten(actual)[path]), np.asarray(want)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max(), err_msg=path)


def fraction_per_device(arrays) -> float:
    """Largest share of these arrays' bytes that any one device holds."""
    total = sum(x.nbytes for x in jax.tree.leaves(arrays))
    return max(sharding.bytes_per_device(arrays).values()) / total


@pytest.fixture(scope="module")
def setup():
    params, adapter, batch = model_and_adapter(CONFIG, METHOD)
    loss_fn = make_loss(CONFIG, METHOD)
    (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(adapter, params, batch)
    return params, adapter, batch, loss, grads


def test_eight_simulated_devices():
    assert jax.device_count() == 8, "tests/conftest.py should give 8 CPU devices"


@pytest.mark.parametrize("layout", list(MESHES))
def test_sharded_loss_and_grads_match_one_device(setup, layout):
    params, adapter, batch, ref_loss, ref_grads = setup
    shape, table, weight_ways = MESHES[layout]
    mesh, rules = sharding.make_mesh(shape), sharding.load_rules(table)
    axes = llama.model(CONFIG).param_axes()
    params_sh = sharding.shardings_for(params, axes, mesh, rules)
    adapter_sh = sharding.adapter_shardings(METHOD, adapter, axes, mesh, rules)
    batch_sh = placement.batch_shardings(batch, mesh, rules)
    grad_fn = jax.jit(jax.value_and_grad(make_loss(CONFIG, METHOD), has_aux=True),
                      in_shardings=(adapter_sh, params_sh, batch_sh),
                      out_shardings=((NamedSharding(mesh, PartitionSpec()), None), adapter_sh))
    sharded_params = jax.device_put(params, params_sh)
    (loss, _), grads = grad_fn(jax.device_put(adapter, adapter_sh), sharded_params,
                               jax.device_put(batch, batch_sh))

    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert_trees_close(grads, ref_grads)
    assert jax.tree.map(lambda g: g.sharding, grads) == adapter_sh
    # Each device holds about 1/n of the frozen weights (norm scales are replicated).
    fraction = fraction_per_device(sharded_params)
    assert 1 / weight_ways <= fraction <= 1.1 / weight_ways, fraction


def test_lora_specs_match_golden_file():
    golden = json.loads(GOLDEN.read_text())
    config = llama.LlamaConfig(**golden["model"])
    method = jpeft.lora(rank=4, targets=golden["targets"])
    abstract_params = jax.eval_shape(llama.model(config).init, jax.random.key(0))
    abstract_adapter = jax.eval_shape(method.init, jax.random.key(0), abstract_params)
    mesh = sharding.make_mesh(golden["mesh"])
    adapter_sh = sharding.adapter_shardings(method, abstract_adapter, llama.model(config).param_axes(), mesh,
                                            sharding.load_rules(golden["rules"]))

    def as_list(named, leaf):
        spec = list(named.spec) + [None] * (len(leaf.shape) - len(named.spec))
        return [list(e) if isinstance(e, tuple) else e for e in spec]

    flat_adapter = tree.flatten(abstract_adapter)
    actual = {p: as_list(s, flat_adapter[p]) for p, s in tree.flatten(adapter_sh).items()}
    assert actual == golden["specs"]


@pytest.mark.parametrize("layout", ["fsdp", "fsdp_x_tensor"])
def test_activations_split_by_rows_keep_loss_and_grads(setup, layout):
    """sharding.activation_rows (what the trainer's step traces under) changes where activations live, not values."""
    params, adapter, batch, ref_loss, ref_grads = setup
    shape, table, _ = MESHES[layout]
    mesh, rules = sharding.make_mesh(shape), sharding.load_rules(table)
    axes = llama.model(CONFIG).param_axes()
    params_sh = sharding.shardings_for(params, axes, mesh, rules)
    adapter_sh = sharding.adapter_shardings(METHOD, adapter, axes, mesh, rules)
    batch_sh = placement.batch_shardings(batch, mesh, rules)
    plain = make_loss(CONFIG, METHOD)

    def loss_fn(adapter, frozen, batch):
        with sharding.activation_rows(batch_sh["tokens_BxT"]):
            return plain(adapter, frozen, batch)

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), in_shardings=(adapter_sh, params_sh, batch_sh),
                      out_shardings=((NamedSharding(mesh, PartitionSpec()), None), adapter_sh))
    args = (jax.device_put(adapter, adapter_sh), jax.device_put(params, params_sh), jax.device_put(batch, batch_sh))
    text = grad_fn.lower(*args).as_text()
    assert text.count("sharding_constraint") >= 3  # the embeddings, and each layer's input and output (scanned)
    (loss, _), grads = grad_fn(*args)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert_trees_close(grads, ref_grads)
    # Outside the block nothing is constrained.
    assert sharding.constrain_rows(jnp.ones((8, 3))).sharding == jnp.ones((8, 3)).sharding


def test_init_in_place_and_sharded_train_step_match_one_device(setup):
    _, _, batch, _, _ = setup
    mesh, rules = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), sharding.load_rules("default")
    axes, key = llama.model(CONFIG).param_axes(), jax.random.key(0)
    optimizer = optax.adamw(1e-2)

    # Shapes first, then every array is created where it belongs.
    abstract_params = jax.eval_shape(llama.model(CONFIG).init, key)
    params_sh = sharding.shardings_for(abstract_params, axes, mesh, rules)
    params = jax.jit(llama.model(CONFIG).init, out_shardings=params_sh)(key)
    abstract_adapter = jax.eval_shape(METHOD.init, key, abstract_params)
    adapter_sh = sharding.adapter_shardings(METHOD, abstract_adapter, axes, mesh, rules)
    adapter = jax.jit(METHOD.init, out_shardings=adapter_sh)(key, params)
    opt_sh = sharding.optimizer_shardings(optimizer, jax.eval_shape(optimizer.init, abstract_adapter), adapter_sh,
                                          mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(adapter)
    assert jax.tree.map(lambda x: x.sharding, (params, adapter, opt_state)) == (params_sh, adapter_sh, opt_sh)
    assert opt_state[0].mu["layers"]["self_attn"]["q_proj"]["kernel"]["a"].sharding.spec == \
        PartitionSpec(None, "fsdp", None)
    assert opt_state[0].count.sharding.spec == PartitionSpec()

    loss_fn = make_loss(CONFIG, METHOD)

    def train_step(frozen, adapter, opt_state, batch):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(adapter, frozen, batch)
        updates, opt_state = optimizer.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, loss, grads

    # The reference: the same step on one device, from host copies of the sharded step's own inputs
    # (donation must not free them). Each step compares what the claim is about: the loss and the
    # gradients before the optimizer. (After Adam, which divides by sqrt(v), reduction-order noise on a
    # near-zero gradient entry shows as a visible relative difference of that entry, so updated
    # parameters are no per-element reference; the sharded run carries its own adapter on.)
    ref_params = jax.tree.map(np.asarray, params)
    ref_step = jax.jit(train_step)
    batch_sh = placement.batch_shardings(batch, mesh, rules)
    step = placement.sharded_step(
        train_step, in_shardings=dict(frozen=params_sh, adapter=adapter_sh, opt_state=opt_sh, batch=batch_sh),
        out_shardings=(adapter_sh, opt_sh, NamedSharding(mesh, PartitionSpec()), adapter_sh),
        donate_argnames=("adapter", "opt_state"))
    for i in range(2):
        local = {"tokens_BxT": (batch["tokens_BxT"] + i) % CONFIG.vocab_size}
        ref_adapter, ref_opt = jax.tree.map(np.asarray, (adapter, opt_state))
        old_leaf = adapter["lm_head"]["kernel"]["b"]
        adapter, opt_state, loss, grads = step(params, adapter, opt_state, placement.shard_batch(local, batch_sh))
        _, _, ref_loss, ref_grads = ref_step(ref_params, ref_adapter, ref_opt, local)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        assert_trees_close(grads, ref_grads)
        assert old_leaf.is_deleted()  # donated: the update reused its buffer
    assert int(opt_state[0].count) == 2
    assert jax.tree.map(lambda x: x.sharding, (adapter, opt_state)) == (adapter_sh, opt_sh)


def test_quantized_sharded_forward_matches_unsharded(tmp_path):
    """Also: an adapter saved on one device restores onto a freshly quantized base on an 8-device mesh."""
    from jpeft.checkpoint import restore_adapter, save_adapter

    config = llama.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_layers=2,
                               num_heads=4, num_kv_heads=2, scan_layers=True)
    method = jpeft.lora(rank=4, targets=r".*/(q|v|down)_proj/kernel")
    targets = [jpeft.Rule(r".*/(q|k|v|o)_proj/kernel|embed_tokens/embedding", format="nf4", double_quant=True),
               jpeft.Rule(r".*/(gate|up|down)_proj/kernel|lm_head/kernel", format="int4", double_quant=False)]
    quantize = lambda p: quant.quantize(p, targets, block_size=64)
    params, adapter, batch = model_and_adapter(config, method)
    qparams = quantize(params)
    grad_fn = jax.value_and_grad(make_loss(config, method), has_aux=True)
    (ref_loss, ref_logits), ref_grads = jax.jit(grad_fn)(adapter, qparams, batch)

    mesh, rules = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2}), sharding.load_rules("default")
    axes = llama.model(config).param_axes()
    qparams_sh = sharding.shardings_for(jax.eval_shape(quantize, params), axes, mesh, rules)
    q_proj_sh = qparams_sh["layers"]["self_attn"]["q_proj"]["kernel"]
    up_proj_sh = qparams_sh["layers"]["mlp"]["up_proj"]["kernel"]
    assert q_proj_sh.codes.spec == up_proj_sh.codes.spec == PartitionSpec(None, "fsdp", "tensor")
    assert q_proj_sh.scales.spec == PartitionSpec(None, ("fsdp", "tensor"))  # double quant: flat per matrix
    assert up_proj_sh.scales.spec == PartitionSpec(None, None, "tensor")  # 2 blocks of 64 along embed: fsdp=4 can't
    adapter_sh = sharding.adapter_shardings(method, adapter, axes, mesh, rules)
    batch_sh = placement.batch_shardings(batch, mesh, rules)
    sharded_qparams = jax.device_put(qparams, qparams_sh)
    save_adapter(tmp_path / "adapter", adapter, metadata={"method": "lora"})
    like = jax.eval_shape(method.init, jax.random.key(0), jax.eval_shape(quantize, params))
    restored, _ = restore_adapter(tmp_path / "adapter", like=like, method="lora")
    (loss, logits), grads = jax.jit(grad_fn, in_shardings=(adapter_sh, qparams_sh, batch_sh))(
        jax.device_put(restored, adapter_sh), sharded_qparams, jax.device_put(batch, batch_sh))

    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5 * np.abs(ref_logits).max())
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert_trees_close(grads, ref_grads)
    # Codes and double-quantized scales are split 8 ways. Not split: norm scales, the per-256
    # constants, and int4 block scales along embed (2 blocks of 64 cannot split over fsdp=4).
    quantized = [leaf for leaf in tree.flatten(sharded_qparams).values() if isinstance(leaf, quant.QuantizedArray)]
    split = [q.codes for q in quantized] + [q.scales for q in quantized if q.double_quant]
    assert fraction_per_device(split) == 1 / 8
    total = sum(x.nbytes for x in jax.tree.leaves(sharded_qparams))
    not_split = total - sum(x.nbytes for x in split)
    assert fraction_per_device(sharded_qparams) <= (total / 8 + not_split) / total


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_sliced_quantized_tied_head_on_a_vocab_sharded_mesh(monkeypatch, fmt):
    """A tied head cut into row slices (QuantizedArray.attend) while its vocabulary is split over
    devices: same logits and LoRA gradients as the whole table on one device."""
    from jpeft.quant import array

    config = llama.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                               num_heads=4, num_kv_heads=2, scan_layers=True, tie_word_embeddings=True)
    method = jpeft.lora(rank=4, targets=r".*/(q|v)_proj/kernel", model=llama.model(config))
    quantize = lambda p: quant.quantize(p, r"embed_tokens/embedding|.*/(q|k|v|o)_proj/kernel", fmt,
                                        block_size=32, model=llama.model(config))
    params, adapter, batch = model_and_adapter(config, method)
    qparams = quantize(params)
    grad_fn = jax.value_and_grad(make_loss(config, method), has_aux=True)
    (ref_loss, ref_logits), ref_grads = jax.jit(grad_fn)(adapter, qparams, batch)
    table = qparams["embed_tokens"]["embedding"]
    assert table._attend_chunks(4) == 1  # 64 KiB as float32: one piece by default

    monkeypatch.setattr(array, "ATTEND_CHUNK_BYTES", 16 * 2**10)
    assert table._attend_chunks(4) == 16  # slices of 16 rows; each device holds 128 of the 256
    sliced_calls = []
    monkeypatch.setattr(array, "_chunked_attend",
                        lambda *args, f=array._chunked_attend: sliced_calls.append(args[2]) or f(*args))
    mesh, rules = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2}), sharding.load_rules("default")
    axes = llama.model(config).param_axes()
    qparams_sh = sharding.shardings_for(jax.eval_shape(quantize, params), axes, mesh, rules)
    assert qparams_sh["embed_tokens"]["embedding"].codes.spec == PartitionSpec("tensor", "fsdp")
    adapter_sh = sharding.adapter_shardings(method, adapter, axes, mesh, rules)
    batch_sh = placement.batch_shardings(batch, mesh, rules)
    step = jax.jit(grad_fn, in_shardings=(adapter_sh, qparams_sh, batch_sh))
    (loss, logits), grads = step(jax.device_put(adapter, adapter_sh), jax.device_put(qparams, qparams_sh),
                                 jax.device_put(batch, batch_sh))

    assert sliced_calls == [16]  # the sharded step took the sliced path
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5 * np.abs(ref_logits).max())
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert_trees_close(grads, ref_grads, rtol=1e-4)


# ----------------------------------------------------------------------------- bad input


def abstract_model(**overrides):
    config = dataclasses.replace(CONFIG, **overrides)
    return jax.eval_shape(llama.model(config).init, jax.random.key(0)), llama.model(config).param_axes()


@pytest.mark.parametrize("shape,message", [
    ({"data": 3, "fsdp": 2, "tensor": 1}, r"needs 6 devices but there are 8"),
    ({"data": -1, "fsdp": -1}, r"-1 for several axes"),
    ({"fsdp": -1, "tensor": 3}, r"take 3 devices, which does not divide the 8 devices"),
    ({"data": 0}, r"'data' has size 0"),
])
def test_mesh_that_does_not_fit_the_devices(shape, message):
    with pytest.raises(sharding.ShardingError, match=message):
        sharding.make_mesh(shape)


def test_rule_naming_no_mesh_axis_names_parameter_and_axis():
    params, axes = abstract_model()
    rules = {**sharding.load_rules("default"), "mlp": "model"}
    with pytest.raises(sharding.ShardingError,
                       match=r"layers/mlp/down_proj/kernel: the rule 'mlp' -> 'model' names mesh axis 'model'"):
        sharding.shardings_for(params, axes, sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2}), rules)


def test_logical_axis_without_rule():
    params, axes = abstract_model()
    rules = {k: v for k, v in sharding.load_rules("default").items() if k != "kv_heads"}
    with pytest.raises(sharding.ShardingError, match=r"k_proj/kernel: logical axis 'kv_heads' .* no sharding rule"):
        sharding.shardings_for(params, axes, sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2}), rules)


def test_dimension_that_does_not_divide_names_parameter_and_axis():
    params, axes = abstract_model(vocab_size=60)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 8})
    with pytest.raises(sharding.ShardingError,
                       match=r"embed_tokens/embedding: dimension 0 \(logical axis 'vocab', size 60\) does not "
                             r"divide over mesh axes \('tensor',\) \(8 devices"):
        sharding.shardings_for(params, axes, mesh, sharding.load_rules("default"))


def test_batch_and_packed_codes_that_do_not_divide():
    mesh, rules = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1}), sharding.load_rules("default")
    batch = {"tokens_BxT": jax.ShapeDtypeStruct((6, 16), jnp.int32)}
    with pytest.raises(sharding.ShardingError, match=r"batch/tokens_BxT: dimension 0 \(logical axis 'batch'"):
        placement.batch_shardings(batch, mesh, rules)
    q = jax.eval_shape(lambda w: quant.quantize_array(w, "nf4", block_size=8), jax.ShapeDtypeStruct((8, 16), "float32"))
    with pytest.raises(sharding.ShardingError, match=r"w \(codes, packed two per byte along axis -2\): "
                                                     r"dimension 0 \(logical axis 'embed', size 4\)"):
        sharding.shardings_for({"w": q}, {"w": ("embed", "mlp")}, mesh, rules)


def test_bad_rule_tables_and_step_arguments(tmp_path):
    with pytest.raises(sharding.ShardingError, match=r"rule 'embed': 3 is not a mesh axis name"):
        sharding.load_rules({"embed": 3})
    (tmp_path / "bad.yaml").write_text("embed: fsdp\n")
    with pytest.raises(sharding.ShardingError, match=r"no 'rules:' mapping"):
        placement.rules_from_setting(tmp_path / "bad.yaml")
    with pytest.raises(sharding.ShardingError, match=r"known tables: \['default', 'fsdp'"):
        sharding.load_rules("nope")
    with pytest.raises(sharding.ShardingError, match=r"no sharding for the step's argument\(s\) \['batch'\]"):
        placement.sharded_step(lambda adapter, batch: adapter, in_shardings={"adapter": None}, out_shardings=None)


def test_full_finetuning_adapter_inherits_param_axes():
    params, axes = abstract_model()
    method = jpeft.full(r".*/(q_proj/kernel|input_layernorm/scale)")
    adapter = jax.eval_shape(method.init, jax.random.key(0), params)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    adapter_sh = sharding.adapter_shardings(method, adapter, axes, mesh, sharding.load_rules("default"))
    assert adapter_sh["layers"]["self_attn"]["q_proj"]["kernel"].spec == PartitionSpec(None, "fsdp", "tensor")
    assert adapter_sh["layers"]["input_layernorm"]["scale"].spec == PartitionSpec(None, None)


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_every_family_keeps_activation_rows_split(family):
    """BERT's and T5's layer loops constrain rows like llama's: same values, constraints in the program."""
    from jpeft.models import bert, t5

    if family == "bert":
        model = bert.model(bert.BertConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2,
                                           num_heads=2, scan_layers=True))
        extra = {}
    else:
        model = t5.model(t5.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                                     scan_layers=True))
        extra = {"decoder_tokens_BxT": jnp.ones((8, 5), jnp.int32)}
    params = model.init(jax.random.key(0))
    tokens_BxT = jax.random.randint(jax.random.key(1), (8, 5), 1, 64)
    out = lambda params, tokens: model.forward(params, tokens, **extra)[0]
    mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    rows = NamedSharding(mesh, PartitionSpec("fsdp"))

    def constrained(params, tokens):
        with sharding.activation_rows(rows):
            return out(params, tokens)

    lowered = jax.jit(constrained).lower(params, jax.device_put(tokens_BxT, rows))
    assert lowered.as_text().count("sharding_constraint") >= 2  # each layer's input and output
    np.testing.assert_allclose(lowered.compile()(params, jax.device_put(tokens_BxT, rows)), out(params, tokens_BxT),
                               rtol=1e-5, atol=1e-6)
