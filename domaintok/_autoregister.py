"""Register the domain transformer with transformers' Auto classes the moment transformers' Auto modules load.

Why not at `import domaintok`: the registration imports torch and transformers (seconds and ~1 GB), and most
processes never touch a model (tokenizer workers, producers, `fit`, `tokenize`). A meta-path finder waits for
transformers' `configuration_auto` and `modeling_auto` modules to be imported, by anyone and in any order, lets
each load, and then registers what that module's Auto classes need: the config with AutoConfig, the models with
AutoModel and AutoModelForCausalLM (the joint fusion model with AutoModel too). `AutoModel.from_pretrained(dir)`
therefore works after `import domaintok`
exactly as with an eager registration, without `trust_remote_code`. Registration is idempotent.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from types import ModuleType


def register_config() -> None:
    from transformers.models.auto.configuration_auto import AutoConfig

    from domaintok.models.configuration_domain_transformer import DomainTransformerConfig
    from domaintok.models.configuration_fusion import JointFusionConfig

    AutoConfig.register(DomainTransformerConfig.model_type, DomainTransformerConfig, exist_ok=True)
    AutoConfig.register(JointFusionConfig.model_type, JointFusionConfig, exist_ok=True)


def _initializing(name: str) -> bool:
    module = sys.modules.get(name)
    return module is not None and bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


MODELING = "domaintok.models.modeling_domain_transformer"
FUSION = "domaintok.models.fusion"


def register_models() -> None:
    """Register the model classes; when our modeling module is itself mid-import (it is what pulled transformers'
    modeling_auto in), leave it to that module's last line, `models_loaded()`."""
    if not _initializing(MODELING):
        _register_models()


def _register_models() -> None:
    from transformers.models.auto.modeling_auto import AutoModel, AutoModelForCausalLM

    from domaintok.models.configuration_domain_transformer import DomainTransformerConfig
    from domaintok.models.modeling_domain_transformer import DomainTransformerForCausalLM, DomainTransformerModel

    register_config()
    AutoModel.register(DomainTransformerConfig, DomainTransformerModel, exist_ok=True)
    AutoModelForCausalLM.register(DomainTransformerConfig, DomainTransformerForCausalLM, exist_ok=True)
    if not _initializing(FUSION):  # else the fusion module registers itself when it is complete (fusion_loaded)
        _register_fusion()


def _register_fusion() -> None:
    from transformers.models.auto.modeling_auto import AutoModel

    from domaintok.models.configuration_fusion import JointFusionConfig
    from domaintok.models.fusion import JointFusionModel

    register_config()
    AutoModel.register(JointFusionConfig, JointFusionModel, exist_ok=True)


def fusion_loaded() -> None:
    """Called at the end of the fusion module (which imports the modeling module, whose own registration runs while
    the fusion module is still half-built): register the fusion model if transformers' modeling_auto is loaded."""
    module = "transformers.models.auto.modeling_auto"
    if module in sys.modules and not _initializing(module):
        _register_fusion()


def models_loaded() -> None:
    """Called at the end of our modeling module: register now if transformers' modeling_auto is loaded (else its
    trigger will)."""
    module = "transformers.models.auto.modeling_auto"
    if module in sys.modules and not _initializing(module):
        _register_models()


# transformers module -> what to register once it has loaded. configuration_auto loads while modeling_utils is
# still initializing (so only the config, which needs configuration_utils alone, is registered then);
# modeling_auto loads after modeling_utils is complete.
TRIGGERS = {
    "transformers.models.auto.configuration_auto": register_config,
    "transformers.models.auto.modeling_auto": register_models,
}


class _RegisterAfterExec(importlib.abc.Loader):
    """Wraps a trigger module's loader: load the module as usual, then register."""

    def __init__(self, loader: importlib.abc.Loader, then) -> None:
        self._loader = loader
        self._then = then

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._then()


class AutoClassRegistrar(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when a trigger module is looked up, asks the other finders and wraps the loader."""

    def __init__(self) -> None:
        self.pending = dict(TRIGGERS)

    def find_spec(self, fullname, path, target=None):
        then = self.pending.pop(fullname, None)
        if then is None:
            return None
        if not self.pending:
            uninstall()
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RegisterAfterExec(spec.loader, then)
        return spec


def install() -> None:
    """Register for each trigger module already loaded; for the others, when they load."""
    if any(isinstance(f, AutoClassRegistrar) for f in sys.meta_path):
        return
    finder = AutoClassRegistrar()
    for name, then in list(finder.pending.items()):
        if name in sys.modules:
            finder.pending.pop(name)
            then()
    if finder.pending:
        sys.meta_path.insert(0, finder)


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, AutoClassRegistrar)]
