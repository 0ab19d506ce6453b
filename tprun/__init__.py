"""tprun: Ray-free offline LLM inference with tensor and data parallelism."""

from tprun.config import SamplingParams
from tprun.submit import submit  # eager (cheap): a later `import tprun.submit` then cannot rebind the name

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "submit"]


def __getattr__(name: str):
    # The engine pulls in torch and transformers: import it only when asked for.
    if name == "LLM":
        from tprun.engine.llm import LLM

        return LLM
    if name in ("RequestOutput", "CompletionOutput"):
        from tprun.engine import outputs

        return getattr(outputs, name)
    raise AttributeError(name)
