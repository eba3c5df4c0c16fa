"""Tests for jpeft.quant: NF4 / int4 / int8 blockwise quantization and QLoRA composition.

The reference implementation below is written from the definition (code table,
blocks of 64 along the contraction axis, absmax scaling, nearest level) in numpy
float64, independently of jpeft's code.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.ad_checkpoint import print_saved_residuals

import jpeft
from jpeft import ops, quant, tree
from jpeft.quant import QuantizationError, formats, packing

# bitsandbytes' NF4 constants (csrc/kernels.cu, functional.py create_normal_map output).
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
           -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
           0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
           0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


# ----------------------------------------------------------------------------- reference


def ref_blockwise(w, levels, block, axis):
    """float64 reference: (codes, absmax, dequantized) with blocks along ``axis``."""
    w = np.asarray(w, np.float64)
    levels = np.asarray(levels, np.float64)
    moved = np.moveaxis(w, axis, -1)
    blocks = moved.reshape(*moved.shape[:-1], moved.shape[-1] // block, block)
    absmax = np.abs(blocks).max(-1, keepdims=True)
    normed = blocks / np.where(absmax > 0, absmax, 1.0)
    dist = np.abs(normed[..., None] - levels)
    codes = dist.argmin(-1)
    # distance to the second-nearest level minus the nearest: ~0 marks a tie
    two = np.sort(dist, axis=-1)[..., :2]
    margin = two[..., 1] - two[..., 0]
    deq = levels[codes] * absmax
    back = lambda x: np.moveaxis(x.reshape(moved.shape), -1, axis)
    return back(codes), np.moveaxis(absmax[..., 0], -1, axis), back(deq), back(margin)


def ref_double_quant(absmax, block=256):
    """float64 reference of double quantization of a (*lead, rows, cols) absmax array."""
    lead = absmax.shape[:-2]
    flat = absmax.reshape(*lead, -1).astype(np.float64)
    mean = flat.mean(-1, keepdims=True)
    pad = (-flat.shape[-1]) % block
    centered = np.pad(flat - mean, [(0, 0)] * len(lead) + [(0, pad)])
    codes, scale, deq, margin = ref_blockwise(centered, formats.INT8.levels, block, -1)
    decoded = (deq[..., : flat.shape[-1]] + mean).reshape(absmax.shape)
    return codes, decoded, margin


def assert_codes_match(got, want, margin):
    """Codes equal except where the value sits on a rounding boundary (float32 vs float64)."""
    got, want = np.asarray(got), np.asarray(want)
    differ = got != want
    assert np.all(margin[differ] < 1e-6), "codes differ away from a rounding tie"
    assert differ.mean() < 1e-4


# ----------------------------------------------------------------------------- formats


def test_nf4_table_is_bitsandbytes():
    assert list(quant.NF4.levels) == BNB_NF4
    assert quant.NF4.table(np.float32).tolist() == np.asarray(BNB_NF4, np.float32).tolist()


def test_int_tables_symmetric():
    assert quant.INT4.levels == tuple(k / 7 for k in range(-7, 8))
    assert len(quant.INT8.levels) == 255 and quant.INT8.levels[127] == 0.0
    for fmt in quant.FORMATS.values():
        levels = np.asarray(fmt.levels)
        assert np.all(np.diff(levels) > 0) and levels[0] == -1.0 and levels[-1] == 1.0


def test_nearest_code_ties_go_down():
    mid = (BNB_NF4[8] + BNB_NF4[9]) / 2
    assert int(formats.nearest_code(np.float32(mid), quant.NF4)) in (8, 9)
    assert np.asarray(formats.nearest_code(jnp.array([-1.0, 0.0, 1.0]), quant.NF4)).tolist() == [0, 7, 15]


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_pack_round_trip(axis):
    codes = np.random.default_rng(0).integers(0, 16, size=(4, 6, 8), dtype=np.uint8)
    packed = packing.pack(codes, axis)
    assert packed.dtype == jnp.uint8
    assert packed.shape[axis] == codes.shape[axis] // 2 and packed.size == codes.size // 2
    np.testing.assert_array_equal(packing.unpack(packed, axis), codes)


def test_pack_nibble_order_and_odd_length():
    assert np.asarray(packing.pack(np.array([1, 2, 15, 0], np.uint8))).tolist() == [0x12, 0xF0]
    with pytest.raises(ValueError, match="odd length 3"):
        packing.pack(np.zeros((3, 2), np.uint8), axis=0)


# ----------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("fmt", ["nf4", "int4", "int8"])
@pytest.mark.parametrize("shape,axis", [((3, 128, 96), -2), ((96, 128), -1)])
def test_matches_float64_reference(fmt, shape, axis):
    w = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    if axis == -2:
        w[..., :64, :] = 0.0  # an all-zero block stays exactly zero
    q = quant.quantize_array(w, fmt, axis=axis, double_quant=False)
    codes, absmax, deq, margin = ref_blockwise(w, quant.FORMATS[fmt].levels, 64, axis)
    assert_codes_match(q.unpacked_codes(), codes, margin)
    np.testing.assert_array_equal(q.absmax(), absmax.astype(np.float32))
    same = np.asarray(q.unpacked_codes()) == codes
    np.testing.assert_allclose(np.asarray(q.materialize())[same], deq[same], rtol=2e-7, atol=1e-30)


def test_double_quant_matches_reference():
    w = np.random.default_rng(2).standard_normal((2, 320, 200)).astype(np.float32)  # 1000 absmax/matrix
    q = quant.quantize_array(w, "nf4")
    assert q.double_quant
    codes, absmax, _, margin = ref_blockwise(w, BNB_NF4, 64, -2)
    assert_codes_match(q.unpacked_codes(), codes, margin)
    dq_codes, decoded, dq_margin = ref_double_quant(absmax)
    assert_codes_match(q.scales, dq_codes, dq_margin)
    np.testing.assert_allclose(q.absmax(), decoded, rtol=1e-6, atol=1e-6)
    # the 8-bit constants cost < 0.5% of absmax
    assert np.abs(np.asarray(q.absmax()) - absmax).max() / absmax.max() < 5e-3


def test_round_trip_error_per_format():
    w = jax.random.normal(jax.random.key(3), (1024, 1024))
    errors = {}
    for name, kwargs in [("nf4", {}), ("nf4 no-dq", {"double_quant": False}), ("int4", {}), ("int8", {})]:
        q = quant.quantize_array(w, name.split()[0], **kwargs)
        errors[name] = float(jnp.sqrt(jnp.mean((q.materialize() - w) ** 2)))
    print("\nround-trip RMSE on N(0,1) weights, block 64:",
          ", ".join(f"{k}={v:.5f}" for k, v in errors.items()))
    assert errors["nf4"] < errors["int4"]
    assert errors["int8"] < errors["nf4"]
    assert abs(errors["nf4"] - errors["nf4 no-dq"]) < 0.01 * errors["nf4 no-dq"]


def test_bits_per_parameter():
    w = jax.random.normal(jax.random.key(4), (576, 1536))
    bits = {}
    for name, kwargs in [("nf4+dq", {}), ("nf4", {"double_quant": False}), ("int4", {}), ("int8", {})]:
        q = quant.quantize_array(w, name.split("+")[0], **kwargs)
        nbytes = sum(x.on_device_size_in_bytes() for x in jax.tree.leaves(q))
        assert nbytes == q.nbytes
        bits[name] = 8 * nbytes / w.size
    print("\nbits/param:", bits)
    assert bits["nf4+dq"] <= 4.2
    assert bits["nf4"] == bits["int4"] == 4.5 and bits["int8"] == 8.5


def test_leaf_metadata_and_dtype():
    w = jnp.ones((128, 64), jnp.bfloat16)
    q = quant.quantize_array(w, "int4")
    assert q.shape == (128, 64) and q.dtype == jnp.bfloat16 and q.materialize().dtype == jnp.bfloat16
    assert q.materialize(jnp.float32).dtype == jnp.float32
    assert q.metadata() == {"format": "int4", "block_size": 64, "axis": -2, "double_quant": False,
                            "shape": [128, 64], "dtype": "bfloat16"}
    leaves, treedef = jax.tree.flatten(q)
    assert jax.tree.unflatten(treedef, leaves).metadata() == q.metadata()


# ----------------------------------------------------------------------------- QLoRA on a tiny model

VOCAB, D, F, L = 32, 64, 128, 3


def tiny_params(key):
    k = jax.random.split(key, 3)
    return {
        "embed": {"embedding": jax.random.normal(k[0], (VOCAB, D))},
        "layers": {"up": {"kernel": 0.1 * jax.random.normal(k[1], (L, D, F))},
                   "down": {"kernel": 0.1 * jax.random.normal(k[2], (L, F, D))},
                   "norm": {"scale": jnp.ones((L, D))}},
    }


def tiny_forward(params, ids, dtype=jnp.float32):
    table = params["embed"]["embedding"]
    h = ops.embed(ids, table, dtype)

    def layer(h, p):
        h = h * ops.as_array(p["norm"]["scale"], dtype)
        return h + ops.linear(jax.nn.silu(ops.linear(h, p["up"]["kernel"])), p["down"]["kernel"]), None

    h, _ = jax.lax.scan(layer, h, params["layers"])
    return ops.attend(h, table)


def loss_fn(params, ids):
    logits = tiny_forward(params, ids[:, :-1]).astype(jnp.float32)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))


TARGETS = r".*/(kernel|embedding)"
IDS = jnp.arange(12).reshape(2, 6) % VOCAB
AXES = {"embed": {"embedding": ("vocab", "embed")}}  # the table's role (blocked along its rows' width)


@pytest.fixture(scope="module")
def qlora():
    params = tiny_params(jax.random.key(5))
    qparams = quant.quantize(params, TARGETS, axes=AXES)
    # The tiny model ties its output head to the table: the LoRA delta goes to both (merge == apply).
    method = jpeft.lora(rank=4, alpha=8, targets=TARGETS, ensure_weight_tying=True)
    adapter = method.init(jax.random.key(6), qparams)
    return params, qparams, method, adapter


def _perturbed(adapter):
    keys = iter(jax.random.split(jax.random.key(7), 8))
    return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), adapter)


def test_quantize_tree_keeps_other_leaves(qlora):
    params, qparams, _, _ = qlora
    assert quant.is_quantized(qparams["layers"]["up"]["kernel"])
    assert qparams["embed"]["embedding"].axis == -1  # tables are blocked along dim
    assert qparams["layers"]["norm"]["scale"] is params["layers"]["norm"]["scale"]
    assert sorted(quant.describe(qparams)) == ["embed/embedding", "layers/down/kernel", "layers/up/kernel"]


def test_fresh_adapter_is_exactly_the_quantized_model(qlora):
    _, qparams, method, adapter = qlora
    applied = method.apply(qparams, adapter)
    assert isinstance(applied["layers"]["up"]["kernel"].base, quant.QuantizedArray)
    np.testing.assert_array_equal(tiny_forward(applied, IDS), tiny_forward(qparams, IDS))


def test_quantized_model_close_to_float(qlora):
    params, qparams, _, _ = qlora
    want, got = tiny_forward(params, IDS), tiny_forward(qparams, IDS)
    assert float(jnp.abs(got - want).max() / jnp.abs(want).max()) < 0.1
    np.testing.assert_allclose(tiny_forward(quant.dequantize(qparams), IDS), got, rtol=1e-5, atol=1e-5)


def test_gradients_only_for_adapter(qlora):
    _, qparams, method, adapter = qlora
    adapter = _perturbed(adapter)
    loss = lambda a: loss_fn(method.apply(qparams, a), IDS)
    grads = jax.jit(jax.grad(loss))(adapter)
    assert jax.tree.structure(grads) == jax.tree.structure(adapter)
    for path, g in tree.flatten(grads).items():
        assert np.all(np.isfinite(g)) and float(jnp.abs(g).max()) > 0, path
    with pytest.raises(TypeError):  # integer codes are inputs only
        jax.grad(lambda q: loss_fn(method.apply(q, adapter), IDS))(qparams)


def test_merge_equals_unmerged(qlora):
    _, qparams, method, adapter = qlora
    adapter = _perturbed(adapter)
    merged = method.merge(qparams, adapter)
    for path in quant.describe(qparams):
        leaf = tree.flatten(merged)[path]
        assert isinstance(leaf, jax.Array) and leaf.dtype == jnp.float32, path
    np.testing.assert_allclose(tiny_forward(merged, IDS), tiny_forward(method.apply(qparams, adapter), IDS),
                               rtol=1e-5, atol=1e-5)


def test_jit_matches_eager_and_bf16_compute(qlora):
    _, qparams, method, adapter = qlora
    applied = method.apply(qparams, _perturbed(adapter))
    eager = tiny_forward(applied, IDS)
    np.testing.assert_allclose(jax.jit(tiny_forward)(applied, IDS), eager, rtol=1e-5, atol=1e-5)
    bf16 = jax.jit(tiny_forward, static_argnums=2)(applied, IDS, jnp.bfloat16)
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(bf16.astype(jnp.float32), eager, rtol=0.1, atol=0.3)


def test_embed_dequantizes_rows_exactly(qlora):
    _, qparams, _, _ = qlora
    table = qparams["embed"]["embedding"]
    np.testing.assert_array_equal(table.embed(IDS, jnp.float32), jnp.take(table.materialize(), IDS, axis=0))


def test_backward_keeps_no_float_weight(qlora, capsys):
    """jax.checkpoint around the dequantizing matmul: residuals are codes, not float weights."""
    _, qparams, method, adapter = qlora
    print_saved_residuals(lambda a, q: loss_fn(method.apply(q, a), IDS), adapter, qparams)
    saved = capsys.readouterr().out
    assert "from the argument q['layers']['up']['kernel'].codes" in saved, saved
    for shape in (f"[{L},{D},{F}]", f"[{L},{F},{D}]", f"[{VOCAB},{D}]"):
        assert f"f32{shape}" not in saved and f"bf16{shape}" not in saved, saved


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
@pytest.mark.parametrize("axis", [-1, -2], ids=["blocked_along_dim", "blocked_along_vocab"])
def test_a_large_tied_head_is_dequantized_a_slice_of_rows_at_a_time(monkeypatch, fmt, axis):
    """Also for a table blocked along its rows (quantized as if it were a kernel, without model=)."""
    from jpeft.quant import array

    table = quant.quantize_array(jax.random.normal(jax.random.key(0), (1024, 128)), fmt, block_size=32, axis=axis)
    x = jax.random.normal(jax.random.key(1), (2, 3, 128))
    loss = lambda x, q: jnp.sum(jnp.sin(q.attend(x)))
    whole = jax.jit(jax.value_and_grad(loss))
    want_value, want_grad = whole(x, table)
    dense = x @ table.materialize().T
    np.testing.assert_allclose(jax.jit(lambda x, q: q.attend(x))(x, table), dense, rtol=1e-5, atol=1e-5)

    monkeypatch.setattr(array, "ATTEND_CHUNK_BYTES", 128 * 2**10)  # the table is 512 KiB as float32
    assert table._attend_chunks(4) == 16  # 64 rows a slice: two whole blocks of 32 rows when blocked along rows
    sliced = jax.jit(jax.value_and_grad(loss))
    value, grad = sliced(x, table)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-4)  # sums over 1024 rows in another order
    temp = lambda f: f.lower(x, table).compile().memory_analysis().temp_size_in_bytes
    assert temp(sliced) < 512 * 2**10 <= temp(whole)  # no float copy of the whole table


def test_slices_of_a_table_blocked_along_rows_hold_whole_blocks_and_bytes(monkeypatch):
    from jpeft.quant import array

    monkeypatch.setattr(array, "ATTEND_CHUNK_BYTES", 8 * 2**10)  # 4 x 8 = 32 slices wanted for 63 KiB
    along_dim = quant.quantize_array(jnp.ones((96, 168)), "nf4", block_size=24, axis=-1)
    assert along_dim._attend_chunks(4) == 32  # slices of 3 rows
    along_rows = quant.quantize_array(jnp.ones((96, 168)), "nf4", block_size=6, axis=-2)
    assert along_rows._attend_chunks(4) == 16  # 16 blocks of 6 rows: no more slices than blocks
    along_rows = quant.quantize_array(jnp.ones((96, 168)), "int8", block_size=4, axis=-2)
    assert along_rows._attend_chunks(4) == 24  # 24 blocks of 4 rows


@pytest.mark.parametrize("fmt", ["nf4", "int4", "int8"])
@pytest.mark.parametrize("axis", [-1, -2], ids=["blocked_along_dim", "blocked_along_vocab"])
def test_embedding_lookup_dequantizes_only_the_rows_it_reads(fmt, axis):
    table = quant.quantize_array(jax.random.normal(jax.random.key(0), (256, 64)), fmt, block_size=32, axis=axis)
    ids_BxT = jnp.array([[0, 1, 2, 31, 32, 255], [33, 64, 100, 101, 254, 0]])
    lookup = jax.jit(lambda q, ids: q.embed(ids, jnp.float32))
    np.testing.assert_allclose(lookup(table, ids_BxT), table.materialize()[ids_BxT], rtol=1e-6, atol=1e-6)
    temp = lookup.lower(table, ids_BxT).compile().memory_analysis().temp_size_in_bytes
    assert temp < 256 * 64 * 4 // 4  # a float table would take 64 KiB; 12 rows are 3 KiB


def test_eval_shape_and_lora_init_on_abstract(qlora):
    params, _, method, _ = qlora
    abstract = jax.eval_shape(lambda p: quant.quantize(p, TARGETS, axes=AXES), params)
    leaf = abstract["layers"]["up"]["kernel"]
    assert isinstance(leaf, quant.QuantizedArray) and isinstance(leaf.codes, jax.ShapeDtypeStruct)
    assert leaf.shape == (L, D, F)
    adapter = jax.eval_shape(method.init, jax.random.key(0), abstract)
    assert adapter["layers"]["up"]["kernel"]["a"].shape == (L, D, 4)


def test_quantize_on_load_matches_quantize(qlora):
    params, qparams, _, _ = qlora
    leaf_fn = quant.quantize_on_load(TARGETS, axes=AXES)
    loaded = tree.unflatten({p: leaf_fn(p, np.asarray(v)) for p, v in tree.flatten(params).items()})
    leaf_fn.check_all_used()
    assert jax.tree.structure(loaded) == jax.tree.structure(qparams)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(qparams)):
        np.testing.assert_array_equal(got, want)
    unused = quant.quantize_on_load([TARGETS, r".*/lm_head/kernel"], axes=AXES)
    unused("embed/embedding", np.ones((VOCAB, D), np.float32))
    with pytest.raises(jpeft.RuleError, match="lm_head"):
        unused.check_all_used()


def test_orbax_round_trip_and_metadata_check(qlora, tmp_path):
    params, qparams, _, _ = qlora
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "q", qparams)
    checkpointer.wait_until_finished()
    saved_meta = json.loads(json.dumps(quant.describe(qparams)))

    like = jax.eval_shape(lambda p: quant.quantize(p, TARGETS, axes=AXES), params)
    quant.check_metadata(saved_meta, like)
    restored = checkpointer.restore(tmp_path / "q", like)
    np.testing.assert_array_equal(tiny_forward(restored, IDS), tiny_forward(qparams, IDS))

    as_int4 = jax.eval_shape(lambda p: quant.quantize(p, TARGETS, format="int4", axes=AXES), params)
    with pytest.raises(QuantizationError, match=r"layers/up/kernel: format 'nf4' in the checkpoint vs 'int4'"):
        quant.check_metadata(saved_meta, as_int4)
    other_block = jax.eval_shape(lambda p: quant.quantize(p, TARGETS, block_size=32, axes=AXES), params)
    with pytest.raises(QuantizationError, match="block_size 64 in the checkpoint vs 32"):
        quant.check_metadata(saved_meta, other_block)
    with pytest.raises(QuantizationError, match="embed/embedding: quantized in the checkpoint"):
        quant.check_metadata(saved_meta, jax.eval_shape(lambda p: quant.quantize(p, r".*/kernel"), params))


# ----------------------------------------------------------------------------- bad input


def test_block_size_must_divide():
    params = {"proj": {"kernel": jnp.ones((100, 8))}}
    with pytest.raises(QuantizationError, match=r"'proj/kernel' of shape \(100, 8\).*block size 64"):
        quant.quantize(params, r".*/kernel")
    with pytest.raises(QuantizationError, match="block_size must be even"):
        quant.quantize_array(jnp.ones((64, 8)), "nf4", block_size=7)


def test_unknown_format_and_settings():
    params = {"proj": {"kernel": jnp.ones((64, 8))}}
    with pytest.raises(QuantizationError, match=r"unknown quantization format 'nf3'.*'int4'"):
        quant.quantize(params, r".*/kernel", format="nf3")
    with pytest.raises(ValueError, match="unknown quantization format"):
        quant.quantize_on_load(r".*/kernel", format="fp4")
    with pytest.raises(QuantizationError, match="unknown quantization setting"):
        quant.quantize(params, jpeft.Rule(r".*/kernel", rank=4))


def test_refuses_non_matrices_and_requantizing():
    params = {"norm": {"scale": jnp.ones(64)}, "ids": {"kernel": jnp.ones((64, 2), jnp.int32)}}
    with pytest.raises(QuantizationError, match="at least 2 dims"):
        quant.quantize(params, r"norm/scale")
    with pytest.raises(QuantizationError, match="not a float dtype"):
        quant.quantize(params, r"ids/kernel")
    q = quant.quantize({"k": jnp.ones((64, 2))}, "k")
    with pytest.raises(QuantizationError, match="already a QuantizedArray"):
        quant.quantize(q, "k")
    with pytest.raises(jpeft.RuleError, match="matched no parameter"):
        quant.quantize(params, r".*/q_proj/kernel")
