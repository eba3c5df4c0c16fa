"""One training run, start to finish: the phases ``python -m train`` goes through.

load model -> data -> method/adapter -> base ROUGE -> train -> tuned ROUGE ->
save adapter, metrics, loss curve, table. Every phase is timed; the timings go
to ``metrics.jsonl`` and are printed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import jax
import numpy as np

import jpeft
from jpeft.checkpoint import restore_adapter, save_adapter
from jpeft.methods import registry
from train import checkpointing, data, distributed, evaluate, model, report, run_folder, seq2seq, trainer
from train.config import ConfigError, RunConfig, describe, to_dict


def make_method(cfg: RunConfig, model=None, tokenizer=None) -> jpeft.Method:
    """The PEFT method the config names, built by its registered builder from its section.

    Builders that take a ``model`` or ``tokenizer`` get the loaded ones (prompt methods read
    the model's hook points; an ``init_text`` needs the tokenizer), and those that take
    ``total_step`` the run's ``train.steps`` (a schedule over the run: AdaLoRA's rank budget).
    """
    try:
        return registry.build(cfg.method, dict(cfg.method_settings), model=model, tokenizer=tokenizer,
                              total_step=cfg.train.steps)
    except registry.SettingsError as err:
        key = f"{cfg.method}.{err.setting}" if err.setting else cfg.method
        raise ConfigError(f"bad value for {key!r}: {err}" if err.setting else
                          f"the {key!r} settings do not fit: {err}") from None


def method_settings(cfg: RunConfig) -> dict:
    """What to record next to the adapter so it can be rebuilt: the method and its config section."""
    return {"method": cfg.method, **dict(cfg.method_settings)}


def method_label(cfg: RunConfig, method: jpeft.Method) -> str:
    """The method's name in result tables, e.g. ``lora r=8`` or ``lora r=8 (nf4 base)``."""
    quant = f" ({cfg.model.quantize} base)" if cfg.model.quantize else ""
    return method.describe() + quant


frozen_part = trainer.frozen_part


def restore(directory: str, cfg: RunConfig, loaded: model.Loaded):
    """``(adapter, metadata)`` saved by a ``cfg.method`` run on ``loaded``'s model.

    An adapter saved by another method is a :class:`jpeft.checkpoint.CheckpointError`
    naming both methods, raised before any array is read. A method with stages saved the
    adapter of the stage that trained the last step.
    """
    method = trainer.stage_at(make_method(cfg, loaded.model, loaded.tokenizer), cfg.train.steps)
    like = jax.eval_shape(lambda p: method.saved_form(method.init(jax.random.key(0), p)), loaded.params)
    return restore_adapter(directory, like=like, method=cfg.method)


class Timer:
    """Wall-clock seconds per named phase."""

    def __init__(self):
        self.start = time.perf_counter()
        self.phases: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        yield
        self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def run(cfg: RunConfig, *, loaded: model.Loaded | None = None) -> dict:
    """Run the job ``cfg`` describes and return its summary (also written to the run folder).

    ``loaded``: the model ``cfg.model`` names, already loaded (to share it between runs).
    Everything that can be checked is checked before the run folder is written: the
    folder itself, the model files, the data, the method's settings against the model,
    and, when the folder holds an earlier run's checkpoints, that this run continues it.
    """
    if cfg.task == "classify":  # the encoder job (train/classify.py)
        from train import classify

        return classify.run(cfg, loaded=loaded)
    timer = Timer()
    folder = run_folder.plan(run_dir=cfg.run_dir, out_dir=cfg.out_dir, name=cfg.name)
    model.resolve(cfg.model)  # a missing model file fails before anything is loaded
    with timer("load_model"):
        loaded = model.load(cfg.model) if loaded is None else loaded
    params, model_, tokenizer = loaded.params, loaded.model, loaded.tokenizer
    if model_.family.init_cache is None or model_.family.head is None:
        raise ConfigError(f"task: headlines generates text, but the {model_.name!r} model is an encoder without a "
                          "language-model head; use task: classify with it, or a decoder (model.source: smollm2)")

    with timer("data"):
        seq2seq.check_task(cfg.task, model_, tokenizer)
        task = seq2seq.Seq2SeqTask(cfg, tokenizer, model_) if cfg.task == "seq2seq" else Task(cfg, tokenizer)
    print(
        f"data: {len(task.split.train)} train / {len(task.split.val)} val / {len(task.split.test)} test articles;"
        f" training on {len(task.train)}, ROUGE on {len(task.test)}; max sequence {task.fmt.max_len} tokens"
    )

    # Method settings that do not fit the model (a target that matches nothing, a rank
    # larger than a weight) are config errors: reported before the run folder exists.
    method = make_method(cfg, model_, tokenizer)
    try:
        if method.prepare is not None:  # it chooses what to train from the training data (PIR's scores)
            with timer("prepare"):
                method = method.prepare(params, trainer.make_params_loss(model_), task.batches_from(0))
        adapter = method.init(jax.random.key(cfg.train.seed), params)
    except ValueError as err:
        raise ConfigError(f"the {cfg.method!r} settings do not fit the model: {err}") from None
    # A method whose fresh adapter is taken out of the base (PiSSA) trains over the base it returns;
    # `params` stay the loaded model's (the base model's ROUGE).
    frozen = frozen_part(params if method.rebase is None else method.rebase(params, adapter), adapter)
    checkpoints, resumed, corrupt = resume_point(cfg, folder, method, adapter, params)

    run_folder.create(folder, method=cfg.method, config_yaml=describe(cfg), main=distributed.is_main())
    run_dir = folder.path
    print(f"run folder: {run_dir}")
    if checkpoints is None:
        checkpoints = checkpointing.for_run(run_dir, cfg)
    checkpoints.set_aside(corrupt)
    metrics_path = os.path.join(run_dir, "metrics.jsonl") if distributed.is_main() else os.devnull
    log = report.MetricsLog(metrics_path, resume_step=resumed.step if resumed is not None else None)
    counts = jpeft.param_report(params, adapter)
    print(counts)
    log({"kind": "params", "trainable": counts.trainable, "total": counts.total, "percent": counts.percent,
         "trainable_bytes": counts.trainable_bytes})

    rows = []
    if cfg.eval.base_model and cfg.eval.test_articles:
        with timer("eval_base"):
            rows.append(score(cfg, "base", params, model_, task, trainable=0, percent=0.0, run_dir=run_dir))
        log({"kind": "rouge", **rows[-1]})

    with timer("train"):
        adapter = trainer.train_loop(
            cfg=cfg.train, method=method, model=model_, adapter=adapter, frozen=frozen,
            batches=task.batches_from, val_batches=task.val_batches, log=log, progress=cfg.progress,
            mesh=distributed.build_mesh(cfg.mesh), rules=cfg.sharding.rules, checkpoints=checkpoints,
            resumed=resumed,
        )

    if method.summary is not None:  # what the method says about its trained adapter (AdaLoRA: the rank pattern)
        text = method.summary(trainer.on_device_of(adapter, params))
        if text:
            print(text)
            log({"kind": "method_summary", "text": text})
    if method.stages:  # the stage that trained the last step, and what it trains
        method = trainer.stage_at(method, cfg.train.steps)
        counts = jpeft.param_report(params, adapter)
        frozen = frozen_part(params, adapter)
    if cfg.eval.test_articles:  # eval.test_articles=0: no ROUGE
        with timer("eval_tuned"):
            tuned = jpeft.for_inference(method, frozen, trainer.on_device_of(adapter, params))
            rows.append(score(cfg, method_label(cfg, method), tuned, model_, task, trainable=counts.trainable,
                              percent=counts.percent, run_dir=run_dir))
            del tuned
        log({"kind": "rouge", **rows[-1]})

    with timer("save"):
        # "seed": the key of the fresh adapter, which a method with ``rebase`` (PiSSA) needs to rebuild its base
        metadata = {**method_settings(cfg), "steps": cfg.train.steps, "seed": cfg.train.seed,
                    "model": to_dict(cfg.model)}
        save_adapter(os.path.join(run_dir, "adapter"), method.saved_form(adapter), metadata=metadata)  # all processes
        if distributed.is_main():
            report.plot_loss(log.records, os.path.join(run_dir, "loss.png"), title=f"{cfg.name} ({cfg.method})")

    return finish(run_dir, rows, log, timer)


def resume_point(cfg: RunConfig, folder: run_folder.RunFolder, method: jpeft.Method, adapter, params=None):
    """``(checkpoints, resumed state or None, corrupt steps to set aside)`` for this run, checked, nothing written.

    A folder with an earlier run's checkpoints must be continued by the same run: the
    same method (the folder's marker and the checkpoint's metadata say which), seed,
    batch size, schedule and adapter shapes, with ``checkpoint.resume`` on. Anything else
    is refused here, before the folder is touched.
    """
    has_saves = folder.existing and checkpointing.saved_step(folder.path) is not None
    if not has_saves:
        return None, None, []
    earlier = run_folder.marker(folder.path).get("method")
    if earlier not in (None, cfg.method):
        raise ConfigError(f"{folder.path!r} holds a {earlier!r} run; this config trains {cfg.method!r}. Resume it "
                          "with its own method, or use a new run_dir")
    if not cfg.checkpoint.resume:
        raise ConfigError(f"{folder.path!r} already holds checkpoints (latest step "
                          f"{checkpointing.saved_step(folder.path)}); set checkpoint.resume=true to continue the run, "
                          "or use a new run_dir")
    checkpoints = checkpointing.for_run(folder.path, cfg)
    optimizer, _ = trainer.make_optimizer(cfg.train, method)
    like = jax.eval_shape(lambda a: a, adapter)
    if method.stages:  # the newest save holds the adapter of the stage its step trained in
        stage = trainer.stage_at(method, checkpointing.saved_step(folder.path))
        like = jax.eval_shape(lambda p: stage.init(jax.random.key(0), p), params)
    try:
        resumed, corrupt = checkpoints.resume_point(
            like, jax.eval_shape(optimizer.init, like), seed=cfg.train.seed, batch_size=cfg.train.batch_size,
            schedule=trainer.schedule_settings(cfg.train), method=cfg.method)
    except BaseException:
        checkpoints.close()
        raise
    return checkpoints, resumed, corrupt


def finish(run_dir: str, rows: list[dict], log: report.MetricsLog, timer: Timer) -> dict:
    """Write ``summary.json``, print the ROUGE table and the timing breakdown."""
    steps = [r for r in log.records if r["kind"] == "train"]
    step_s = {
        "first_step_incl_compile": steps[0]["seconds"],
        "median_step": float(np.median([r["seconds"] for r in steps[1:] or steps])),
    }
    summary = {"kind": "summary", "run_dir": run_dir, "rouge": rows, "timings_s": {**timer.phases, **step_s},
               "elapsed_s": timer.elapsed}
    log(summary)
    if distributed.is_main():
        with open(os.path.join(run_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    print("\n" + evaluate.rouge_table(rows))
    print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in summary["timings_s"].items()))
    print(f"elapsed: {timer.elapsed:.1f}s  (run folder {run_dir})")
    return summary


class Task:
    """Encoded examples and fixed batches for one run."""

    def __init__(self, cfg: RunConfig, tokenizer):
        dc = cfg.data
        _, self.split = data.configured_split(dc)
        self.fmt = data.PromptFormat(
            tokenizer, max_article_tokens=dc.max_article_tokens, max_headline_tokens=dc.max_headline_tokens
        )
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.fmt.eos_id
        train_articles = self.split.train[: dc.max_train_articles]
        bs = cfg.train.batch_size
        if len(train_articles) < bs:
            raise ConfigError(f"train.batch_size={bs} is larger than the {len(train_articles)} training articles "
                              "(data.max_train_articles and the split decide them); lower train.batch_size")
        if len(self.split.val) < bs:
            raise ConfigError(f"the validation split has {len(self.split.val)} articles, fewer than one batch of "
                              f"train.batch_size={bs}: there would be no validation loss. Raise data.val_fraction "
                              "or lower train.batch_size")
        self.train = self.fmt.encode(train_articles)
        val = self.fmt.encode(self.split.val[: cfg.train.val_batches * bs])
        shape = dict(pad_id=self.pad_id, bucket_size=dc.bucket_size, max_len=self.fmt.max_len - 1,
                     max_answer=dc.max_headline_tokens + 1)
        self.val_batches = data.eval_batches(val, batch_size=bs, **shape)
        self.batches_from = lambda start: data.train_batches(  # batch `start` on: a pure function of (seed, start)
            self.train, batch_size=bs, seed=cfg.train.seed, start=start, **shape)
        self.batches = self.batches_from(0)
        self.test = self.split.test[: cfg.eval.test_articles]


def score(cfg: RunConfig, label: str, params, model_, task: Task, *, trainable, percent, run_dir) -> dict:
    """Generate headlines for the test articles and ROUGE them; predictions go to a JSONL file."""
    t = time.perf_counter()
    predictions = evaluate.generate_headlines(
        params, model_, task.fmt, task.test, batch_size=cfg.eval.batch_size,
        max_new_tokens=cfg.eval.max_new_tokens, bucket_size=cfg.data.bucket_size, pad_id=task.pad_id,
    )
    references = [a.headline for a in task.test]
    scores = evaluate.rouge(predictions, references)
    name = "base" if label == "base" else "tuned"
    with open(os.path.join(run_dir, f"predictions_{name}.jsonl"), "w", encoding="utf-8") as f:
        for a, p in zip(task.test, predictions):
            f.write(json.dumps({"key": a.key, "reference": a.headline, "prediction": p}) + "\n")
    seconds = time.perf_counter() - t
    print(f"{label}: ROUGE-1 {scores['rouge1']:.2f}  ({len(predictions)} articles, {seconds:.1f}s)"
          f"  e.g. {predictions[0]!r} for {references[0]!r}")
    return {"model": label, "trainable": trainable, "percent": percent, **scores, "seconds": seconds}
