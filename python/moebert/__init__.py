"""MoEBERT application: teacher -> importance -> convert -> distill -> evaluate."""
__version__ = "0.1.0"
