"""ember: a PyTorch-native LLM serving engine."""
from ember.outputs import CompletionOutput, Logprob, RequestOutput
from ember.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Importing the engine pulls in torch and transformers; keep `import ember` light.
    if name == "LLM":
        from ember.llm import LLM
        return LLM
    raise AttributeError(name)
