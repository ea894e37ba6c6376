"""MATH accuracy: math-verify equivalence of each model output's final answer with the gold answer."""

import datasets
import evaluate

# A relative import, not `eval.grading`: see eval/metrics/README.md (grading.py here is a symlink to it).
from .grading import aggregate_scores, math_answer_correct, math_answer_key

_DESCRIPTION = """Accuracy on MATH-style problems. Each prediction is a full model output (chain of thought ending in
`\\boxed{...}` or "The final answer is ..."); it is correct when math-verify finds its final answer equivalent to the
gold answer (`verify(parse(gold), parse(prediction))`, gold first), within `timeout_seconds`."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: model outputs, one string per question, or a list of n sampled outputs per question.
    references: gold answers as in MATH-500's `answer` field (`\\frac{1}{2}`, `(3, \\frac{\\pi}{2})`).
    k: for n samples, the k of pass@k and maj@k (int or list; default: 1 and n).
    timeout_seconds: per-output grading time limit; a timeout counts as wrong.
Returns:
    accuracy: mean correctness over all outputs (pass@1); with n samples also `pass@k` and `maj@k`.
Examples:
    >>> metric = evaluate.load("eval/metrics/math_accuracy")
    >>> metric.compute(predictions=["... so the answer is $\\boxed{\\frac{1}{2}}$."], references=["0.5"])
    {'accuracy': 1.0}
"""

_CITATION = """@article{hendrycksmath2021, title={Measuring Mathematical Problem Solving With the MATH Dataset},
author={Hendrycks, Dan and Burns, Collin and Kadavath, Saurav and Arora, Akul and Basart, Steven and Tang, Eric and
Song, Dawn and Steinhardt, Jacob}, journal={NeurIPS}, year={2021}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MathAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
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

    def _compute(self, predictions, references, k=None, timeout_seconds: float = 5.0) -> dict[str, float]:
        samples = [p if isinstance(p, list) else [p] for p in predictions]
        correct = [
            [math_answer_correct(s, gold, timeout_seconds) for s in row] for row, gold in zip(samples, references)
        ]
        keys = [[math_answer_key(s) for s in row] for row in samples]
        ks = [k] if isinstance(k, int) else list(k or [1, min(len(row) for row in samples)])
        return aggregate_scores(correct, keys, ks)
