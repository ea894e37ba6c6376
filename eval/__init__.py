"""Evaluation harness for Llama 4 models: MATH-500, GPQA Diamond, MGSM, multilingual MMLU, BIG-Bench Hard and
the bundled synthetic task.

`eval.grading` holds answer extraction and grading (shared by the metric modules in `eval/metrics/` and by
reward functions), `eval.generation` batched generation, `eval.tasks` the benchmark definitions and
`eval.runner` the command line (`python -m eval --help`).
"""
