"""BIG-Bench Hard accuracy: exact match of each output's extracted answer with the target, per task family."""

import datasets
import evaluate

# A relative import, not `eval.grading`: see eval/metrics/README.md (grading.py here is a symlink to it).
from .grading import BBH_TASKS, aggregate_scores, bbh_gold_key, extract_bbh_answer, macro_scores

_DESCRIPTION = """Accuracy on BIG-Bench Hard. Each prediction is a full model output (chain of thought ending in "So the
answer is X."); its answer is extracted by the task's family (option letters, true/false, yes/no, valid/invalid,
numbers, Dyck closing brackets, sorted words) and compared with the target after the same normalisation, so
"So the answer is B." matches "(B)" and "(C)" never does."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: model outputs, one string per question, or a list of n sampled outputs per question.
    references: BBH targets ("(B)", "True", "valid", "24", "} ] >", "apple banana").
    tasks: the BBH task of each prediction (a name, or one per prediction), e.g. "date_understanding".
    inputs: optional task inputs (questions), so that an option's text is accepted in place of its letter.
    k: for n samples, the k of pass@k and maj@k (int or list; default: 1 and n).
Returns:
    accuracy over all outputs, `macro_accuracy` (the mean of the per-task accuracies) and `accuracy_<task>`;
    with n samples also `pass@k` and `maj@k` (and their macro averages).
Examples:
    >>> metric = evaluate.load("eval/metrics/bbh_accuracy")
    >>> metric.compute(predictions=["... So the answer is B."], references=["(B)"], tasks="snarks")
    {'accuracy': 1.0, 'macro_accuracy': 1.0, 'accuracy_snarks': 1.0}
"""

_CITATION = """@article{suzgun2022challenging, title={Challenging BIG-Bench Tasks and Whether Chain-of-Thought Can Solve
Them}, author={Suzgun, Mirac and Scales, Nathan and Sch{\\"a}rli, Nathanael and Gehrmann, Sebastian and Tay, Yi and
Chung, Hyung Won and Chowdhery, Aakanksha and Le, Quoc V and Chi, Ed H and Zhou, Denny and Wei, Jason},
journal={arXiv preprint arXiv:2210.09261}, year={2022}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class BbhAccuracy(evaluate.Metric):
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

    def _compute(self, predictions, references, tasks=None, inputs=None, k=None) -> dict[str, float]:
        samples = [p if isinstance(p, list) else [p] for p in predictions]
        if tasks is None or isinstance(tasks, str):
            tasks = [tasks] * len(samples)
        inputs = inputs if inputs is not None else [None] * len(samples)
        if len(tasks) != len(samples) or len(inputs) != len(samples):
            raise ValueError(f"tasks and inputs need one entry per prediction ({len(samples)})")
        unknown = sorted({str(task) for task in tasks if task not in BBH_TASKS})
        if unknown:
            raise ValueError(f"unknown BBH tasks {unknown}; the 27 are: {', '.join(BBH_TASKS)}")
        keys = [[extract_bbh_answer(s, task, q) for s in row] for row, task, q in zip(samples, tasks, inputs)]
        gold = [bbh_gold_key(ref, task) for ref, task in zip(references, tasks)]
        correct = [[key is not None and key == g for key in row] for row, g in zip(keys, gold)]
        ks = [k] if isinstance(k, int) else list(k or [1, min(len(row) for row in samples)])
        scores = aggregate_scores(correct, keys, ks)
        scores.update(macro_scores(correct, keys, tasks, ks))
        for task in sorted(set(tasks)):
            rows = [row for row, row_task in zip(correct, tasks) if row_task == task]
            scores[f"accuracy_{task}"] = aggregate_scores(rows)["accuracy"]
        return scores
