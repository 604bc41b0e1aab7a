"""The ``rankalloc`` command line and the scripts that regenerate the README's figures."""

if __name__ != "rankalloc.studies":  # one copy of every module (and registry), whatever sys.path holds
    raise ImportError(f"import this package as rankalloc.studies, not {__name__}: the repository root is the "
                      f"package rankalloc (pip install -e .)")
