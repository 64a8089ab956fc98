import sys

try:
    from .cli import main
except ModuleNotFoundError as err:
    if err.name not in ("matplotlib", "tqdm", "numpy"):
        raise
    # The benchmark's own dependencies are an extra, not the package's.
    sys.exit(f"python -m {__package__} needs {err.name}, one of the [bench] extra's packages: "
             f"pip install numpy matplotlib tqdm (or install mlx-fused-losses with its [bench] extra)")

sys.exit(main())
