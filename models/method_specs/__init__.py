"""One module per compression method kind, each defining `SPEC` (or `SPECS`): a
models.methods.MethodSpec. models.methods.specs() finds them by scanning this folder, so a new
method is one file here plus its kernel in kernels/; modules whose names start with `_` hold
arithmetic that several specs share."""
