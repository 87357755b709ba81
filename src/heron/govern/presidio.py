"""The parts of Presidio (analyzer, anonymizer) that Heron uses, without its NLP back-ends.

presidio_analyzer's package imports every NLP engine it ships, and through
them `transformers` and `torch` where those are installed: about 6 of the 9
seconds `heron pii` took to start on a 2-core CPU. Heron runs Presidio's
recognisers over its own tokenizer (pii_recognizers.TokenizerNlpEngine) and
needs neither, so while presidio_analyzer loads, the two fail to import (an
ImportError, which Presidio expects of optional packages) unless something
has loaded them already; afterwards they import as usual.
"""
from __future__ import annotations

import importlib
import sys
from types import ModuleType

UNUSED_BACKENDS = ("transformers", "torch")


def import_without(module: str, unused: tuple[str, ...]) -> ModuleType:
    """Import `module` while the `unused` packages that are not loaded yet cannot be imported."""
    blocked = [name for name in unused if name not in sys.modules]
    sys.modules.update(dict.fromkeys(blocked))  # a None entry makes `import name` raise ImportError
    try:
        return importlib.import_module(module)
    finally:
        for name in blocked:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


import_without("presidio_anonymizer", UNUSED_BACKENDS)  # presidio_analyzer with it

from presidio_analyzer import (AnalyzerEngine, EntityRecognizer, Pattern, PatternRecognizer,  # noqa: E402
                               RecognizerRegistry, RecognizerResult)
from presidio_analyzer.context_aware_enhancers import LemmaContextAwareEnhancer  # noqa: E402
from presidio_analyzer.nlp_engine import NlpArtifacts, NlpEngine  # noqa: E402
from presidio_analyzer.predefined_recognizers import (EmailRecognizer, IbanRecognizer, IpRecognizer,  # noqa: E402
                                                      PhoneRecognizer, UsSsnRecognizer)
from presidio_anonymizer import AnonymizerEngine  # noqa: E402

__all__ = ["AnalyzerEngine", "AnonymizerEngine", "EmailRecognizer", "EntityRecognizer", "IbanRecognizer",
           "IpRecognizer", "LemmaContextAwareEnhancer", "NlpArtifacts", "NlpEngine", "Pattern", "PatternRecognizer",
           "PhoneRecognizer", "RecognizerRegistry", "RecognizerResult", "UsSsnRecognizer", "import_without"]
