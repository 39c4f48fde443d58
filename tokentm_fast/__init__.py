"""tokentm_fast: fast, faithful explanations for Vision Transformers."""
__version__ = "0.1.0"
