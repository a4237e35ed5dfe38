"""Evaluation: perplexity, multiple choice, generation metrics, reasoning, multimodal, suites.

`from lmforge.evaluation import evaluate` runs an eval config (see `evaluation.runner`); it is
imported lazily so that light modules here (answers) do not pull in the engine.
"""


def __getattr__(name: str):
    if name in ("evaluate", "EvalResults"):
        from lmforge.evaluation import runner

        return getattr(runner, name)
    raise AttributeError(name)
