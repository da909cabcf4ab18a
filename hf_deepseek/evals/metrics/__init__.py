"""`evaluate` metrics shipped as scripts in this folder, so `evaluate.load` never reaches the Hub.

`load_metric("pass_at_k")` is `evaluate.load` on the local script `pass_at_k.py`.
"""

from pathlib import Path

METRICS_DIR = Path(__file__).parent


def metric_path(name: str) -> str:
    """The local script of a shipped metric, the path `evaluate.load` takes."""
    path = METRICS_DIR / f"{name}.py"
    if not path.is_file():
        shipped = sorted(p.stem for p in METRICS_DIR.glob("*.py") if p.stem != "__init__")
        raise ValueError(f"no shipped metric {name!r}; shipped: {shipped}")
    return str(path)


def load_metric(name: str):
    """`evaluate.load` of a shipped metric (offline)."""
    import evaluate

    return evaluate.load(metric_path(name))
