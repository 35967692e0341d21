"""The editing layer: MEMIT and AlphaEdit on Hugging Face models, with SPHERE."""
