"""One module per experiment or measurement: its parameters, its run, its answer; the notebooks and `python -m poc` commands call them."""
