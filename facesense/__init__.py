"""FaceSense: fast, honest facial-expression training on FER2013."""
__version__ = "0.1.0"
__all__ = ["Recognizer", "__version__"]


def __getattr__(name: str):
    # Recognizer is loaded on first use: `import facesense` (the CLI's start) stays free of torch and OpenCV.
    if name == "Recognizer":
        from facesense.infer.recognizer import Recognizer

        return Recognizer
    raise AttributeError(f"module 'facesense' has no attribute {name!r}")
