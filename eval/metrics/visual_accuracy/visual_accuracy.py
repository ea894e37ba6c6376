"""Visual-task accuracy: the last `\\boxed{}` answer of each output equals the gold word(s)."""

import datasets
import evaluate

# A relative import, not `eval.grading`: see eval/metrics/README.md (grading.py here is a symlink to it).
from .grading import aggregate_scores, boxed_word_correct, boxed_word_key

_DESCRIPTION = """Accuracy on the generated visual task (eval/visual.py): a prediction is correct when its last
`\\boxed{...}` holds the gold answer ("red", "3", "top left"), case and spacing ignored."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: model outputs, one string per question, or a list of n sampled outputs per question.
    references: gold answers (the task's `answer` column).
    k: for n samples, the k of pass@k and maj@k (int or list; default: 1 and n).
Returns:
    accuracy: mean correctness over all outputs (pass@1); with n samples also `pass@k` and `maj@k`.
Examples:
    >>> metric = evaluate.load("eval/metrics/visual_accuracy")
    >>> metric.compute(predictions=["The answer is \\\\boxed{Top left}."], references=["top left"])
    {'accuracy': 1.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VisualAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
                datasets.Features(
                    {
                        "predictions": datasets.Sequence(datasets.Value("string")),
                        "references": datasets.Value("string"),
                    }
                ),
            ],
        )

    def _compute(self, predictions, references, k=None) -> dict[str, float]:
        samples = [p if isinstance(p, list) else [p] for p in predictions]
        correct = [[boxed_word_correct(s, gold) for s in row] for row, gold in zip(samples, references)]
        keys = [[boxed_word_key(s) for s in row] for row in samples]
        ks = [k] if isinstance(k, int) else list(k or [1, min(len(row) for row in samples)])
        return aggregate_scores(correct, keys, ks)
