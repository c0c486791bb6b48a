"""The Auto-class registration is lazy but complete: whatever a process imports first, `AutoModel` and friends load
a saved domain transformer after `import domaintok`, and processes that never use a model never import torch."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("autoreg") / "model"
    _run(
        "from domaintok.models import DomainTransformerConfig, DomainTransformerForCausalLM\n"
        f"DomainTransformerForCausalLM(DomainTransformerConfig.from_preset('tiny', vocab_size=50)).save_pretrained({str(path)!r})"
    )
    return str(path)


FIRST_IMPORTS = [
    "",
    "import transformers.modeling_utils",  # loads configuration_auto while modeling_utils is half-initialized
    "from transformers import Trainer",
    "import peft",
    "import domaintok.models.fusion",
    "import transformers.models.auto.modeling_auto",  # transformers' Auto modules already loaded before domaintok
]


@pytest.mark.parametrize("first", FIRST_IMPORTS)
def test_auto_classes_load_whatever_was_imported_first(saved_model, first):
    order = f"{first}\nimport domaintok\n" if first.startswith("import transformers.models") else f"import domaintok\n{first}\n"
    out = _run(
        order
        + "from transformers import AutoConfig, AutoModel, AutoModelForCausalLM\n"
        + f"print(type(AutoConfig.from_pretrained({saved_model!r})).__name__, "
        + f"type(AutoModel.from_pretrained({saved_model!r})).__name__, "
        + f"type(AutoModelForCausalLM.from_pretrained({saved_model!r})).__name__)"
    )
    assert out.splitlines()[-1] == "DomainTransformerConfig DomainTransformerModel DomainTransformerForCausalLM"


def test_tokenizer_side_never_imports_torch():
    out = _run("import sys, domaintok.tokenizer, streams.tokenizer_agent, streams.clients\nprint('torch' in sys.modules)")
    assert out == "False"
