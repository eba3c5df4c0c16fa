"""The runner: one training run, start to finish, for every task and method.

load model -> task (checks the model, reads the data) -> method (:mod:`jpeft.lifecycle`:
prepare, init, rebase) -> base score -> train -> finish (last stage, inference form,
summary) -> tuned score -> save adapter, metrics, loss curve, table. The task
(:mod:`train.tasks`) provides batches, the loss, evaluation and its metrics rows; the
runner knows no task or method by name. Every phase is timed; the timings go to
``metrics.jsonl`` and are printed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import jax
import numpy as np

import jpeft
from jpeft import lifecycle
from jpeft.checkpoint import restore_adapter, save_adapter
from jpeft.methods import registry
from train import checkpointing, distributed, loading, metrics_log, run_folder, tasks, trainer
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
    except registry.SettingsMappingError as err:
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


def restore(directory: str, cfg: RunConfig, loaded: loading.Loaded):
    """``(adapter, metadata)`` saved by a ``cfg.method`` run on ``loaded``'s model.

    An adapter saved by another method is a :class:`jpeft.checkpoint.CheckpointError`
    naming both methods, raised before any array is read. A method with stages saved the
    adapter of the stage that trained the last step.
    """
    like = lifecycle.saved_like(make_method(cfg, loaded.model, loaded.tokenizer), loaded.params, cfg.train.steps)
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


def run(cfg: RunConfig, *, loaded: loading.Loaded | None = None) -> dict:
    """Run the job ``cfg`` describes and return its summary (also written to the run folder).

    ``loaded``: the model ``cfg.model`` names, already loaded (to share it between runs).
    Everything that can be checked is checked before the run folder is written: the
    folder itself, the model files, the task against the model, the data, the method's
    settings against the model, and, when the folder holds an earlier run's checkpoints,
    that this run continues it.
    """
    timer = Timer()
    folder = run_folder.plan(run_dir=cfg.run_dir, out_dir=cfg.out_dir, name=cfg.name)
    loading.resolve(cfg.model)  # a missing model file fails before anything is loaded
    with timer("load_model"):
        loaded = loading.load(cfg.model) if loaded is None else loaded
    with timer("data"):
        task = tasks.build(cfg.task, dict(cfg.task_settings), run=cfg, loaded=loaded)
    params, model_ = task.loaded.params, task.loaded.model
    print(task.describe())

    # Method settings that do not fit the model or the task (a target that matches nothing, a rank
    # larger than a weight, a method that cannot train next to the task's head) are config errors,
    # reported before the run folder exists.
    try:
        method = task.with_method(make_method(cfg, model_, task.loaded.tokenizer))
        with timer("prepare") if method.training.prepare else contextlib.nullcontext():  # PIR scores data here
            begun = lifecycle.start(method, params, jax.random.key(cfg.train.seed),
                                    loss_fn=trainer.make_params_loss(model_, task.loss_sums),
                                    batches=task.batches_from(0))
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"the {cfg.method!r} settings do not fit the model or task {cfg.task!r}: {err}") from None
    method = begun.method
    checkpoints, resumed, corrupt = resume_point(cfg, folder, method, begun.adapter, params)

    run_folder.create(folder, method=cfg.method, config_yaml=describe(cfg), main=distributed.is_main())
    run_dir = folder.path
    print(f"run folder: {run_dir}")
    if checkpoints is None:
        checkpoints = checkpointing.for_run(run_dir, cfg)
    checkpoints.set_aside(corrupt)
    metrics_path = os.path.join(run_dir, "metrics.jsonl") if distributed.is_main() else os.devnull
    log = metrics_log.MetricsLog(metrics_path, resume_step=resumed.step if resumed is not None else None)
    counts = jpeft.param_report(params, begun.adapter)
    print(counts)
    log({"kind": "params", "trainable": counts.trainable, "total": counts.total, "percent": counts.percent,
         "trainable_bytes": counts.trainable_bytes})

    rows = []
    if task.scores_base and cfg.eval.base_model:  # `params` stay the loaded model's: the base model's score
        with timer("eval_base"):
            row = task.evaluate("base", params, run_dir, trainable=0, percent=0.0)
        if row is not None:
            rows.append(row)
            log({"kind": task.metrics, **row})

    with timer("train"):
        adapter = trainer.train_loop(
            cfg=cfg.train, method=method, model=model_, adapter=begun.adapter, frozen=begun.frozen,
            batches=task.batches_from, val_batches=task.val_batches, log=log, progress=cfg.progress,
            mesh=distributed.build_mesh(cfg.mesh), rules=cfg.sharding.rules, checkpoints=checkpoints,
            resumed=resumed, sums=task.loss_sums,
        )
    adapter = trainer.on_device_of(adapter, params)

    with timer("eval_tuned"):
        done = lifecycle.finish(method, begun.base, adapter, steps=cfg.train.steps)
        if done.summary:  # what the method says about its trained adapter (AdaLoRA: the rank pattern)
            print(done.summary)
            log({"kind": "method_summary", "text": done.summary})
        counts = jpeft.param_report(params, adapter)
        row = task.evaluate(task.label(done.method, adapter), done.params, run_dir, trainable=counts.trainable,
                            percent=counts.percent)
        del done
    if row is not None:
        rows.append(row)
        log({"kind": task.metrics, **row})

    with timer("save"):
        # "seed": the key of the fresh adapter, which a method with a rebase (PiSSA) needs to rebuild its base
        metadata = {**method_settings(cfg), "steps": cfg.train.steps, "seed": cfg.train.seed,
                    "model": to_dict(cfg.model), **task.metadata()}
        last = lifecycle.stage_at(method, cfg.train.steps)
        save_adapter(os.path.join(run_dir, "adapter"), last.saved_form(adapter), metadata=metadata)  # all processes
        if distributed.is_main():
            metrics_log.plot_loss(log.records, os.path.join(run_dir, "loss.png"), title=f"{cfg.name} ({cfg.method})")

    return finish(run_dir, task, rows, log, timer)


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
    if method.training.stages:  # the newest save holds the adapter of the stage its step trained in
        stage = lifecycle.stage_at(method, checkpointing.saved_step(folder.path))
        like = jax.eval_shape(lambda p: stage.init(jax.random.key(0), p), params)
    try:
        resumed, corrupt = checkpoints.resume_point(
            like, jax.eval_shape(optimizer.init, like), seed=cfg.train.seed, batch_size=cfg.train.batch_size,
            schedule=trainer.schedule_settings(cfg.train), method=cfg.method)
    except BaseException:
        checkpoints.close()
        raise
    return checkpoints, resumed, corrupt


def finish(run_dir: str, task: tasks.Task, rows: list[dict], log: metrics_log.MetricsLog, timer: Timer) -> dict:
    """Write ``summary.json``, print the task's table and the timing breakdown."""
    steps = [r for r in log.records if r["kind"] == "train"]
    step_s = {
        "first_step_incl_compile": steps[0]["seconds"],
        "median_step": float(np.median([r["seconds"] for r in steps[1:] or steps])),
    }
    summary = {"kind": "summary", "run_dir": run_dir, **task.summary(rows), "timings_s": {**timer.phases, **step_s},
               "elapsed_s": timer.elapsed}
    log(summary)
    if distributed.is_main():
        with open(os.path.join(run_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    if rows:
        print("\n" + task.table(rows))
    print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in summary["timings_s"].items()))
    print(f"elapsed: {timer.elapsed:.1f}s  (run folder {run_dir})")
    return summary
