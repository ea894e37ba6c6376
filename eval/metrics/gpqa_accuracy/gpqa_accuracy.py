"""GPQA accuracy: the option letter a model output commits to, against the gold letter."""

import datasets
import evaluate

# A relative import, not `eval.grading`: see eval/metrics/README.md (grading.py here is a symlink to it).
from .grading import aggregate_scores, extract_choice_letter

_DESCRIPTION = """Multiple-choice accuracy (GPQA, MMLU). Each prediction is a full model output; its answer is the
letter in `\\boxed{B}`, "The best answer is B", "Answer: B", "the answer is (B)" (the last such statement), or a bare
letter. An output that states no letter is wrong."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: model outputs, one string per question, or a list of n sampled outputs per question.
    references: gold letters ("A"-"D"; after the choices were shuffled).
    letters: the valid option letters (default "ABCD").
    k: for n samples, the k of pass@k and maj@k (int or list; default: 1 and n).
Returns:
    accuracy: mean correctness over all outputs (pass@1); with n samples also `pass@k` and `maj@k`.
Examples:
    >>> metric = evaluate.load("eval/metrics/gpqa_accuracy")
    >>> metric.compute(predictions=["... The best answer is C"], references=["C"])
    {'accuracy': 1.0}
"""

_CITATION = """@inproceedings{rein2024gpqa, title={{GPQA}: A Graduate-Level Google-Proof Q\\&A Benchmark},
author={Rein, David and Hou, Betty Li and Stickland, Asa Cooper and Petty, Jackson and Pang, Richard Yuanzhe and
Dirani, Julien and Michael, Julian and Bowman, Samuel R.}, booktitle={COLM}, year={2024}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GpqaAccuracy(evaluate.Metric):
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

    def _compute(self, predictions, references, letters: str = "ABCD", k=None) -> dict[str, float]:
        samples = [p if isinstance(p, list) else [p] for p in predictions]
        keys = [[extract_choice_letter(s, letters) for s in row] for row in samples]
        golds = [str(gold).strip().upper() for gold in references]
        correct = [[key == gold for key in row] for row, gold in zip(keys, golds)]
        ks = [k] if isinstance(k, int) else list(k or [1, min(len(row) for row in samples)])
        return aggregate_scores(correct, keys, ks)
