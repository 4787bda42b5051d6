"""prophet: masked-diffusion LM decoding with Prophet early commit (torch only)."""
from prophet.config import PRESETS, ConfigError, DecodeConfig
from prophet.types import DLM, DecodeResult, TextDLM
from prophet.decode import decode  # noqa: E402  (the function; the module stays importable by its full path)
from prophet.reference import decode_reference

__all__ = ["PRESETS", "ConfigError", "DecodeConfig", "DLM", "DecodeResult", "TextDLM", "decode", "decode_reference"]
