"""The jpeft training program: ``python -m train --config configs/<name>.yaml [key=value ...]``.

Modules: :mod:`train.config` (YAML -> validated frozen dataclasses),
:mod:`train.data` (BBC News headlines: split, prompts, batches),
:mod:`train.model` (model sources), :mod:`train.trainer` (train step and loop),
:mod:`train.evaluate` (generation, ROUGE), :mod:`train.report` (metrics, plot),
:mod:`train.run` (the phases of a run).
"""
