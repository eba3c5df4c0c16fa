"""The jpeft training program: ``python -m train --config configs/<name>.yaml [key=value ...]``.

Modules: :mod:`train.config` (YAML + overrides -> the frozen, validated run config; the
program's own sections are :mod:`train.sections`), :mod:`train.tasks` (headlines, seq2seq,
classify: registered builders that give batches, the loss, evaluation and metrics rows),
:mod:`train.run` (the one runner: every task and method through :mod:`jpeft.lifecycle`),
:mod:`train.trainer` (train step and loop), :mod:`train.data` (the BBC News split, prompts,
batches), :mod:`train.loading` (model sources), :mod:`train.evaluate` (generation, ROUGE),
:mod:`train.metrics_log` (metrics, plot), :mod:`train.generate` (``python -m train.generate``).
"""
