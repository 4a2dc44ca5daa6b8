"""Imported at interpreter start by megatron_lite_lm_eval.pth: when (and only when) lm-eval's
model registry is imported, register `megatron_lite` in it as a lazy placeholder, so the plain
`lm_eval --model megatron_lite` command finds it without importing torch anywhere else."""

import importlib.abc
import sys

TARGET = "lm_eval.api.registry"


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            import lm_eval.models  # noqa: F401  (the built-in names first, as get_model expects)

            module.model_registry.register(
                "megatron_lite", target="megatron_lite.evaluation.lm_eval_adapter:MegatronLiteLM"
            )

        spec.loader.exec_module = exec_and_register
        return spec


if TARGET not in sys.modules and not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
