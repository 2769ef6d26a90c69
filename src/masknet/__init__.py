"""masknet: paper-faithful MaskNet CTR ranking models (Wang, She, Zhang 2021).

    import masknet
    clf = masknet.MaskNetClassifier(epochs=3).fit(X, y)      # scikit-learn estimator on raw frames
    clf = masknet.CTRClassifier(model="deepfm")               # any other model of the zoo
    clf = masknet.load("runs/criteo")                         # any model bundle, as an estimator

The names are imported on first use: `import masknet` itself loads neither PyTorch nor
scikit-learn (tests/test_estimator.py checks it).
"""

__version__ = "0.1.0"

__all__ = ["CTRClassifier", "MaskNetClassifier", "load", "__version__"]

_LAZY = {"CTRClassifier": "estimator", "MaskNetClassifier": "estimator", "load": "estimator"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'masknet' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
