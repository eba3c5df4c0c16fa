"""IA3, prompt tuning, P-tuning and prefix tuning against Hugging Face PEFT itself, through PEFT files both ways,
on the three model kinds PEFT places virtual tokens for by ``task_type``: a decoder (Llama, CAUSAL_LM), an encoder
with a classifier (BERT, SEQ_CLS) and an encoder-decoder (T5, SEQ_2_SEQ_LM)."""

import json
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jpeft
from jpeft.errors import CheckpointError
from jpeft.io.hf import load_hf
from jpeft.io.peft import load_peft, save_peft
from jpeft.methods.heads import with_modules_to_save
import reference

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
import t5_reference  # noqa: E402  (needs torch)

SLOW = pytest.mark.slow  # the other model kinds of each method and direction
LLAMA_TOKENS = np.array([[1, 5, 9, 2, 7, 3], [4, 4, 8, 1, 0, 6]])
BERT_TOKENS = np.array([[2, 5, 9, 11, 7, 3], [4, 4, 8, 1, 0, 0]])
BERT_MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


class Kind(NamedTuple):
    """One model kind: its torch base, how both sides compute logits, and its PEFT task and IA3 modules."""

    task_type: str
    torch_base: Callable[[], Any]
    torch_logits: Callable[[Any], np.ndarray]
    jpeft_logits: Callable[[Any, Any], np.ndarray]
    ia3_modules: tuple[list[str], list[str]]   # PEFT's target_modules, feedforward_modules
    ia3_targets: tuple[str, str]               # the same as jpeft rules: targets, feedforward
    with_head: Callable[[Any], Any] = lambda method: method


def _llama(folder) -> Kind:
    reference.save_torch_llama(folder, intermediate_size=96)

    def torch_logits(module):
        with torch.no_grad():
            return module(torch.tensor(LLAMA_TOKENS)).logits[:, -LLAMA_TOKENS.shape[1]:].numpy()  # PEFT's has the prompt's

    return Kind("CAUSAL_LM", lambda: reference.torch_llama(folder), torch_logits,
                lambda model, params: np.asarray(model.forward(params, jnp.asarray(LLAMA_TOKENS))[0]),
                (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
                (r".*/(k|v|down)_proj/kernel", r".*/down_proj/kernel"))


def _bert(folder) -> Kind:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=16, num_labels=3)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)

    def torch_hidden(module):
        """The input tokens' last hidden states (PEFT's sequence classifier pools the first virtual token; jpeft's
        pools the input's [CLS], see docs/peft-format.md, so the classifier outputs are not compared here)."""
        with torch.no_grad():
            out = module(input_ids=torch.tensor(BERT_TOKENS), attention_mask=torch.tensor(BERT_MASK),
                         output_hidden_states=True)
        return out.hidden_states[-1][:, -BERT_TOKENS.shape[1]:].numpy()

    def jpeft_hidden(model, params):
        return np.asarray(model.forward(params, jnp.asarray(BERT_TOKENS), attention_mask_BxT=jnp.asarray(BERT_MASK))[0])

    return Kind("SEQ_CLS", lambda: transformers.BertForSequenceClassification.from_pretrained(folder).eval(),
                torch_hidden, jpeft_hidden, (["key", "value", "output.dense"], ["output.dense"]),
                (r".*/(key|value|output/dense)/kernel", r".*/output/dense/kernel"),
                lambda method: with_modules_to_save(method, r"classifier/.*"))  # PEFT's SEQ_CLS files carry the head


def _t5(folder) -> Kind:
    """A T5 with as many decoder layers as encoder layers (PEFT's seq2seq prefix sizes its cache by num_layers),
    an odd number, so PEFT's decoder layers read different block pairs (see jpeft.io.peft.prompt)."""
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_decoder_layers=3,
                                   num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=12,
                                   dropout_rate=0.0, decoder_start_token_id=0, feed_forward_proj="relu")
    transformers.T5ForConditionalGeneration(config).eval().save_pretrained(folder)
    return Kind("SEQ_2_SEQ_LM", lambda: transformers.T5ForConditionalGeneration.from_pretrained(folder).eval(),
                t5_reference.torch_logits, t5_reference.jpeft_logits, (["k", "v", "wo"], ["wo"]),
                (r".*(_attn/(k|v)|mlp/down)_proj/kernel", r".*/mlp/down_proj/kernel"))


_MAKERS = {"llama": _llama, "bert": _bert, "t5": _t5}
_KINDS = {}


@pytest.fixture
def kind(request, tmp_path_factory):
    name = request.param
    if name not in _KINDS:
        folder = tmp_path_factory.mktemp(name)
        _KINDS[name] = (folder, _MAKERS[name](folder))
    return _KINDS[name]


def peft_config(method: str, kind: Kind):
    n, task = 3, kind.task_type
    if method == "ia3":
        return peft.IA3Config(task_type=task, target_modules=kind.ia3_modules[0],
                              feedforward_modules=kind.ia3_modules[1])
    return {"prompt_tuning": lambda: peft.PromptTuningConfig(task_type=task, num_virtual_tokens=n),
            "p_tuning": lambda: peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=n, encoder_hidden_size=12),
            "prefix_tuning": lambda: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=n)}[method]()


def jpeft_method(method: str, kind: Kind, model):
    if method == "ia3":
        return kind.with_head(jpeft.ia3(targets=kind.ia3_targets[0], feedforward=kind.ia3_targets[1], model=model))
    return kind.with_head({"prompt_tuning": lambda: jpeft.prompt_tuning(3, init="normal", model=model),
            "p_tuning": lambda: jpeft.p_tuning(3, hidden_size=12, model=model),
            "prefix_tuning": lambda: jpeft.prefix_tuning(3, init="normal", model=model,
                                                         hook_points=("prefix",))}[method]())


def randomize_torch(module, seed):
    """Every trainable PEFT parameter random, around 1 for IA3's scales (zero or one would hide a mistake)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad and "modules_to_save" not in name:
                p.copy_(("ia3_l" in name) + 0.5 * torch.randn(p.shape, generator=gen))
    return module


def random_adapter(method, params, seed):
    rng = np.random.default_rng(seed)  # numpy: no random-number kernel to compile
    shapes = jax.eval_shape(method.init, jax.random.key(0), params)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(("ia3_l" in jax.tree_util.keystr(path)) + 0.5 * rng.standard_normal(x.shape),
                                    x.dtype), shapes)


@pytest.mark.parametrize("method, kind, scan_layers", [
    ("ia3", "llama", True), ("prompt_tuning", "bert", False), ("p_tuning", "t5", True), ("prefix_tuning", "t5", False),
    pytest.param("ia3", "bert", False, marks=SLOW), pytest.param("ia3", "t5", False, marks=SLOW),
    pytest.param("prompt_tuning", "llama", True, marks=SLOW), pytest.param("prompt_tuning", "t5", False, marks=SLOW),
    pytest.param("p_tuning", "llama", False, marks=SLOW), pytest.param("p_tuning", "bert", True, marks=SLOW),
    pytest.param("prefix_tuning", "llama", True, marks=SLOW)], indirect=["kind"])
def test_peft_saved_adapter_loads_into_jpeft(method, kind, scan_layers, tmp_path):
    folder, kind = kind
    theirs = randomize_torch(peft.get_peft_model(kind.torch_base(), peft_config(method, kind)), 1).eval()
    theirs.save_pretrained(tmp_path)
    expected = kind.torch_logits(theirs)
    assert np.abs(expected - kind.torch_logits(kind.torch_base())).max() > 1e-2  # the adapter changes the outputs
    model, params = load_hf(folder, scan_layers=scan_layers)
    loaded, adapter = load_peft(tmp_path, model, params)
    assert loaded.name == method
    np.testing.assert_allclose(kind.jpeft_logits(model, loaded.apply(params, adapter)), expected,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method, kind, scan_layers", [
    ("ia3", "bert", True), ("prompt_tuning", "t5", True), ("p_tuning", "llama", False), ("prefix_tuning", "llama", True),
    pytest.param("ia3", "llama", False, marks=SLOW), pytest.param("ia3", "t5", True, marks=SLOW),
    pytest.param("prompt_tuning", "llama", False, marks=SLOW), pytest.param("prompt_tuning", "bert", True, marks=SLOW),
    pytest.param("p_tuning", "bert", False, marks=SLOW), pytest.param("p_tuning", "t5", True, marks=SLOW),
    pytest.param("prefix_tuning", "t5", False, marks=SLOW)], indirect=["kind"])
def test_jpeft_saved_adapter_loads_into_peft(method, kind, scan_layers, tmp_path):
    folder, kind = kind
    model, params = load_hf(folder, scan_layers=scan_layers)
    ours = jpeft_method(method, kind, model)
    adapter = random_adapter(ours, params, 2)
    save_peft(tmp_path / "ours", model, ours, params, adapter)
    # The same files PEFT writes for the same settings: keys, shapes and the config fields PEFT reads.
    peft.get_peft_model(kind.torch_base(), peft_config(method, kind)).save_pretrained(tmp_path / "theirs")
    files = {side: load_file(tmp_path / side / "adapter_model.safetensors") for side in ("ours", "theirs")}
    shapes = {side: {k: v.shape for k, v in f.items() if "classifier" not in k} for side, f in files.items()}
    assert shapes["ours"] == shapes["theirs"]
    configs = {side: json.loads((tmp_path / side / "adapter_config.json").read_text()) for side in ("ours", "theirs")}
    fields = ["peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads",
              "num_transformer_submodules", "target_modules", "feedforward_modules"]
    for field in fields:
        mine, want = configs["ours"].get(field), configs["theirs"].get(field)
        if field in ("target_modules", "feedforward_modules") and mine is not None:
            assert all(any(m == t or m.endswith("." + t) for t in want) for m in mine), (field, mine, want)
        else:
            assert mine == want, (field, mine, want)
    theirs = peft.PeftModel.from_pretrained(kind.torch_base(), tmp_path / "ours").eval()
    expected = kind.torch_logits(theirs)
    np.testing.assert_allclose(kind.jpeft_logits(model, ours.apply(params, adapter)), expected, rtol=1e-4, atol=1e-4)
    assert np.abs(expected - kind.torch_logits(kind.torch_base())).max() > 1e-2
    again, adapter2 = load_peft(tmp_path / "ours", model, params)  # and back: the same tensors
    assert again.name == method
    want = jax.tree.leaves(ours.saved_form(adapter))
    for a, b in zip(jax.tree.leaves(adapter2), want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama"], indirect=True)
def test_wrong_files_fail_loudly(kind, tmp_path):
    folder, kind = kind
    model, params = load_hf(folder, scan_layers=True)
    prefix = jpeft.prefix_tuning(3, init="normal", model=model)
    save_peft(tmp_path / "prefix", model, prefix, params, random_adapter(prefix, params, 0))
    config = json.loads((tmp_path / "prefix" / "adapter_config.json").read_text())
    (tmp_path / "prefix" / "adapter_config.json").write_text(json.dumps({**config, "task_type": "SEQ_2_SEQ_LM"}))
    with pytest.raises(CheckpointError, match="task_type='SEQ_2_SEQ_LM'.*another kind of model"):
        load_peft(tmp_path / "prefix", model, params)
    (tmp_path / "prefix" / "adapter_config.json").write_text(json.dumps({**config, "num_virtual_tokens": 4}))
    with pytest.raises(CheckpointError, match=r"prompt_embeddings has shape \(3, 128\).*make \(4, 128\)"):
        load_peft(tmp_path / "prefix", model, params)
    # IA3 vectors under another key prefix (PEFT would load them with a warning and scale nothing)
    ia3 = jpeft.ia3(model=model)
    save_peft(tmp_path / "ia3", model, ia3, params, random_adapter(ia3, params, 0))
    tensors = load_file(tmp_path / "ia3" / "adapter_model.safetensors")
    save_file({k.replace("base_model.model.model.", "base_model.model."): v for k, v in tensors.items()},
              tmp_path / "ia3" / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="no such module"):
        load_peft(tmp_path / "ia3", model, params)
