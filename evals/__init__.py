"""Evaluations: HellaSwag (``evals.hellaswag``), validation loss (``evals.val_loss``), DCLM CORE (``evals.core``),
lm-evaluation-harness tasks (``evals.tasks``, ``evals.harness``) and the ``gpt2-eval`` CLI
(``evals.run``). The evaluator classes are importable from here; nothing is imported until first use."""

__all__ = ["CoreEvaluator", "HellaSwagEvaluator", "TaskEvaluator", "ValLossEvaluator"]


def __getattr__(name: str):
    if name == "CoreEvaluator":
        from evals.core import CoreEvaluator

        return CoreEvaluator
    if name == "HellaSwagEvaluator":
        from evals.hellaswag import HellaSwagEvaluator

        return HellaSwagEvaluator
    if name == "TaskEvaluator":
        from evals.tasks import TaskEvaluator

        return TaskEvaluator
    if name == "ValLossEvaluator":
        from evals.val_loss import ValLossEvaluator

        return ValLossEvaluator
    raise AttributeError(f"module 'evals' has no attribute {name!r}")
