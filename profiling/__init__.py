"""Model + calibration text -> curves: streaming statistics, spectra, loss-unit curves."""

if __name__ != "rankalloc.profiling":  # one copy of every module (and registry), whatever sys.path holds
    raise ImportError(f"import this package as rankalloc.profiling, not {__name__}: the repository root is the "
                      f"package rankalloc (pip install -e .)")
