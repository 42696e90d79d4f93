"""LLM backends behind one protocol: Gemini (google-genai) and the offline responder."""

from bot.llm.base import LLM, ImagePart, LLMRequest, LLMResult
from bot.llm.offline import OfflineResponder

__all__ = ["LLM", "ImagePart", "LLMRequest", "LLMResult", "OfflineResponder"]
