"""Model families: native LLaDA, LLaDA-MoE, Dream, Fast-dLLM v2, LLaDA2 and SDAR (torch only), a generic transformers masked LM, and safe loading.

    from prophet.models import load_model
    model = load_model("checkpoints/tiny-llada")          # a prophet.types.TextDLM
"""
from prophet.models.adapter import NativeAdapter, shift_logits_right
from prophet.models.dream import DreamConfig, DreamModel, FastDLLMConfig
from prophet.models.errors import ModelLoadError
from prophet.models.llada import LLaDAConfig, LLaDAModel
from prophet.models.llada2 import LLaDA2Config, LLaDA2Model
from prophet.models.llada_moe import LLaDAMoEConfig, LLaDAMoEModel
from prophet.models.loading import load_model, save_model
from prophet.models.sdar import SDARConfig, SDARModel, SDARMoeConfig
from prophet.models.tokenizer import CHAR_TOKEN_IDS, Tokenizer, char_tokenizer

__all__ = [
    "CHAR_TOKEN_IDS", "DreamConfig", "DreamModel", "FastDLLMConfig", "LLaDA2Config", "LLaDA2Model", "LLaDAConfig",
    "LLaDAModel", "LLaDAMoEConfig", "LLaDAMoEModel", "ModelLoadError", "NativeAdapter", "SDARConfig", "SDARModel",
    "SDARMoeConfig", "Tokenizer", "char_tokenizer", "load_model", "save_model", "shift_logits_right",
]
