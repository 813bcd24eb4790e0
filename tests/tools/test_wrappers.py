"""Every script in tools/ is a thin command line over a package function: its ``main`` is the package's."""
import importlib
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WRAPPERS = {
    "tools/train_tokenizer.py": "megatron_alcot.data.tokenizer_training",
    "tools/preprocess_data.py": "megatron_alcot.data.preprocess_data",
    "tools/merge_datasets.py": "megatron_alcot.data.merge_datasets",
    "tools/build_index_cache.py": "megatron_alcot.data.build_index_cache",
    "tools/evaluate.py": "megatron_alcot.evaluation.evaluate",
    "tools/generate.py": "megatron_alcot.evaluation.generate",
    "tools/checkpoint/convert_to_hf.py": "megatron_alcot.hf.convert_to_hf",
    "tools/checkpoint/convert_from_hf.py": "megatron_alcot.hf.convert_from_hf",
    "tools/lm_eval.py": "megatron_alcot.evaluation.lm_eval_cli",
    "tools/plan_memory.py": "megatron_alcot.memory_plan_cli",
}


@pytest.mark.parametrize("path, module", sorted(WRAPPERS.items()))
def test_tool_main_is_the_package_main(path, module):
    spec = importlib.util.spec_from_file_location("wrapper_" + os.path.basename(path)[:-3], os.path.join(ROOT, path))
    wrapper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wrapper)
    assert wrapper.main is importlib.import_module(module).main


def test_every_tool_is_listed():
    found = {os.path.relpath(os.path.join(d, f), ROOT) for d, _, files in os.walk(os.path.join(ROOT, "tools"))
             for f in files if f.endswith(".py")}
    thin = {"tools/build_corpus.py", "tools/checkpoint/reshard_checkpoint.py"}
    assert found - thin <= set(WRAPPERS), sorted(found - thin - set(WRAPPERS))
