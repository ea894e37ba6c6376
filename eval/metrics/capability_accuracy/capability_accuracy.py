"""Capability accuracy: the generated capabilities' checker (eval/capabilities.py) on model outputs."""

import datasets
import evaluate

# Relative imports, not `eval.capabilities`: see eval/metrics/README.md (the files here are symlinks). evaluate
# copies only the modules this script imports itself (and reads a comment on an import line as a download URL), so
# the script imports every module the checker imports.
from .capabilities import capability_score
from .expr_lang import ExprError
from .grading import aggregate_scores, extract_boxed
from .synthetic import LANGUAGES

_CHECKER_MODULES = (ExprError, LANGUAGES)  # what .capabilities imports from .expr_lang and .synthetic

_DESCRIPTION = """Accuracy on the generated capabilities (math, reasoning, instruction following, coding). A
prediction is correct when its answer is right for the row's capability (math-verify for math; the boxed name for
reasoning; for coding the boxed program, run by the project's safe evaluator on test inputs, computes what the
reference program computes) AND it satisfies the row's constraint from a system instruction, if any."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: model outputs, one string per question, or a list of n sampled outputs per question.
    references: gold answers (the rows' `answer` column: a number, a name, or a reference program).
    capabilities: the rows' `capability` column (default: "math" for every row).
    constraints: the rows' `constraint` column, JSON of the active constraint or "" (default: none).
    k: for n samples, the k of pass@k and maj@k (int or list; default: 1 and n).
Returns:
    accuracy: mean correctness over all outputs (pass@1); with n samples also `pass@k` and `maj@k`.
Examples:
    >>> metric = evaluate.load("eval/metrics/capability_accuracy")
    >>> metric.compute(predictions=["The program is \\\\boxed{2 * x + 6}."], references=["(x + 3) * 2"],
    ...                capabilities=["coding"])
    {'accuracy': 1.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CapabilityAccuracy(evaluate.Metric):
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

    def _compute(self, predictions, references, capabilities=None, constraints=None, k=None) -> dict[str, float]:
        samples = [p if isinstance(p, list) else [p] for p in predictions]
        capabilities = capabilities or ["math"] * len(samples)
        constraints = constraints or [""] * len(samples)
        if not len(references) == len(capabilities) == len(constraints) == len(samples):
            raise ValueError(
                f"capability_accuracy: {len(samples)} predictions but {len(references)} references, "
                f"{len(capabilities)} capabilities and {len(constraints)} constraints; pass one of each per prediction"
            )
        rows = [
            {"answer": gold, "capability": capability, "constraint": constraint}
            for gold, capability, constraint in zip(references, capabilities, constraints)
        ]
        correct = [
            [bool(capability_score(s, row)) for s in outputs] for outputs, row in zip(samples, rows, strict=True)
        ]
        keys = [[extract_boxed(s) for s in outputs] for outputs in samples]
        ks = [k] if isinstance(k, int) else list(k or [1, min(len(outputs) for outputs in samples)])
        return aggregate_scores(correct, keys, ks)
