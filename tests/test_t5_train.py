"""Seq2seq training on T5: a tiny random T5 learns to copy its input (teacher forcing, loss on the
target tokens), and greedy decoding with the cache then reproduces unseen inputs."""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reference
from jpeft.models import generation, t5
from train import data, trainer
from train.tasks import seq2seq

EOS, LENGTH = 1, 5


def copy_examples(rng, n):
    seqs = rng.integers(2, 12, size=(n, LENGTH))
    return [data.Encoded([*s, EOS], [*s, EOS]) for s in seqs.tolist()]


def train_copy(steps: int):
    """``(model, params, losses)``: a tiny random T5 v1.1 trained on the copy task with the trainer's seq2seq loss."""
    model = t5.model(t5.T5Config(vocab_size=12, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                 feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                 relative_attention_num_buckets=32, relative_attention_max_distance=32))
    params = model.init(jax.random.key(0), stddev=0.1)
    loss_fn = trainer.make_params_loss(model, seq2seq.target_xent)
    optimizer = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 20, steps))
    shape = dict(pad_id=0, decoder_start_id=0, bucket_size=8, max_len=8, max_answer=LENGTH + 1)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(0)
    opt_state, losses = optimizer.init(params), []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, seq2seq.seq2seq_batch(copy_examples(rng, 32), **shape))
        losses.append(float(loss))
    return model, params, losses


def test_the_seq2seq_loss_falls_on_the_copy_task():
    _, _, losses = train_copy(60)
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.5, losses


@pytest.mark.slow
def test_a_tiny_t5_learns_to_copy_and_greedy_decoding_reproduces_the_input():
    model, params, losses = train_copy(1000)
    assert np.mean(losses[:10]) > 2.0 and np.mean(losses[-10:]) < 0.05, (losses[:3], losses[-3:])
    test = copy_examples(np.random.default_rng(1), 16)
    source = jnp.asarray([e.prompt for e in test])
    out = generation.generate(model, params, source, max_new_tokens=LENGTH + 1, eos_id=EOS)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(source))


# ---------------------------------------------------------------- the training program


REPO = Path(__file__).resolve().parents[1]


def _t5_folder(folder, tokenizer, vocab_size=None):
    from jpeft.io.hf import save_hf

    model = t5.model(t5.T5Config(vocab_size=vocab_size or len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                 num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                 relative_attention_num_buckets=16, relative_attention_max_distance=64))
    save_hf(folder, model, reference.numpy_params(model, stddev=0.05))  # numpy draws: nothing to compile
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_t5_folder(tmp_path_factory, tokenizer):
    """A random tiny T5 (v1.1 layout) with SmolLM2's tokenizer: no T5 weights or tokenizer install offline."""
    return _t5_folder(tmp_path_factory.mktemp("tiny-t5"), tokenizer)


@pytest.mark.parametrize("job", ["lora", "qlora", "prefix_tuning"])
def test_the_shipped_t5_configs_are_valid_and_their_placeholder_folder_is_named(job):
    from train import config as config_lib
    from train import loading

    cfg = config_lib.load_config(str(REPO / "configs" / f"t5_bbc_{job}.yaml"))
    assert (cfg.task, cfg.method) == ("seq2seq", "prefix_tuning" if job == "prefix_tuning" else "lora")
    if job != "prefix_tuning":  # the lab's setting
        assert (cfg.lora.rank, cfg.lora.targets) == (32, ".*/(q|v)_proj/kernel")
    assert cfg.model.quantize == ("nf4" if job == "qlora" else None)
    with pytest.raises(loading.ModelSourceError, match="/path/to/flan-t5-base"):
        loading.resolve(cfg.model)


def _refused(tmp_path, capsys, folder, *overrides):
    from train import __main__ as cli

    out_dir = tmp_path / "runs"
    config = tmp_path / "c.yaml"
    config.write_text("name: x\n")
    code = cli.main(["--config", str(config), f"out_dir={out_dir}", f"model.hf_folder={folder}",
                     "data.max_train_articles=8", *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and not out_dir.exists()
    return err


def test_a_seq2seq_job_on_a_decoder_only_model_is_refused(tmp_path, capsys, tiny_hf_folder):
    err = _refused(tmp_path, capsys, tiny_hf_folder, "task=seq2seq")
    assert "task: seq2seq needs an encoder-decoder model (T5), but the model is a 'llama' decoder" in err


def test_a_causal_job_on_t5_is_refused(tmp_path, capsys, tiny_t5_folder):
    assert "set task: seq2seq" in _refused(tmp_path, capsys, tiny_t5_folder)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, capsys, tokenizer):
    folder = _t5_folder(tmp_path / "small-vocab", tokenizer, vocab_size=64)
    err = _refused(tmp_path, capsys, folder, "task=seq2seq")
    assert f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has 64 rows" in err


SHIPPED_T5_JOBS = {
    "lora": ["lora.rank=4", "lora.alpha=8", "lora.dropout=0.0", "lora.targets=.*/kernel"],
    "qlora": ["lora.rank=4", "lora.alpha=8", "lora.dropout=0.0", "lora.targets=.*/kernel", "model.quant_block_size=16"],
    "prefix_tuning": ["prefix_tuning.num_virtual_tokens=4", "prefix_tuning.hidden_size=16"],
}


@pytest.mark.slow
@pytest.mark.parametrize("job", list(SHIPPED_T5_JOBS))
def test_a_shipped_seq2seq_job_runs_end_to_end_on_a_tiny_t5(tmp_path, tiny_t5_folder, bbc_dir, job):
    from train import config as config_lib
    from train import run

    cfg = config_lib.load_config(str(REPO / "configs" / f"t5_bbc_{job}.yaml"), [
        f"model.hf_folder={tiny_t5_folder}", f"run_dir={tmp_path / 'run'}", "progress=false", f"data.dir={bbc_dir}",
        *SHIPPED_T5_JOBS[job], "data.max_article_tokens=24",
        "data.max_headline_tokens=12", "data.bucket_size=32", "data.max_train_articles=8", "train.steps=12",
        "train.batch_size=4", "train.lr=3e-2", "train.warmup_steps=1", "train.eval_every=6", "train.val_batches=1",
        "eval.test_articles=4", "eval.batch_size=4", "eval.max_new_tokens=4"])
    summary = run.run(cfg)
    run_dir = Path(summary["run_dir"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses
    assert len([r for r in records if r["kind"] == "rouge"]) == 2
    assert {"summary.json", "predictions_base.jsonl", "predictions_tuned.jsonl"} <= set(os.listdir(run_dir))
