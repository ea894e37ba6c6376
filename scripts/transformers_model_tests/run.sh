#!/usr/bin/env bash
# transformers' common model tests (ModelTesterMixin) on our classes: fetches the installed transformers
# release's source distribution from PyPI (it ships tests/test_modeling_common.py), puts our testers
# (test_llama4_hf.py) among its tests and runs them. Extra arguments go to pytest.
#   scripts/transformers_model_tests/run.sh [-k NAME]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
version="$(python -c 'import transformers; print(transformers.__version__)')"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
pip install --quiet "parameterized>=0.9"
pip download --quiet --no-deps --no-binary :all: "transformers==$version" -d "$work"
tar xzf "$work/transformers-$version.tar.gz" -C "$work"
suite="$work/transformers-$version"
# The source distribution leaves out tests/generation and tests/exporters, whose mixins the common tests import:
# empty stand-ins (generate() is tested in our tests/test_cache_generation.py and tests/test_drop_in.py).
mkdir -p "$suite/tests/generation" "$suite/tests/exporters" "$suite/tests/models/llama4_hf"
touch "$suite/tests/__init__.py" "$suite/tests/generation/__init__.py" "$suite/tests/exporters/__init__.py" \
    "$suite/tests/models/__init__.py" "$suite/tests/models/llama4_hf/__init__.py"
echo "class GenerationTesterMixin: ..." > "$suite/tests/generation/test_utils.py"
echo "class ExportTesterMixin: ..." > "$suite/tests/exporters/test_export.py"
cp "$here/test_llama4_hf.py" "$suite/tests/models/llama4_hf/"
module="tests/models/llama4_hf/test_llama4_hf.py"
text="$module::Llama4HfTextModelTest"
multimodal="$module::Llama4HfMultimodalModelTest"
# Deselected, each failing for transformers' built-in Llama 4 in the same way:
# - generation_tester_mixin_inheritance: the generate() tests' mixin is not in the source distribution.
# - model_rope_scaling_frequencies: Llama 4's rotary module returns complex frequencies (Meta's layout), not (cos, sin).
# - multimodal model_rope_scaling_from_config: transformers' AutoModel maps llama4 to ForConditionalGeneration,
#   which the test then takes for a base model and asks for `last_hidden_state`.
# - multimodal tp_plan_matches_params: the top-level `lm_head` entry (the built-in's plan) names a submodule's module.
cd "$suite"
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" python -m pytest -q -p no:cacheprovider "$module" \
    --deselect "$text::test_generation_tester_mixin_inheritance" \
    --deselect "$multimodal::test_generation_tester_mixin_inheritance" \
    --deselect "$text::test_model_rope_scaling_frequencies" \
    --deselect "$multimodal::test_model_rope_scaling_frequencies" \
    --deselect "$multimodal::test_model_rope_scaling_from_config_0_linear" \
    --deselect "$multimodal::test_model_rope_scaling_from_config_1_dynamic" \
    --deselect "$multimodal::test_model_rope_scaling_from_config_2_yarn" \
    --deselect "$multimodal::test_tp_plan_matches_params" \
    "$@"
