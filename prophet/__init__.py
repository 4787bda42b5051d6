"""prophet: masked-diffusion LM decoding with Prophet early commit (torch only)."""
from prophet.config import PRESETS, ConfigError, DecodeConfig
from prophet.types import DLM, DecodeResult, TextDLM

__all__ = ["PRESETS", "ConfigError", "DecodeConfig", "DLM", "DecodeResult", "TextDLM"]
