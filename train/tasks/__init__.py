"""The tasks ``python -m train`` can run, registered by name (see :mod:`train.tasks.base`).

    headlines  a decoder writes the headline after the article; ROUGE     (train/tasks/headlines.py)
    seq2seq    an encoder-decoder (T5) reads the article, writes the headline (train/tasks/seq2seq.py)
    classify   an encoder classifies the article; accuracy, macro-F1      (train/tasks/classify.py)

Adding a task is one module with a builder, and one ``register`` line here.
"""

from train.tasks.base import CONTEXT, Task, build, check_settings, defaults, get, names, register, settings
from train.tasks import classify, headlines, seq2seq

register("headlines", headlines.headlines)
register("seq2seq", seq2seq.seq2seq)
register("classify", classify.classify)

__all__ = ["CONTEXT", "Task", "build", "check_settings", "defaults", "get", "names", "register", "settings"]
