"""wizardchat: chat with WizardLM-2 8x22B in a terminal, on llama.cpp."""

__all__ = ["__version__"]
__version__ = "0.1.0"
