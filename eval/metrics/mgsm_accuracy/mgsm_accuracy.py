"""MGSM accuracy: the final number of a model output (read in the output's language), against the gold number."""

import datasets
import evaluate

# A relative import, not `eval.grading`: see eval/metrics/README.md (grading.py here is a symlink to it).
from .grading import aggregate_scores, extract_number, numbers_equal

_DESCRIPTION = """Accuracy on grade-school math (MGSM, GSM8K). The answer of each model output is the number in its
last `\\boxed{}`, else on the line of its last answer prefix ("The answer is", "Die Antwort lautet", "答案：", ...),
else its last number, read in the language's number format (1,234 / 1.234 / 1 234, native digits)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: model outputs, one string per question, or a list of n sampled outputs per question.
    references: gold numbers, as MGSM writes them ("2,125") or as numbers.
    languages: optional MGSM language code ("de", "zh", ...) per prediction, or one for all. It picks the number
        format and answer prefixes, and adds `accuracy_<lang>` per language.
    k: for n samples, the k of pass@k and maj@k (int or list; default: 1 and n).
Returns:
    accuracy: mean correctness over all outputs (pass@1); with n samples also `pass@k` and `maj@k`.
Examples:
    >>> metric = evaluate.load("eval/metrics/mgsm_accuracy")
    >>> metric.compute(predictions=["... Die Antwort lautet 2.125."], references=["2,125"], languages=["de"])
    {'accuracy': 1.0, 'accuracy_de': 1.0}
"""

_CITATION = """@inproceedings{shi2023language, title={Language models are multilingual chain-of-thought reasoners},
author={Shi, Freda and Suzgun, Mirac and Freitag, Markus and Wang, Xuezhi and Srivats, Suraj and Vosoughi, Soroush
and Chung, Hyung Won and Tay, Yi and Ruder, Sebastian and Zhou, Denny and Das, Dipanjan and Wei, Jason},
booktitle={ICLR}, year={2023}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MgsmAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        features = []
        for gold in (datasets.Value("string"), datasets.Value("float64")):
            features.append(datasets.Features({"predictions": datasets.Value("string"), "references": gold}))
            features.append(
                datasets.Features({"predictions": datasets.Sequence(datasets.Value("string")), "references": gold})
            )
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION, features=features
        )

    def _compute(self, predictions, references, languages=None, k=None) -> dict[str, float]:
        samples = [p if isinstance(p, list) else [p] for p in predictions]
        if languages is None or isinstance(languages, str):
            languages = [languages] * len(samples)
        if len(languages) != len(samples):
            raise ValueError(f"languages has {len(languages)} entries for {len(samples)} predictions")
        keys = [[extract_number(s, lang) for s in row] for row, lang in zip(samples, languages)]
        correct = [[numbers_equal(key, gold) for key in row] for row, gold in zip(keys, references)]
        ks = [k] if isinstance(k, int) else list(k or [1, min(len(row) for row in samples)])
        scores = aggregate_scores(correct, keys, ks)
        for lang in sorted({lang for lang in languages if lang is not None}):
            rows = [row for row, row_lang in zip(correct, languages) if row_lang == lang]
            scores[f"accuracy_{lang}"] = aggregate_scores(rows)["accuracy"]
        return scores
