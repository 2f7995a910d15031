"""FaceSense: fast, honest facial-expression training on FER2013."""
__version__ = "0.1.0"
