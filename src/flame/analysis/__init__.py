"""The analyst's code: loading `analyze`/`aggregate`/`converged`, calling them, hashing them."""
